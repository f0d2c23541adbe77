"""Headless hub mode: Jarvis with no audio device, text in and out over MQTT only
(``jarvis hub``, the future ``jarvis run --no-audio``), for servers.

:class:`HubAssistant` is the :class:`~jarvis.home.bridge.MqttAssistant` of the hub: device
requests go to the local intent matcher first (answered in well under a millisecond, the
device command published by the bridge), then, when the words look like a command the
matcher could not settle, to the grammar-constrained LLM fallback; everything else is a
chat turn with the LLM, with a history per ``conversation_id`` (the 64 most recent
conversations are kept; an ask without one has no history). ``say`` has no audio here:
the bridge publishes the result only. ``reload`` re-reads the device map (the one thing
that can change safely while serving); a broken file keeps the old map.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from jarvis.config import LatencySettings, LlmSettings, Settings
from jarvis.devices.chooser import ActionChooser
from jarvis.devices.device_map import DeviceCommand, DeviceMap, load_device_map
from jarvis.devices.intents import Ambiguous, IntentMatcher, Matched
from jarvis.errors import JarvisError
from jarvis.home.bridge import Answer, BridgeOptions, MqttBridge, MqttConfigError
from jarvis.latency import LatencyTracker, RequestRecord
from jarvis.llm.base import GenerationOptions, GenerationStats, LLMBackend
from jarvis.llm.dialogue import Conversation

log = logging.getLogger(__name__)


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class _EventCancel:
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def cancel(self) -> None:
        self.event.set()


class HubAssistant:
    """LLM + device map, no audio. One instance serves every MQTT client."""

    reports_state = False

    def __init__(self, backend: LLMBackend, llm: LlmSettings, latency: LatencySettings, *,
                 devices: DeviceMap | None = None, devices_file: Path | None = None,
                 room: str = "", max_conversations: int = 64) -> None:
        self.backend = backend
        self.system_prompt = llm.system_prompt
        self.tracker = LatencyTracker(spike_threshold_s=latency.spike_threshold_s)
        self.muted = False
        self.devices_file = devices_file
        self.room = room
        self.max_conversations = max_conversations
        self._conversations: OrderedDict[str, tuple[Conversation, asyncio.Lock]] = OrderedDict()
        self._active: list[_Cancellable] = []
        """Model work in submission order; the backend serves it FIFO, so the first one
        is the reply being generated now."""
        self.set_devices(devices or DeviceMap())

    def set_devices(self, devices: DeviceMap) -> None:
        self.devices = devices
        self.matcher = IntentMatcher(devices, self.room)
        self.chooser = ActionChooser(self.backend, devices)

    # ------------------------------------------------------------------ MqttAssistant

    async def ask(self, text: str, *, conversation_id: str | None = None,
                  speak: bool | None = None, max_tokens: int | None = None) -> Answer:
        t0 = time.perf_counter()
        result = self.matcher.match(text)
        if isinstance(result, Matched):
            return self._local(result.commands, result.reply, t0, "local")
        if isinstance(result, Ambiguous):
            return self._local((), result.question, t0, "ambiguous")
        if result.looks_like_command and self.chooser.available:
            candidates = self.matcher.candidates(text)
            if candidates:
                command, model_s = await self._choose(text, candidates)
                if command is not None:
                    answer = self._local((command,), command.reply, t0, "llm")
                    return Answer(answer.text, answer.latency, answer.commands,
                                  backend_s=model_s)
        return await self._chat(text, conversation_id, max_tokens)

    async def say(self, text: str) -> bool:
        return False  # no audio in hub mode: the bridge publishes the text only

    async def mute(self, muted: bool) -> None:
        self.muted = muted

    def cancel(self) -> bool:
        if not self._active:
            return False
        self._active[0].cancel()
        return True

    async def reload(self) -> list[str]:
        if self.devices_file is None:
            return []
        self.set_devices(await asyncio.to_thread(load_device_map, self.devices_file))
        log.info("device map reloaded: %d devices", len(self.devices))
        return ["devices"]

    def metrics(self) -> dict[str, Any]:
        return self.tracker.summary().to_dict()

    # ------------------------------------------------------------------ internals

    def _local(self, commands: tuple[DeviceCommand, ...], reply: str, t0: float,
               intent: str) -> Answer:
        return Answer(reply, {"total_s": round(time.perf_counter() - t0, 6), "intent": intent},
                      commands)

    async def _choose(self, text: str,
                      candidates: tuple[Any, ...]) -> tuple[DeviceCommand | None, float]:
        cancel = _EventCancel(threading.Event())
        self._active.append(cancel)
        t = time.perf_counter()
        try:
            command = await self.chooser.choose(text, candidates, cancel=cancel.event)
        except JarvisError as exc:
            log.warning("action fallback failed (%s); answering as conversation", exc)
            command = None
        finally:
            self._active.remove(cancel)
        return command, time.perf_counter() - t

    def _conversation(self, conversation_id: str | None) -> tuple[Conversation, asyncio.Lock]:
        if conversation_id is None:
            return Conversation(self.system_prompt), asyncio.Lock()
        entry = self._conversations.get(conversation_id)
        if entry is None:
            entry = (Conversation(self.system_prompt), asyncio.Lock())
            self._conversations[conversation_id] = entry
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        self._conversations.move_to_end(conversation_id)
        return entry

    async def _chat(self, text: str, conversation_id: str | None,
                    max_tokens: int | None) -> Answer:
        conversation, lock = self._conversation(conversation_id)
        async with lock:
            options = GenerationOptions(max_tokens=max_tokens) if max_tokens else None
            t = time.perf_counter()
            stream = self.backend.stream_chat(conversation.messages(text), options)
            self._active.append(stream)
            try:
                reply = "".join([piece async for piece in stream]).strip()
            except JarvisError as exc:
                self.tracker.record(RequestRecord(total_s=time.perf_counter() - t,
                                                  error=str(exc)[:200], label="ask"))
                raise
            finally:
                self._active.remove(stream)
            stats = stream.stats
            assert stats is not None
            if conversation_id is not None and stats.finish_reason != "cancelled":
                conversation.add_turn(text, reply)
        self.tracker.record(stats.to_record(label="ask"))
        return Answer(reply, latency_json(stats), cancelled=stats.finish_reason == "cancelled",
                      backend_s=stats.total_s)


def latency_json(stats: GenerationStats, intent: str = "chat") -> dict[str, Any]:
    """The reply payload's ``latency`` object for one model request."""
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 6)

    return {
        "total_s": r(stats.total_s), "ttft_s": r(stats.ttft_s), "queue_s": r(stats.queue_s),
        "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
        "completion_tokens": stats.completion_tokens, "cache_hit": stats.cache_hit,
        "finish_reason": stats.finish_reason, "intent": intent,
    }


async def run_hub(settings: Settings, *, stop: asyncio.Event | None = None,
                  options: BridgeOptions | None = None) -> None:
    """Load the model (and the device map), then serve MQTT until ``stop`` is set."""
    from jarvis.llm.llama_cpp import LlamaCppBackend

    mqtt = settings.mqtt
    if not mqtt.enabled:
        raise MqttConfigError("hub mode talks MQTT only: set JARVIS_MQTT_HOST (and "
                              "JARVIS_MQTT_PORT, JARVIS_MQTT_USERNAME, ... as needed)")
    devices = (await asyncio.to_thread(load_device_map, mqtt.devices_file)
               if mqtt.devices_file else DeviceMap())
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=True)
    await backend.start()
    try:
        assistant = HubAssistant(backend, settings.llm, settings.latency, devices=devices,
                                 devices_file=mqtt.devices_file, room=mqtt.site)
        log.info("hub ready: %d devices, MQTT %s:%d, topics %s/...", len(devices), mqtt.host,
                 mqtt.port, mqtt.base_topic)
        await MqttBridge(mqtt, assistant, options=options).run(stop)
    finally:
        await backend.close()
