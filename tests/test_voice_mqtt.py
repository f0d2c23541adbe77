"""MQTT inside the running voice assistant, with a real mosquitto and real models: a
spoken device command is published to the device's topic without the LLM, the
pipeline's state and transcripts reach MQTT, and ``cmd/mute`` mutes the microphone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from jarvis.audio.formats import ASR_RATE, to_float32
from jarvis.audio.resample import resample
from jarvis.home.hub import attach_mqtt
from jarvis.voice.assembly import build_assistant
from jarvis.voice.events import EventType, Outcome, TurnEvent
from jarvis.voice.pipeline import spoken_turns
from jarvis.voice.sinks import WavReplySink
from tests.conftest import make_settings
from tests.support.mqtt import Mosquitto, probe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_spoken_device_command_and_pipeline_events_over_mqtt(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, **mosquitto.env(
        SITE="kitchen", DEVICES_FILE=str(ROOT / "config" / "devices.example.toml"),
        MAX_TOKENS="16"))
    base = settings.mqtt.base_topic

    async def run() -> tuple[list[TurnEvent], list[tuple[str, bytes]]]:
        assistant = await build_assistant(settings)
        pipeline, tts = assistant.voice(), assistant.tts
        assert tts is not None
        events: list[TurnEvent] = []
        pipeline.subscribe(events.append)
        sink = WavReplySink(tmp_path / "out")
        bridge, voice = await attach_mqtt(settings, assistant, sink)
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:
            async with probe(mosquitto.port, "zigbee2mqtt/#", f"{base}/#") as p:
                await p.wait_for(lambda t, b: t == f"{base}/availability" and b == b"online")
                request = resample(to_float32(tts.synthesize("Turn on the kitchen light.")),
                                   tts.sample_rate, ASR_RATE)
                heard_at = len(p.messages)
                await pipeline.run(spoken_turns(pipeline, [request]), sink)
                topic, payload = await p.wait_for(lambda t, b: t.startswith("zigbee2mqtt/"),
                                                  start=heard_at)
                assert topic == "zigbee2mqtt/kitchen_light/set"
                assert json.loads(payload) == {"state": "ON"}
                await p.wait_for(lambda t, b: t == f"{base}/transcript", start=heard_at)
                _, body = await p.wait_for(lambda t, b: t == f"{base}/reply", start=heard_at)
                reply = json.loads(body)
                assert reply["id"] is None and reply["actions"][0]["device"] == "kitchen_light"
                assert reply["cancelled"] is False
                assert all(isinstance(v, float) for v in reply["latency"].values())
                # An MQTT ask inside `jarvis run` is a turn like a spoken one: thinking
                # shows, and its device command goes out once.
                asked_at = len(p.messages)
                await p.publish(f"{base}/cmd/ask", json.dumps(
                    {"text": "switch the porch light off", "id": "q1"}))
                _, body = await p.wait_for(lambda t, b: t == f"{base}/reply"
                                           and json.loads(b)["id"] == "q1", start=asked_at)
                after = [(t, b) for t, b, _, _ in p.messages[asked_at:]]
                assert len([t for t, _ in after if t.startswith("zigbee2mqtt/porch")]) == 1
                await p.publish(f"{base}/cmd/mute", json.dumps({"mute": True}))
                await p.wait_for(lambda t, b: t == f"{base}/muted" and b == b"ON",
                                 start=asked_at)
                assert pipeline.muted and voice.muted
                messages = [(t, b) for t, b, _, _ in p.messages]
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=10)
            await assistant.close()
        return events, messages

    events, messages = asyncio.run(run())
    transcripts = [e.text for e in events if e.type is EventType.TRANSCRIPT]
    assert len(transcripts) == 1 and "kitchen" in transcripts[0].lower()
    assert not [e for e in events if e.type is EventType.FIRST_TOKEN]  # no LLM needed
    ends = [e for e in events if e.type is EventType.TURN_END]
    assert [e.outcome for e in ends] == [Outcome.ANSWERED, Outcome.ANSWERED]
    assert [e.source.value for e in ends if e.source] == ["microphone", "mqtt"]
    thinking = [e for e in events if e.type is EventType.THINKING]
    assert [e.turn_id for e in thinking] == [e.turn_id for e in ends]  # the ask thought too
    states = [b for t, b in messages if t.endswith("/state")]
    assert b"listening" in states
