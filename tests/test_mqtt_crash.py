"""MQTT that loses nothing and answers everything: real ``jarvis hub`` processes on a real
mosquitto with persistence, killed (SIGKILL), stopped (SIGTERM, twice) or cut off by a
broker restart in the middle of a burst of 40 asks; every ask is answered exactly once
and every device command published exactly once, by whichever process gets to it.

A reply counts once per distinct payload: a broker may deliver one publication twice
to the test's own client (QoS 1), and two answers of Jarvis always differ (timings)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.mqtt import HubProcess, Mosquitto, Probe, loads, need_mosquitto, process_env

pytestmark = pytest.mark.slow

SITE = "crash"
BASE = f"jarvis/{SITE}"
WATCH = (f"{BASE}/#", "zigbee2mqtt/#", "homeassistant-cmd/#")
ASKS = 40
DEVICE_ASKS = {
    5: ("turn on the kitchen light", "zigbee2mqtt/kitchen_light/set", b'{"state":"ON"}'),
    15: ("turn off the porch light", "zigbee2mqtt/porch_light/set", b'{"state":"OFF"}'),
    25: ("close the blinds", "homeassistant-cmd/cover/living_room_blinds/set", b"CLOSE"),
    35: ("lock the front door", "homeassistant-cmd/lock/front_door/set", b"LOCK"),
}
"""Asks the device map answers at once (they do not wait for the model)."""


def burst(prefix: str, *, long_at: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """40 asks: model asks ("Say the number 7.") with device asks among them; the ask at
    ``long_at`` asks for a longer reply (32 tokens)."""
    asks = []
    for i in range(ASKS):
        cid = f"{prefix}-{i:02d}"
        payload: dict[str, Any] = {"text": DEVICE_ASKS[i][0] if i in DEVICE_ASKS
                                   else f"Say the number {i}.", "id": cid}
        if i == long_at:
            payload.update(text="Tell me a long story about the sea.", max_tokens=32)
        asks.append((cid, payload))
    return asks


def model_ids(asks: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [cid for i, (cid, _) in enumerate(asks) if i not in DEVICE_ASKS]


class Rig:
    """A broker with persistence, a persistent probe client watching everything, and
    what the hub processes of one test share: a client id (so the broker's session and
    the MQTT ledger) and the context cache (shared by the module's tests, so only the
    first hub evaluates the system prompt)."""

    def __init__(self, tmp: Path, cache: Path, name: str) -> None:
        need_mosquitto()
        self.tmp = tmp
        self.env = {"CACHE_DIR": str(cache), "MQTT_CLIENT_ID": f"jarvis-{name}", "SITE": SITE}
        self.broker = Mosquitto(tmp / "broker")
        self.broker.start()
        self.probe: Probe | None = None
        self.hubs: list[HubProcess] = []

    async def start(self) -> Probe:
        # Persistent: replies published while the probe is away (broker restart) wait.
        self.probe = await Probe(self.broker.port, client_id="crash-probe",
                                 clean_session=False).start(*WATCH)
        return self.probe

    def hub(self, script: str | None = None, **env: str) -> HubProcess:
        hub = HubProcess(process_env(self.broker, self.tmp, SHUTDOWN_GRACE_S="20",
                                     **{**self.env, **env}), self.tmp, script=script)
        self.hubs.append(hub)
        return hub

    async def online(self, start: int) -> None:
        assert self.probe is not None
        await self.probe.wait_for(lambda t, p: t == f"{BASE}/availability" and p == b"online",
                                  start=start, timeout=90)

    async def publish(self, asks: list[tuple[str, dict[str, Any]]]) -> None:
        assert self.probe is not None
        for _, payload in asks:
            await self.probe.publish(f"{BASE}/cmd/ask", json.dumps(payload))

    async def reply(self, cid: str, *, timeout: float = 60.0) -> dict[str, Any]:
        assert self.probe is not None
        _, body = await self.probe.wait_for(
            lambda t, p: t == f"{BASE}/reply" and loads(p)["id"] == cid, timeout=timeout)
        result: dict[str, Any] = loads(body)
        return result

    async def settle(self) -> None:
        """One more model ask, answered last: any second answer to an earlier command
        (the broker delivers what was not acknowledged first, and the model answers in
        order) would have come before it."""
        assert self.probe is not None
        await self.probe.publish(f"{BASE}/cmd/ask", json.dumps(
            {"text": "Say done.", "id": "settle", "max_tokens": 1}))
        await self.reply("settle")

    def answers(self) -> tuple[Counter[Any], list[dict[str, Any]]]:
        """Replies per id (distinct payloads), and every error."""
        assert self.probe is not None
        replies = {p for t, p, _, _ in self.probe.messages if t == f"{BASE}/reply"}
        errors = {p for t, p, _, _ in self.probe.messages if t == f"{BASE}/error"}
        return Counter(loads(p)["id"] for p in replies), [loads(p) for p in errors]

    def device_messages(self) -> Counter[tuple[str, bytes]]:
        assert self.probe is not None
        return Counter((t, p) for t, p, _, _ in self.probe.messages
                       if t.startswith(("zigbee2mqtt/", "homeassistant-cmd/")))

    def check_each_once(self, asks: list[tuple[str, dict[str, Any]]], *,
                        errors: list[dict[str, Any]] | None = None,
                        before_the_kill: frozenset[str] = frozenset()) -> None:
        """Each ask answered once, no error but ``errors``, each device command once.

        ``before_the_kill``: the replies the dead hub had published. The broker had
        them, but the hub may have died before the broker's acknowledgement came back,
        so a command not yet recorded as answered is answered again (at least once:
        recording it before the broker has it lost replies when several answers finished
        together, and the model finishes several in one step). Those replies, and no
        other, may come twice."""
        replies, seen = self.answers()
        ids = [cid for cid, _ in asks]
        expected = {cid: 2 if cid in before_the_kill and replies[cid] == 2 else 1
                    for cid in ids}
        assert {cid: replies[cid] for cid in ids} == expected, replies
        assert set(replies) <= {*ids, "settle"}
        assert seen == (errors or []), seen  # no "shutting_down", nothing else
        devices = self.device_messages()
        by_text = {text: (topic, payload) for text, topic, payload in DEVICE_ASKS.values()}
        for _, ask in asks:
            if ask["text"] in by_text:
                assert devices[by_text[ask["text"]]] == 1, devices

    def close(self) -> None:
        for hub in self.hubs:
            hub.kill()
        self.broker.stop(kill=True)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def rig(tmp_path: Path, model_cache: Path, request: pytest.FixtureRequest) -> Any:
    rig = Rig(tmp_path, model_cache, request.node.name[5:25])
    yield rig
    rig.close()


def run(coro: Any, timeout: float = 240.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_kill_9_during_a_burst_then_restart_answers_each_ask_once(rig: Rig) -> None:
    """40 asks; the hub is killed (SIGKILL) after its third model reply, with most asks
    received and unacknowledged; a new hub answers the rest, none twice, and device
    commands go out once. A command that waited too long (its ``sent_at`` an hour ago)
    is answered ``expired`` and not acted on; so is the last ask of the burst, fresh
    enough for the first hub but not for the second (JARVIS_MQTT_MAX_AGE_S=60): a
    command delivered again that no longer passes is answered with an error, once."""
    asks = burst("k9")
    late_id, late = asks.pop()
    late["sent_at"] = time.time() - 120

    async def scenario() -> None:
        probe = await rig.start()
        try:
            first = rig.hub()
            await rig.online(0)
            await rig.publish([*asks, (late_id, late)])
            await rig.reply(model_ids(asks)[2])
            first.signal(signal.SIGKILL)
            assert await first.exit_code() == -signal.SIGKILL
            await probe.wait_for(lambda t, p: t == f"{BASE}/availability" and p == b"offline",
                                 timeout=30)  # the broker's last will for the dead hub
            # What the broker had from the dead hub reached the probe before its will.
            replied = frozenset(loads(p)["id"] for t, p, _, _ in probe.messages
                                if t == f"{BASE}/reply")
            stale = {"text": "make coffee", "id": "stale", "sent_at": time.time() - 3600}
            await probe.publish(f"{BASE}/cmd/ask", json.dumps(stale))
            start = len(probe.messages)
            rig.hub(MQTT_MAX_AGE_S="60")
            await rig.online(start)
            for cid, _ in asks:
                await rig.reply(cid)
            for cid in (late_id, "stale"):
                await probe.wait_for(lambda t, p, cid=cid: t == f"{BASE}/error"
                                     and loads(p)["id"] == cid, timeout=30)
            await rig.settle()
        finally:
            await probe.stop()
        errors = rig.answers()[1]
        assert sorted((e["code"], e["id"]) for e in errors) == [("expired", late_id),
                                                              ("expired", "stale")]
        assert all("JARVIS_MQTT_MAX_AGE_S=60" in e["message"] for e in errors)
        assert not {"stale", late_id} & set(rig.answers()[0])
        assert not any("coffee" in t for t, _ in rig.device_messages())
        rig.check_each_once(asks, errors=errors, before_the_kill=replied)

    run(scenario())


def test_sigterm_during_a_burst_drains_then_restart_answers_each_ask_once(rig: Rig) -> None:
    """SIGTERM after the third model reply, while the fourth (a long one) is being
    generated: the hub finishes that reply, leaves the rest unacknowledged (no
    ``shutting_down`` errors), publishes ``offline`` and exits 0, and a second SIGTERM
    during the drain changes nothing. The next hub answers the rest, each once."""
    asks = burst("term", long_at=3)

    async def scenario() -> None:
        probe = await rig.start()
        try:
            first = rig.hub()
            await rig.online(0)
            await rig.publish(asks)
            await rig.reply(model_ids(asks)[2])
            mark = len(probe.messages)
            first.signal(signal.SIGTERM)
            await first.wait_line("MQTT: stopping:")
            first.signal(signal.SIGTERM)  # impatient: must not cut the drain short
            assert await first.exit_code() == 0, first.output[-3000:]
            await probe.wait_for(lambda t, p: t == f"{BASE}/availability" and p == b"offline",
                                 start=mark, timeout=30)
            # The long reply in progress was finished by the stopping hub.
            long_reply = await rig.reply(asks[3][0], timeout=10)
            start = len(probe.messages)
            rig.hub()
            await rig.online(start)
            for cid, _ in asks:
                await rig.reply(cid)
            await rig.settle()
        finally:
            await probe.stop()
        assert long_reply["latency"]["completion_tokens"] > 4 and not long_reply["cancelled"]
        assert "1 command(s) in progress get up to 20 s to finish" in first.output
        assert "again: still finishing" in first.output
        rig.check_each_once(asks)

    run(scenario())


def test_broker_restart_during_a_burst_answers_each_ask_once(rig: Rig) -> None:
    """The broker (persistence on) restarts after the third model reply; the hub
    reconnects, the broker delivers again what the hub had not acknowledged, and each
    ask is answered once, each device command published once."""
    asks = burst("brk")

    async def scenario() -> None:
        probe = await rig.start()
        try:
            hub = rig.hub()
            await rig.online(0)
            await rig.publish(asks)
            await rig.reply(model_ids(asks)[2])
            rig.broker.stop()  # SIGTERM: mosquitto saves sessions and messages
            rig.broker.start()
            for cid, _ in asks:
                await rig.reply(cid, timeout=90)
            await rig.settle()
            assert hub.proc.poll() is None
        finally:
            await probe.stop()
        rig.check_each_once(asks)

    run(scenario())


FAULTY_HUB = """
import asyncio, os, signal, sys
from jarvis.home import bridge, transport

