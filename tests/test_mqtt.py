"""The MQTT bridge against a real mosquitto and the real starter model: every command,
replies and correlation ids, discovery, Hermes, device actions, malformed payloads."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from jarvis.devices.device_map import load_device_map
from jarvis.errors import BackendError
from jarvis.home.schema import AskCommand, PayloadError, Topics, parse_command
from jarvis.llm.base import ChatMessage, GenerationOptions, GenerationStats
from jarvis.voice.turn import MAX_REQUEST_CHARS, RequestError, validate_request
from tests.support.mqtt import (
    LoopThread,
    Mosquitto,
    Probe,
    RunningHub,
    hub_settings,
    loads,
    probe,
    start_hub,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DEVICES = ROOT / "config" / "devices.example.toml"
SITE = "testhub"
BASE = f"jarvis/{SITE}"
WATCH = (f"{BASE}/#", "hermes/#", "homeassistant/#", "zigbee2mqtt/#", "homeassistant-cmd/#")


class Hub:
    def __init__(self, loop: LoopThread, running: RunningHub, watcher: Probe) -> None:
        self.loop = loop
        self.running = running
        self.watcher = watcher

    def run(self, coro: Any, timeout: float = 90.0) -> Any:
        return self.loop.run(coro, timeout)

    async def ask(self, payload: dict[str, Any] | bytes, *, topic: str = "ask",
                  timeout: float = 60.0) -> dict[str, Any]:
        """Publish a command; the reply/result/error carrying its id."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        cid = payload.get("id") if isinstance(payload, dict) else None
        start = len(self.watcher.messages)
        await self.watcher.publish(f"{BASE}/cmd/{topic}", data)
        outs = (f"{BASE}/reply", f"{BASE}/result", f"{BASE}/error")
        _, body = await self.watcher.wait_for(
            lambda t, p: t in outs and loads(p).get("id") == cid, start=start, timeout=timeout)
        result: dict[str, Any] = loads(body)
        return result


