"""Jarvis on MQTT: :class:`MqttFrontend` is what the bridge drives, in ``jarvis hub``
(text in and out, no audio) and inside ``jarvis run`` (with a voice). Either way every
ask is a :class:`~jarvis.voice.turn.Turn` for the one responder, so asks get the device
map, the grammar-constrained fallback, conversations and the repetition guard exactly
as spoken requests do, and show ``thinking`` like them.

* ``cmd/ask`` → a turn (spoken through the speaker when the payload asks for it and
  there is one); each ``conversation_id`` is a conversation, an ask without one has no
  history;
* ``cmd/say`` and ``hermes/tts/say`` speak (nothing to do in the hub);
  ``cmd/mute`` mutes the microphone; ``cmd/cancel`` stops the turn being answered;
  ``cmd/reload`` re-reads the device map (a broken file keeps the old map);
* the responder's events become ``state``, ``transcript``, ``reply`` (for turns that
  did not come over MQTT) and ``error``; device commands go out through the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jarvis.config import Settings
from jarvis.devices.device_map import DeviceCommand, DeviceMap, load_device_map
from jarvis.errors import JarvisError
from jarvis.home.bridge import Answer, BridgeOptions, MqttBridge, MqttConfigError
from jarvis.home.ledger import ledger_dir
from jarvis.latency import LatencyTracker
from jarvis.voice.assembly import Assistant, build_assistant
from jarvis.voice.events import EventType, Outcome, Source, TurnEvent
from jarvis.voice.pipeline import VoicePipeline
from jarvis.voice.responder import AudioSink, Responder
from jarvis.voice.turn import Turn, TurnResult

log = logging.getLogger(__name__)


class AskFailed(JarvisError):
    """A turn that failed, as the bridge reports it (``code`` goes on ``<base>/error``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MqttFrontend:
    """The bridge's :class:`~jarvis.home.bridge.MqttAssistant` over the responder."""

    reports_state = True  # the responder's events publish thinking/speaking/idle

    def __init__(self, responder: Responder, tracker: LatencyTracker, *,
                 sink: AudioSink | None = None, pipeline: VoicePipeline | None = None) -> None:
        self.responder = responder
        self.tracker = tracker
        self.sink = sink
        self.pipeline = pipeline
        self.muted = False
        self.bridge: MqttBridge | None = None
        self._open_turns: set[str] = set()

    def attach(self, bridge: MqttBridge) -> None:
        """Send device commands through ``bridge`` and publish the turns' events on it."""
        self.bridge = bridge
        self.responder.actuator = self._publish_commands
        self.responder.bus.subscribe(self.on_event)

    @property
    def devices(self) -> DeviceMap:
        handler = self.responder.devices
        return handler.devices if handler is not None else DeviceMap()

    # ------------------------------------------------------------------ MqttAssistant

    async def ask(self, text: str, *, conversation_id: str | None = None,
                  speak: bool | None = None, max_tokens: int | None = None) -> Answer:
        sink = self.sink if speak else None
        turn = Turn(Source.MQTT, conversation_id, request=text, speak=sink is not None,
                    max_tokens=max_tokens)
        result = await self.responder.respond(turn, sink)
        if result.outcome is Outcome.FAILED:
            code = result.error_code
            raise AskFailed(code if code in ("invalid_request", "internal_error")
                            else "ask_failed", result.error)
        return Answer(result.reply, latency_json(result), tuple(result.actions),
                      cancelled=result.cancelled,
                      spoken=sink is not None and bool(result.reply),
                      backend_s=_model_seconds(result))

    async def say(self, text: str) -> bool:
        if self.sink is None:
            return False  # no audio in hub mode: the bridge publishes the text only
        return await self.responder.say(text, self.sink)

    async def mute(self, muted: bool) -> None:
        self.muted = muted
        if self.pipeline is not None:
            self.pipeline.muted = muted

    def cancel(self) -> bool:
        return self.responder.interrupt()

    async def reload(self) -> list[str]:
        handler = self.responder.devices
        if handler is None or not await handler.reload():
            return []
        return ["devices"]

    def metrics(self) -> dict[str, Any]:
        return self.tracker.summary().to_dict()

    # ------------------------------------------------------------------ events → MQTT

    def on_event(self, event: TurnEvent) -> None:
        """Publish what a turn did: states, transcripts, spoken replies, stage errors."""
        bridge = self.bridge
        if bridge is None:
            return
        kind = event.type
        if event.room:
            self._room_event(bridge, event)
            if not event.turn_id:
                return  # a room's listening loop: its own state only
        if event.turn_id and kind is not EventType.TURN_END:
            self._open_turns.add(event.turn_id)
        if kind is EventType.LISTENING:
            bridge.publish_state("listening")
        elif kind is EventType.THINKING:
            bridge.publish_state("thinking")
        elif kind is EventType.FIRST_AUDIO:
            bridge.publish_state("speaking")
        elif kind is EventType.TRANSCRIPT:
            bridge.publish_transcript(event.text,
                                      seconds=float(event.data.get("duration_s", 0.0) or 0.0))
        elif kind is EventType.ERROR and event.source is not Source.MQTT:
            stage = event.stage.value if event.stage is not None else "pipeline"
            bridge.publish_error(f"{stage}_failed", event.text)
        elif kind is EventType.TURN_END:
            self._open_turns.discard(event.turn_id)
            if event.source is not Source.MQTT and event.outcome in (Outcome.ANSWERED,
                                                                     Outcome.CANCELLED):
                bridge.publish_spoken_reply(
                    event.text, conversation_id=event.conversation_id or None,
                    cancelled=event.outcome is Outcome.CANCELLED,
                    actions=list(event.data.get("actions", [])),
                    latency=_numbers(event.data.get("latency", {})),
                    spoken="voice_to_voice" in event.data.get("latency", {}),
                    source=event.source.value if event.source else "", room=event.room)
            if not self._open_turns:
                bridge.publish_state("listening" if self.pipeline is not None else "idle")

    @staticmethod
    def _room_event(bridge: MqttBridge, event: TurnEvent) -> None:
        """A room's (satellite's) events on its own topics."""
        room, kind = event.room, event.type
        if kind is EventType.ROOM:
            available = bool(event.data.get("available"))
            bridge.publish_room(room, available=available,
                                state="listening" if available else "idle")
        elif kind is EventType.LISTENING:
            bridge.publish_room(room, state="listening")
        elif kind is EventType.THINKING:
            bridge.publish_room(room, state="thinking")
        elif kind is EventType.FIRST_AUDIO:
            bridge.publish_room(room, state="speaking")
        elif kind is EventType.TRANSCRIPT:
            bridge.publish_room(room, transcript=event.text,
                                seconds=float(event.data.get("duration_s", 0.0) or 0.0))
        elif kind is EventType.TURN_END:
            if event.outcome in (Outcome.ANSWERED, Outcome.CANCELLED):
                bridge.publish_room(room, reply={
                    "text": event.text, "cancelled": event.outcome is Outcome.CANCELLED,
                    "actions": list(event.data.get("actions", [])),
                    "latency": _numbers(event.data.get("latency", {}))})
            bridge.publish_room(room, state="listening")

    def _publish_commands(self, commands: Sequence[DeviceCommand]) -> None:
        if self.bridge is not None:
            self.bridge.publish_commands(commands)


def latency_json(result: TurnResult) -> dict[str, Any]:
    """The reply payload's ``latency`` object for one turn."""
    stats = result.stats
    lat = result.latency

    def r(x: object) -> float | None:
        return round(float(x), 6) if isinstance(x, (int, float)) and not isinstance(x, bool) \
            else None

    out: dict[str, Any] = {"total_s": r(lat.get("total")), "intent": result.intent}
    if result.intent in ("local", "ambiguous", "control"):
        return out
    out.update({
        "ttft_s": r(stats.get("ttft_s")), "queue_s": r(stats.get("queue_s")),
        "prompt_tokens": stats.get("prompt_tokens"), "cached_tokens": stats.get("cached_tokens"),
        "completion_tokens": stats.get("completion_tokens"), "cache_hit": stats.get("cache_hit"),
        "finish_reason": "cancelled" if result.cancelled else stats.get("finish_reason"),
        "regenerated": result.regenerated,
    })
    return out


def _model_seconds(result: TurnResult) -> float:
    if result.intent == "llm":
        return float(result.latency.get("devices", 0.0))
    total = result.stats.get("total_s")
    return float(total) if isinstance(total, (int, float)) else 0.0


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` (booleans are not numbers here)."""
    return {f"{k}_s": round(float(v), 6) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def text_frontend(backend: Any, settings: Settings, devices: DeviceMap | None = None
                  ) -> MqttFrontend:
    """A text-only frontend over an already started ``backend`` (the hub, tests)."""
    from jarvis.voice.assembly import make_responder

    responder, tracker = make_responder(backend, settings, devices or DeviceMap())
    return MqttFrontend(responder, tracker)


async def attach_mqtt(settings: Settings, assistant: Assistant,
                      sink: AudioSink | None) -> tuple[MqttBridge, MqttFrontend]:
    """The bridge for a running voice assistant (``jarvis run`` with MQTT)."""
    frontend = MqttFrontend(assistant.responder, assistant.tracker, sink=sink,
                            pipeline=assistant.pipeline)
    bridge = MqttBridge(settings.mqtt, frontend,
                        state_dir=ledger_dir(settings.cache.dir, settings.mqtt.client_id))
    frontend.attach(bridge)
    return bridge, frontend


async def run_hub(settings: Settings, *, stop: asyncio.Event | None = None,
                  options: BridgeOptions | None = None,
                  services: Sequence[Callable[[Assistant],
                                              contextlib.AbstractAsyncContextManager[object]]]
                  = (), speech: bool = False) -> None:
    """Load the model (and the device map), then serve MQTT until ``stop`` is set.

    ``services`` run beside the bridge on the same assistant (the Wyoming server: the
    entry point passes it in, the hub does not know it), each for as long as the
    bridge runs; device commands of their turns go out through the bridge. ``speech``
    loads ASR and TTS too (the hub itself needs neither)."""
    mqtt = settings.mqtt
    if not mqtt.enabled:
        raise MqttConfigError("hub mode talks MQTT only: set JARVIS_MQTT_HOST (and "
                              "JARVIS_MQTT_PORT, JARVIS_MQTT_USERNAME, ... as needed)")
    if mqtt.devices_file:  # a broken map fails before the model loads
        await asyncio.to_thread(load_device_map, mqtt.devices_file)
    assistant = await build_assistant(settings, listen=False, speak=speech)
    try:
        frontend = MqttFrontend(assistant.responder, assistant.tracker)
        bridge = MqttBridge(mqtt, frontend, options=options,
                            state_dir=ledger_dir(settings.cache.dir, mqtt.client_id))
        frontend.attach(bridge)
        async with contextlib.AsyncExitStack() as running:
            for service in services:
                await running.enter_async_context(service(assistant))
            log.info("hub ready: %d devices, MQTT %s:%d, topics %s/...",
                     len(assistant.devices), mqtt.host, mqtt.port, mqtt.base_topic)
            await bridge.run(stop)
    finally:
        await assistant.close()