# Fault: the broker never gets an acknowledgement, so it delivers every command again.
transport._Client.ack = lambda self, mid, qos: None

_answer = bridge.MqttBridge._answer

def answer(self, work, topic, payload):
    # Fault: Jarvis dies after the ask "lost-die" acted, before its reply goes out.
    if getattr(work.command, "id", None) != "lost-die":
        return _answer(self, work, topic, payload)
    async def die():
        await self.flush(10)  # the device command is with the broker
        os.kill(os.getpid(), signal.SIGKILL)
    asyncio.ensure_future(die())

bridge.MqttBridge._answer = answer
from jarvis.cli.main import main
sys.exit(main(["hub"]))
"""


def test_answered_but_unacknowledged_asks_are_not_answered_again(rig: Rig) -> None:
    """Fault injection: a hub whose acknowledgements never reach the broker answers 20
    asks, then dies between publishing the device command of the 21st and its reply.
    The broker delivers all 21 again to the next hub: the 20 are recognised from the
    ledger and not answered again; the 21st is answered from the ledger ("recovered")
    and its device command is not published a second time."""
    asks = burst("lost")[:20]
    asks.append(("lost-die", {"text": "make coffee", "id": "lost-die"}))
    bad = {"text": 5, "id": "lost-bad"}  # its error is an answer like any other

    async def scenario() -> dict[str, Any]:
        probe = await rig.start()
        try:
            faulty = rig.hub(FAULTY_HUB)
            await rig.online(0)
            await rig.publish([*asks[:-1], ("lost-bad", bad)])
            for cid, _ in asks[:-1]:
                await rig.reply(cid)
            await probe.wait_for(lambda t, p: t == f"{BASE}/error", timeout=30)
            await rig.publish(asks[-1:])
            assert await faulty.exit_code() == -signal.SIGKILL, faulty.output[-3000:]
            start = len(probe.messages)
            hub = rig.hub()
            await rig.online(start)
            recovered = await rig.reply("lost-die")
            await rig.settle()
            await hub.wait_line("answered from the record", timeout=5)
        finally:
            await probe.stop()
        return recovered

    recovered = run(scenario())
    assert recovered["recovered"] is True and recovered["text"] == "Starting the coffee machine."
    assert [a["device"] for a in recovered["actions"]] == ["coffee_machine"]
    errors = rig.answers()[1]
    assert [(e["code"], e["id"]) for e in errors] == [("invalid_payload", "lost-bad")]
    rig.check_each_once(asks, errors=errors)
    assert rig.device_messages()[("homeassistant-cmd/switch/coffee_plug/set", b"ON")] == 1