@pytest.fixture(scope="module")
def hub(mosquitto: Mosquitto, loop_thread: LoopThread, backend: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("hub")
    devices = tmp / "devices.toml"
    shutil.copy(EXAMPLE_DEVICES, devices)
    hub_env = mosquitto.env(SITE=SITE, DEVICES_FILE=str(devices), MQTT_CLIENT_ID="jarvis-test-hub")
    settings_ = hub_settings(tmp, **hub_env)

    async def up() -> tuple[RunningHub, Probe]:
        watcher = await Probe(mosquitto.port).start(*WATCH)
        return await start_hub(backend, settings_), watcher

    running, watcher = loop_thread.run(up())
    yield Hub(loop_thread, running, watcher)
    loop_thread.run(running.close())
    loop_thread.run(watcher.stop())


# ---------------------------------------------------------------------- announcements


def test_availability_state_and_mute_are_retained(hub: Hub, mosquitto: Mosquitto) -> None:
    async def scenario() -> None:
        async with probe(mosquitto.port, f"{BASE}/availability", f"{BASE}/state",
                         f"{BASE}/muted") as late:
            await late.wait_for(lambda t, p: t.endswith("/availability") and p == b"online")
            await late.wait_for(lambda t, p: t.endswith("/state") and p == b"idle")
            await late.wait_for(lambda t, p: t.endswith("/muted") and p == b"OFF")
            assert all(retain for _, _, retain, _ in late.messages)

    hub.run(scenario())


def _entity(topic: str) -> str:
    """homeassistant/<component>/<node>/<object>/config -> <component>/<object>"""
    parts = topic.split("/")
    return f"{parts[1]}/{parts[3]}"


def test_discovery_describes_one_device_with_all_entities(hub: Hub,
                                                          mosquitto: Mosquitto) -> None:
    expected = {"sensor/latency_mean", "sensor/latency_p95", "sensor/latency_std",
                "sensor/cache_hit_rate", "binary_sensor/listening", "binary_sensor/speaking",
                "switch/mute", "text/ask", "button/cancel"}

    async def scenario() -> dict[str, dict[str, Any]]:
        async with probe(mosquitto.port, "homeassistant/+/jarvis-test-hub/+/config") as ha:
            for key in expected:  # retained: they arrive on subscription, in any order

                def is_key(topic: str, _: bytes, key: str = key) -> bool:
                    return _entity(topic) == key

                await ha.wait_for(is_key)
            await asyncio.sleep(0.2)
            return {_entity(t): loads(p) for t, p, _, _ in ha.messages}

    configs = hub.run(scenario())
    assert expected <= set(configs)
    devices = {json.dumps(c["device"], sort_keys=True) for c in configs.values()}
    assert len(devices) == 1
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
    for config in configs.values():
        assert config["availability_topic"] == f"{BASE}/availability"
        assert config["device"]["identifiers"] == ["jarvis-test-hub"]
    for key in ("latency_mean", "latency_p95", "latency_std"):
        sensor = configs[f"sensor/{key}"]
        assert (sensor["device_class"], sensor["state_class"],
                sensor["unit_of_measurement"]) == ("duration", "measurement", "s")
        assert sensor["state_topic"] == f"{BASE}/metrics"
    assert configs["sensor/cache_hit_rate"]["unit_of_measurement"] == "%"
    assert configs["switch/mute"]["command_topic"] == f"{BASE}/cmd/mute"
    assert json.loads(configs["switch/mute"]["payload_on"]) == {"mute": True}
    assert configs["text/ask"]["command_topic"] == f"{BASE}/cmd/ask"
    # The templates read fields the metrics payload really has.
    metrics = loads(hub.watcher.on(f"{BASE}/metrics")[-1])
    for field in ("mean_s", "p95_s", "std_s", "spikes", "cache_hit_rate"):
        assert field in metrics
        assert any(field in str(c.get("value_template", "")) for c in configs.values())


def test_discovery_is_republished_when_home_assistant_comes_online(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        await hub.watcher.publish("homeassistant/status", b"online")
        await hub.watcher.wait_for(lambda t, p: t.endswith("/mute/config"), start=start)
        await hub.watcher.publish("homeassistant/status", b"offline")

    hub.run(scenario())


# ---------------------------------------------------------------------- commands


def test_ask_reply_echoes_the_id_with_latency(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        reply = await hub.ask({"text": "Say hello to me.", "id": "ask-1", "max_tokens": 6})
        assert reply["id"] == "ask-1" and reply["text"] and not reply["cancelled"]
        latency = reply["latency"]
        assert latency["intent"] == "chat"
        assert 0 < latency["ttft_s"] <= latency["total_s"]
        assert latency["prompt_tokens"] > latency["cached_tokens"] > 0  # system prompt reused
        assert 0 < latency["completion_tokens"] <= 6
        assert 0 <= latency["overhead_s"] < latency["total_s"]
        await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/state" and p == b"idle",
                                   start=start)
        states = [p for t, p, _, _ in hub.watcher.messages[start:] if t == f"{BASE}/state"]
        assert states[0] == b"thinking"
        numeric = await hub.ask({"text": "Hello.", "id": 42, "max_tokens": 2})
        assert numeric["id"] == 42

    hub.run(scenario())


def test_conversation_id_keeps_a_history_per_client(hub: Hub) -> None:
    async def scenario() -> None:
        first = await hub.ask({"text": "My name is Ada.", "id": "c1",
                               "conversation_id": "kitchen-panel", "max_tokens": 6})
        other = await hub.ask({"text": "Hello there.", "id": "c2",
                               "conversation_id": "bedroom-panel", "max_tokens": 6})
        second = await hub.ask({"text": "What is my name?", "id": "c3",
                                "conversation_id": "kitchen-panel", "max_tokens": 6})
        assert first["conversation_id"] == "kitchen-panel"
        # The second kitchen turn carries the first one (and reuses it from the cache).
        assert second["latency"]["prompt_tokens"] > first["latency"]["prompt_tokens"] + 5
        assert second["latency"]["cached_tokens"] >= first["latency"]["prompt_tokens"]
        assert other["latency"]["prompt_tokens"] < second["latency"]["prompt_tokens"]

    hub.run(scenario())


def test_asks_arriving_while_busy_are_each_answered_once(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        ids = [f"busy-{i}" for i in range(10)]
        for cid in ids:
            await hub.watcher.publish(f"{BASE}/cmd/ask",
                                      json.dumps({"text": f"Count to {cid[-1]}.", "id": cid,
                                                  "max_tokens": 3}))
        await hub.watcher.wait_for(
            lambda t, p: t == f"{BASE}/reply" and loads(p)["id"] == ids[-1], start=start)
        await asyncio.sleep(0.5)
        answered = [loads(p)["id"] for t, p, _, _ in hub.watcher.messages[start:]
                    if t == f"{BASE}/reply"]
        assert sorted(answered) == sorted(ids)

    hub.run(scenario())


def test_say_mute_reload_and_metrics_answer_with_their_ids(hub: Hub) -> None:
    async def scenario() -> None:
        said = await hub.ask({"text": "Dinner is ready.", "id": "s1"}, topic="say")
        assert said == {"id": "s1", "command": "say", "ok": True, "spoken": False}
        start = len(hub.watcher.messages)
        muted = await hub.ask({"mute": True, "id": "m1"}, topic="mute")
        assert muted["muted"] is True and hub.running.assistant.muted
        await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/muted" and p == b"ON", start=start)
        unmuted = await hub.ask({"mute": False, "id": "m2"}, topic="mute")
        assert unmuted["muted"] is False and not hub.running.assistant.muted
        reloaded = await hub.ask({"id": "r1"}, topic="reload")
        assert reloaded["reloaded"] == ["devices"]
        start = len(hub.watcher.messages)
        result = await hub.ask(b"", topic="metrics")  # an empty payload is {} here
        assert result == {"id": None, "command": "metrics", "ok": True}
        _, body = await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/metrics", start=start)
        metrics = loads(body)
        assert metrics["count"] >= 1 and metrics["mean_s"] > 0 and "p95_s" in metrics

    hub.run(scenario())


def test_reload_failure_keeps_the_old_device_map(hub: Hub) -> None:
    file = hub.running.settings.mqtt.devices_file
    assert file is not None
    good = file.read_text()
    file.write_text(good + "\n[[device]]\nid = 'Bad Id'\n")
    try:
        error = hub.run(hub.ask({"id": "r2"}, topic="reload"))
        assert error["code"] == "reload_failed" and "Bad Id" in error["message"]
        assert len(hub.running.assistant.devices) == len(load_device_map(EXAMPLE_DEVICES))
    finally:
        file.write_text(good)


def test_cancel_by_target_and_current_reply(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        await hub.watcher.publish(f"{BASE}/cmd/ask", json.dumps(
            {"text": "Tell me a very long story about the sea.", "id": "long-1",
             "max_tokens": 300}))
        result = await hub.ask({"id": "x1", "target": "long-1"}, topic="cancel")
        assert result["cancelled"] is True
        _, body = await hub.watcher.wait_for(
            lambda t, p: t == f"{BASE}/reply" and loads(p)["id"] == "long-1", start=start)
        assert loads(body)["cancelled"] is True

        start = len(hub.watcher.messages)
        await hub.watcher.publish(f"{BASE}/cmd/ask", json.dumps(
            {"text": "Tell me a very long story about a forest.", "id": "long-2",
             "max_tokens": 300}))
        await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/state" and p == b"thinking",
                                   start=start)
        await asyncio.sleep(0.3)
        result = await hub.ask({"id": "x2"}, topic="cancel")
        assert result["cancelled"] is True
        _, body = await hub.watcher.wait_for(
            lambda t, p: t == f"{BASE}/reply" and loads(p)["id"] == "long-2", start=start)
        reply = loads(body)
        assert reply["cancelled"] is True and reply["latency"]["finish_reason"] == "cancelled"
        assert reply["latency"]["completion_tokens"] < 300
        nothing = await hub.ask({"id": "x3"}, topic="cancel")
        assert nothing["cancelled"] is False

    hub.run(scenario())


# ---------------------------------------------------------------------- Hermes, transcripts


def test_hermes_say_answers_say_finished_for_this_site_only(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        await hub.watcher.publish("hermes/tts/say", json.dumps(
            {"text": "Somebody else's site.", "id": "h0", "siteId": "garage"}))
        await hub.watcher.publish("hermes/tts/say", json.dumps(
            {"text": "Hello from Rhasspy.", "id": "h1", "siteId": SITE, "sessionId": "s1",
             "lang": None}))
        _, body = await hub.watcher.wait_for(lambda t, p: t == "hermes/tts/sayFinished",
                                             start=start)
        assert loads(body) == {"id": "h1", "siteId": SITE, "sessionId": "s1"}
        await hub.watcher.publish("hermes/tts/say", json.dumps({"text": "No site id."}))
        _, body = await hub.watcher.wait_for(
            lambda t, p: t == "hermes/tts/sayFinished" and loads(p)["id"] is None, start=start)
        assert loads(body)["siteId"] == SITE
        finished = [loads(p)["id"] for t, p, _, _ in hub.watcher.messages[start:]
                    if t == "hermes/tts/sayFinished"]
        assert "h0" not in finished

    hub.run(scenario())


def test_transcripts_go_to_base_and_hermes_topics(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        hub.running.bridge.publish_transcript("what time is it", seconds=1.25)
        _, body = await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/transcript", start=start)
        assert loads(body) == {"text": "what time is it", "seconds": 1.25, "likelihood": 1.0}
        _, body = await hub.watcher.wait_for(lambda t, p: t == "hermes/asr/textCaptured",
                                             start=start)
        captured = loads(body)
        assert captured["text"] == "what time is it" and captured["siteId"] == SITE
        assert {"likelihood", "seconds", "sessionId", "wakewordId"} <= set(captured)

    hub.run(scenario())


def test_turn_events_of_spoken_requests_reach_mqtt(hub: Hub) -> None:
    from jarvis.voice.events import EventType, Outcome, Source, Stage, TurnEvent

    mic = {"source": Source.MICROPHONE, "conversation_id": "microphone"}
    events = [
        TurnEvent(EventType.LISTENING, **mic),
        TurnEvent(EventType.SPEECH_STARTED, **mic),
        TurnEvent(EventType.TRANSCRIPT, "t1", text="what's the time", data={"duration_s": 1.5},
                  **mic),
        TurnEvent(EventType.THINKING, "t1", **mic),
        TurnEvent(EventType.FIRST_AUDIO, "t1", data={"voice_to_voice_s": 0.8}, **mic),
        TurnEvent(EventType.TURN_END, "t1", text="It is noon.", outcome=Outcome.ANSWERED,
                  data={"latency": {"voice_to_voice": 0.8, "asr": 0.1}, "interrupted": False,
                        "regenerated": True, "actions": []}, **mic),
        TurnEvent(EventType.THINKING, "t2", **mic),
        TurnEvent(EventType.ERROR, "t2", text="the speaker is gone", stage=Stage.AUDIO, **mic),
        TurnEvent(EventType.TURN_END, "t2", text="Half a", outcome=Outcome.CANCELLED,
                  data={"latency": {}, "actions": []}, **mic),
    ]

    async def scenario() -> None:
        start = len(hub.watcher.messages)
        for event in events:
            hub.running.assistant.on_event(event)
        await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/error", start=start)
        await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/reply"
                                   and loads(p)["cancelled"] is True, start=start)
        await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/state" and p == b"idle",
                                   start=start)
        got = [(t, p) for t, p, _, _ in hub.watcher.messages[start:]]
        states = [p for t, p in got if t == f"{BASE}/state"]
        # the state topic is coalesced (latest wins while queued), so check the order only
        order = [b"listening", b"thinking", b"speaking", b"idle"]
        assert [s for s in order if s in states] == [s for s in states if s in order]
        assert states[-1] == b"idle"
        transcript = next(loads(p) for t, p in got if t == f"{BASE}/transcript")
        assert transcript == {"text": "what's the time", "seconds": 1.5, "likelihood": 1.0}
        assert any(t == "hermes/asr/textCaptured" for t, _ in got)
        replies = [loads(p) for t, p in got if t == f"{BASE}/reply"]
        assert [(r["text"], r["cancelled"]) for r in replies] == [("It is noon.", False),
                                                                  ("Half a", True)]
        assert replies[0]["spoken"] and replies[0]["id"] is None
        # only numbers, never booleans, in the latency object
        assert replies[0]["latency"] == {"voice_to_voice_s": 0.8, "asr_s": 0.1}
        error = next(loads(p) for t, p in got if t == f"{BASE}/error")
        assert (error["code"], error["message"]) == ("audio_failed", "the speaker is gone")

    hub.run(scenario())


def test_publish_state_rejects_unknown_states(hub: Hub) -> None:
    with pytest.raises(ValueError, match="unknown state"):
        hub.running.bridge.publish_state("dancing")


# ---------------------------------------------------------------------- device actions


def test_device_command_is_published_before_the_reply(hub: Hub) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        reply = await hub.ask({"text": "Turn on the kitchen light, please.", "id": "d1"})
        assert reply["actions"] == [{"device": "kitchen_light", "action": "on",
                                     "topic": "zigbee2mqtt/kitchen_light/set",
                                     "source": "local"}]
        assert reply["text"] == "Turning on the kitchen light."
        assert reply["latency"]["intent"] == "local"
        topics = [t for t, _, _, _ in hub.watcher.messages[start:]]
        device = topics.index("zigbee2mqtt/kitchen_light/set")
        assert device < topics.index(f"{BASE}/reply")
        assert hub.watcher.messages[start + device][1] == b'{"state":"ON"}'

        start = len(hub.watcher.messages)
        reply = await hub.ask({"text": "close the blinds and lock the front door", "id": "d2"})
        assert [(a["device"], a["action"]) for a in reply["actions"]] == [
            ("living_room_blinds", "close"), ("front_door", "lock")]
        sent = {(t, p) for t, p, _, _ in hub.watcher.messages[start:]}
        assert ("homeassistant-cmd/cover/living_room_blinds/set", b"CLOSE") in sent
        assert ("homeassistant-cmd/lock/front_door/set", b"LOCK") in sent

        reply = await hub.ask({"text": "Turn on the ceiling light.", "id": "d3"})
        assert reply["actions"] == [] and "Which one" in reply["text"]

    hub.run(scenario())


def _device_messages(messages: Sequence[tuple[str, bytes, bool, float]]) -> list[tuple[str, bytes]]:
    return [(t, p) for t, p, _, _ in messages
            if t.startswith(("zigbee2mqtt/", "homeassistant-cmd/"))]


def test_only_mapped_commands_reach_device_topics(hub: Hub) -> None:
    """Chat, the LLM fallback and a request for something not in the map: whatever the
    model says, every device message is one of the map's (topic, payload) pairs."""
    allowed = {(a.topic, a.payload) for d in load_device_map(EXAMPLE_DEVICES).devices
               for a in d.actions.values()}

    async def scenario() -> None:
        start = len(hub.watcher.messages)
        chat = await hub.ask({"text": "Tell me a joke about cats.", "id": "f1"})
        assert chat["actions"] == []
        fallback = await hub.ask({"text": "make the kitchen a bit brighter for me",
                                  "id": "f2", "max_tokens": 8})
        for action in fallback["actions"]:
            assert action["source"] == "llm" and action["device"] in {
                "kitchen_light", "coffee_machine"}  # the kitchen devices are the candidates
        unknown = await hub.ask({"text": "turn on the jacuzzi", "id": "f3", "max_tokens": 4})
        assert unknown["actions"] == []
        await asyncio.sleep(0.3)
        sent = _device_messages(hub.watcher.messages[start:])
        # Greedy, the fallback answers "kitchen_light on" here: an action that was sent.
        assert fallback["actions"] and len(sent) == len(fallback["actions"])
        assert [t for t, _ in sent] == [a["topic"] for a in fallback["actions"]]
        assert set(sent) <= allowed

    hub.run(scenario())


# ---------------------------------------------------------------------- malformed payloads


MALFORMED = [
    ("ask", b"turn on the light", "invalid_json", None),
    ("ask", b'{"text": 5, "id": "w1"}', "invalid_payload", "w1"),
    ("ask", b'{"id": "w2"}', "invalid_payload", "w2"),
    ("ask", b'{"text": "   ", "id": "w8"}', "invalid_request", "w8"),
    ("ask", b'{"text": "hi", "id": "w3", "max_tokens": 0}', "invalid_payload", "w3"),
    ("ask", b'{"text": "hi", "id": "w4", "speak": "yes"}', "invalid_payload", "w4"),
    ("ask", b'["text", "hi"]', "invalid_payload", None),
    ("ask", b"\xff\xfe{\"text\": \"hi\"}", "invalid_utf8", None),
    ("ask", os.urandom(1 << 20), "too_large", None),
    ("ask", b"[" * 60000, "invalid_json", None),
    ("say", b'{"id": "w5"}', "invalid_payload", "w5"),
    ("mute", b'{"mute": "off", "id": "w6"}', "invalid_payload", "w6"),
    ("cancel", b'{"target": {"x": 1}}', "invalid_payload", None),
    ("launch_missiles", b'{"id": "w7"}', "unknown_command", None),
    # A lone surrogate passes the JSON parser but is not text: rejected in any field.
    ("ask", b'{"text": "hi", "id": "\\ud800"}', "invalid_payload", None),
    ("ask", b'{"text": "\\ud800 hi", "id": "s1"}', "invalid_payload", "s1"),
    ("ask", b'{"text": "hi", "id": "s2", "conversation_id": "k\\udfff"}', "invalid_payload",
     "s2"),
    ("cancel", b'{"id": "s3", "target": "\\udc80"}', "invalid_payload", "s3"),
    ("say", b'{"text": "hi", "id": "s4", "extra": {"\\ud800": 1}}', "invalid_payload", "s4"),
    ("ask", b'{"text": "hi", "id": "d1", "x": ' + b"[" * 900 + b"]" * 900 + b"}",
     "invalid_payload", "d1"),
    ("ask", b'{"text": "hi", "id": "t1", "sent_at": 1714580000000}', "invalid_payload", "t1"),
    ("ask", b'{"text": "hi", "id": "t2", "sent_at": "yesterday"}', "invalid_payload", "t2"),
]


@pytest.mark.parametrize(("command", "payload", "code", "cid"), MALFORMED,
                         ids=[f"{c}-{code}-{i}" for i, (c, _, code, _) in enumerate(MALFORMED)])
def test_malformed_payload_gets_an_error_and_is_ignored(
    hub: Hub, command: str, payload: bytes, code: str, cid: str | None
) -> None:
    async def scenario() -> None:
        start = len(hub.watcher.messages)
        await hub.watcher.publish(f"{BASE}/cmd/{command}", payload)
        _, body = await hub.watcher.wait_for(lambda t, p: t == f"{BASE}/error", start=start)
        error = loads(body)
        assert (error["code"], error["id"]) == (code, cid)
        assert error["topic"] == f"{BASE}/cmd/{command}" and error["bytes"] == len(payload)
        assert len(body) < 1000  # never echoes the payload
        assert not any(t == f"{BASE}/reply" for t, _, _, _ in hub.watcher.messages[start:])

    hub.run(scenario())


def test_a_command_older_than_max_age_is_expired_and_not_acted_on(hub: Hub) -> None:
    """``sent_at`` older than JARVIS_MQTT_MAX_AGE_S (300 s): ``expired``, nothing done;
    a recent one (an ISO 8601 time with its zone, or seconds) is served."""
    async def scenario() -> None:
        old = await hub.ask({"mute": True, "id": "old-1", "sent_at": time.time() - 3600},
                            topic="mute")
        assert old["code"] == "expired" and "JARVIS_MQTT_MAX_AGE_S=300" in old["message"]
        assert not hub.running.assistant.muted
        now = datetime.now(timezone.utc).isoformat()
        fresh = await hub.ask({"id": "new-1", "sent_at": now}, topic="metrics")
        assert fresh == {"id": "new-1", "command": "metrics", "ok": True}
        fresh = await hub.ask({"id": "new-2", "sent_at": time.time() - 5}, topic="cancel")
        assert fresh["command"] == "cancel"

    hub.run(scenario())


def test_retained_commands_are_never_executed(
    mosquitto: Mosquitto, loop_thread: LoopThread, tmp_path: Path
) -> None:
    """A retained command would run again on every reconnect: it is reported (with how
    to clear it), never run, whether it was retained before Jarvis subscribed or is
    published retained while Jarvis listens (the broker keeps the retain flag as
    published). Clearing it (an empty retained message) is not a command."""
    base = "jarvis/retained"
    cfg = hub_settings(tmp_path, **mosquitto.env(SITE="retained"))

    async def scenario() -> None:
        async with probe(mosquitto.port, f"{base}/#") as p:
            await p.publish(f"{base}/cmd/say", b'{"text": "again", "id": "ret"}', retain=True)
            running = await start_hub(FailingBackend(), cfg)
            try:
                _, body = await p.wait_for(lambda t, _: t == f"{base}/error")
                error = loads(body)
                assert (error["code"], error["id"]) == ("retained_command", "ret")
                assert f"mosquitto_pub -t '{base}/cmd/say' -r -n" in error["message"]
                start = len(p.messages)
                await p.publish(f"{base}/cmd/mute", b'{"mute": true, "id": "live"}',
                                retain=True)
                _, body = await p.wait_for(lambda t, _: t == f"{base}/error", start=start)
                assert (loads(body)["code"], loads(body)["id"]) == ("retained_command", "live")
                assert not running.assistant.muted
                for topic in ("say", "mute"):  # clear them: no answer, no error
                    await p.publish(f"{base}/cmd/{topic}", b"", retain=True)
                start = len(p.messages)
                await p.publish(f"{base}/cmd/metrics", b'{"id": "after"}')
                await p.wait_for(lambda t, b: t == f"{base}/result", start=start)
                assert len(p.on(f"{base}/result")) == 1
                assert len(p.on(f"{base}/error")) == 2
            finally:
                await running.close()

    loop_thread.run(scenario())


def test_the_bridge_still_answers_after_the_garbage(hub: Hub) -> None:
    reply = hub.run(hub.ask({"text": "Are you still there?", "id": "alive", "max_tokens": 4}))
    assert reply["text"] and not hub.running.task.done()
    assert hub.running.bridge.stats.errors >= len(MALFORMED)


# ---------------------------------------------------------------------- backend failures


class FailingBackend:
    """Fault injection: a backend whose every request fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        return {"backend": "failing"}

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> _FailingStream:
        self.calls += 1
        # Every other request fails with a bug rather than a reported backend error.
        return _FailingStream(BackendError("the model fell over") if self.calls % 2
                              else RuntimeError("a bug"))


class _FailingStream:
    stats: GenerationStats | None = None

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        yield "Half a"
        raise self.error

    def cancel(self) -> None: ...


class StuckBackend(FailingBackend):
    """Fault injection: a model whose first piece never comes (a long prompt on a busy
    machine), until the ask is cancelled."""

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> _StuckStream:
        self.calls += 1
        return _StuckStream()


class _StuckStream(_FailingStream):
    def __init__(self) -> None:
        super().__init__(RuntimeError("unreachable"))

    async def _pieces(self) -> AsyncIterator[str]:
        await asyncio.Event().wait()
        yield "never"


def test_an_ask_cancelled_before_the_first_token_reports_none_generated(
    mosquitto: Mosquitto, loop_thread: LoopThread, tmp_path: Path
) -> None:
    base = "jarvis/stuck"
    cfg = hub_settings(tmp_path, **mosquitto.env(SITE="stuck"))

    async def scenario() -> None:
        running = await start_hub(StuckBackend(), cfg)
        try:
            async with probe(mosquitto.port, f"{base}/#") as p:
                await p.publish(f"{base}/cmd/ask", json.dumps({"text": "Hello?", "id": "s1"}))
                await p.wait_for(lambda t, b: t == f"{base}/state" and b == b"thinking")
                # No target: the reply in progress, which the responder stops.
                await p.publish(f"{base}/cmd/cancel", json.dumps({"id": "c1"}))
                _, body = await p.wait_for(
                    lambda t, b: t == f"{base}/reply" and loads(b)["id"] == "s1")
                reply = loads(body)
                assert reply["cancelled"] is True, reply
                assert reply["latency"].get("completion_tokens") == 0, reply
                assert reply["latency"]["finish_reason"] == "cancelled"
        finally:
            await running.close()

    loop_thread.run(scenario())


def test_a_failing_backend_is_reported_per_ask_and_the_bridge_keeps_serving(
    mosquitto: Mosquitto, loop_thread: LoopThread, tmp_path: Path
) -> None:
    base = "jarvis/failing"
    failing = FailingBackend()
    cfg = hub_settings(tmp_path, **mosquitto.env(SITE="failing",
                                                 DEVICES_FILE=str(EXAMPLE_DEVICES)))

    async def scenario() -> None:
        running = await start_hub(failing, cfg)
        try:
            async with probe(mosquitto.port, f"{base}/#") as p:
                for cid, code, message in (("e1", "ask_failed", "the model fell over"),
                                           ("e2", "internal_error", "RuntimeError: a bug")):
                    start = len(p.messages)
                    await p.publish(f"{base}/cmd/ask", json.dumps({"text": "Hello?", "id": cid}))
                    _, body = await p.wait_for(lambda t, _: t == f"{base}/error", start=start)
                    assert loads(body) == {"code": code, "message": message,
                                           "topic": f"{base}/cmd/ask", "id": cid}
                # Device requests do not need the model, so they still work.
                start = len(p.messages)
                await p.publish(f"{base}/cmd/ask", json.dumps(
                    {"text": "switch the porch light off", "id": "e3"}))
                _, body = await p.wait_for(lambda t, _: t == f"{base}/reply", start=start)
                assert loads(body)["actions"][0]["device"] == "porch_light"
                assert running.assistant.metrics()["errors"] == 2  # both failed turns
                assert not running.task.done()
        finally:
            await running.close()

    loop_thread.run(scenario())
    assert failing.calls == 2


# ---------------------------------------------------------------------- pure parts


def test_parse_command_schema_details() -> None:
    topics = Topics(BASE)
    ask = parse_command(f"{BASE}/cmd/ask", b'{"text": "  hi  ", "id": 7, "speak": true, '
                        b'"conversation_id": "panel", "max_tokens": 12, "extra": [1]}', topics)
    assert ask == AskCommand("hi", 7, "panel", True, 12)
    for payload, field in ((b'{"text": "hi", "id": true}', "'id'"),
                           (b'{"text": "hi", "id": 1e3}', "'id'"),
                           (b'{"text": "hi", "max_tokens": 9999}', "'max_tokens'"),
                           (b'{"text": "hi", "max_tokens": true}', "'max_tokens'"),
                           (b'{"text": "hi", "conversation_id": ""}', "'conversation_id'"),
                           (b'{"text": "hi", "id": "' + b"i" * 300 + b'"}', "'id'")):
        with pytest.raises(PayloadError, match=field) as info:
            parse_command(f"{BASE}/cmd/ask", payload, topics)
        assert info.value.code == "invalid_payload"
    # Empty and over-long texts get the words every entry point gives (jarvis ask too).
    for text in ("   ", "x" * (MAX_REQUEST_CHARS + 1)):
        with pytest.raises(PayloadError) as info:
            parse_command(f"{BASE}/cmd/ask", json.dumps({"text": text}).encode(), topics)
        with pytest.raises(RequestError) as same:
            validate_request(text)
        assert (info.value.code, info.value.message) == ("invalid_request", str(same.value))
    assert parse_command("hermes/tts/say", b'{"text": "x", "siteId": "elsewhere"}', topics,
                         site=SITE) is None


def test_dumps_never_writes_invalid_json() -> None:
    from jarvis.home.schema import dumps

    data = json.loads(dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": Path("/x")}))
    assert data == {"a": None, "b": [None, 1.5], "c": "/x"}


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    import random

    from jarvis.home.transport import Backoff

    backoff = Backoff(0.25, 4.0, random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(4.0, 0.25 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jittered, not in lockstep
    backoff.reset()
    assert backoff.next() <= 0.25
