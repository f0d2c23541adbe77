"""MQTT inside ``jarvis run``: the bridge drives the running voice assistant.

* ``cmd/ask`` is answered like the hub (device matcher, grammar-constrained fallback,
  the LLM), and spoken through the speaker when the payload asks for it;
* ``cmd/say`` and ``hermes/tts/say`` speak; ``cmd/mute`` mutes the microphone;
  ``cmd/cancel`` also stops the reply being spoken;
* spoken requests go through the same local device matcher before the LLM, so "turn
  on the kitchen light" publishes the device command in milliseconds;
* the pipeline's events become ``state``, ``transcript``, ``reply`` and ``error``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from jarvis.config import Settings
from jarvis.devices.device_map import DeviceMap, load_device_map
from jarvis.devices.intents import Ambiguous, Matched
from jarvis.home.bridge import Answer, MqttBridge
from jarvis.home.hub import HubAssistant
from jarvis.llm.base import LLMBackend
from jarvis.voice.pipeline import AudioSink, Intercepted, VoicePipeline


class VoiceMqttAssistant(HubAssistant):
    """The hub's answers, plus a voice: see the module docstring."""

    reports_state = True  # the pipeline's events publish listening/thinking/speaking

    def __init__(self, backend: LLMBackend, settings: Settings, pipeline: VoicePipeline,
                 sink: AudioSink, devices: DeviceMap) -> None:
        super().__init__(backend, settings.llm, settings.latency, devices=devices,
                         devices_file=settings.mqtt.devices_file, room=settings.mqtt.site)
        self.pipeline = pipeline
        self.sink = sink
        self.bridge: MqttBridge | None = None

    async def ask(self, text: str, *, conversation_id: str | None = None,
                  speak: bool | None = None, max_tokens: int | None = None) -> Answer:
        answer = await super().ask(text, conversation_id=conversation_id, speak=speak,
                                   max_tokens=max_tokens)
        if speak and not answer.cancelled and await self.say(answer.text):
            answer = replace(answer, spoken=True)
        return answer

    async def say(self, text: str) -> bool:
        if not text.strip():
            return False
        await self.sink.play(self.pipeline.tts.stream(text), self.pipeline.tts.sample_rate)
        return True

    async def mute(self, muted: bool) -> None:
        self.muted = muted
        self.pipeline.muted = muted

    def cancel(self) -> bool:
        stopped = super().cancel()
        if self.pipeline.speaking:
            asyncio.get_running_loop().create_task(self.pipeline.cancel_reply())
            stopped = True
        return stopped

    async def device_request(self, text: str) -> Intercepted | None:
        """For the pipeline: a spoken device command answered locally, with the
        publishing as its deferred action; None lets the LLM answer."""
        result = self.matcher.match(text)
        if isinstance(result, Ambiguous):
            return Intercepted(result.question)
        if not isinstance(result, Matched):
            return None
        commands = result.commands

        def publish() -> None:
            if self.bridge is not None:
                for command in commands:
                    action = command.action
                    self.bridge.publish(action.topic, action.payload, retain=action.retain,
                                        urgent=True)

        return Intercepted(result.reply, publish)


async def attach_mqtt(settings: Settings, backend: LLMBackend, pipeline: VoicePipeline,
                      sink: AudioSink) -> tuple[MqttBridge, VoiceMqttAssistant]:
    """Build the bridge for a running voice assistant and hook it to the pipeline."""
    mqtt = settings.mqtt
    devices = (await asyncio.to_thread(load_device_map, mqtt.devices_file)
               if mqtt.devices_file else DeviceMap())
    assistant = VoiceMqttAssistant(backend, settings, pipeline, sink, devices)
    bridge = MqttBridge(mqtt, assistant)
    assistant.bridge = bridge
    pipeline.subscribe(bridge.on_pipeline_event)
    pipeline.intercept = assistant.device_request
    return bridge, assistant
