"""Hostile payloads at a real ``jarvis hub`` process: every command topic, random bytes,
invalid UTF-8, lone surrogates in every string field, wrong types, deep nesting, huge
values, retained and not. Every payload gets exactly one answer (a reply, a result,
``sayFinished`` or an error), or none when it is not for this Jarvis (a Hermes say for
another site, a retained command being cleared); the process stays up and still
answers a normal ask; a 900-deep payload costs one log line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jarvis.home.schema import HERMES_SAY, PayloadError, Topics, parse_command
from tests.support.mqtt import (
    HubProcess,
    LoopThread,
    Mosquitto,
    Probe,
    loads,
    need_mosquitto,
    process_env,
)

pytestmark = pytest.mark.slow

SITE = "fuzz"
BASE = f"jarvis/{SITE}"
ANSWERS = (f"{BASE}/reply", f"{BASE}/result", f"{BASE}/error", "hermes/tts/sayFinished")
TOPICS = [f"{BASE}/cmd/{name}" for name in ("ask", "say", "mute", "cancel", "reload",
                                            "metrics", "launch", "")] + [HERMES_SAY]
FIELDS = ["text", "id", "conversation_id", "target", "siteId", "sessionId", "mute", "speak",
          "max_tokens", "sent_at", "lang"]

NASTY = st.sampled_from(["\ud800", "a\udfffb", "\udc80\ud800", "fuzz", "x" * 300, "", " "])
STRINGS = NASTY | st.text(max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | STRINGS)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(STRINGS, inner, max_size=3), max_leaves=8)


def _encode(data: dict[str, Any]) -> bytes:
    tokens = data.get("max_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and 3 < tokens <= 4096:
        data["max_tokens"] = 2  # a valid ask must stay cheap
    return json.dumps(data).encode()  # ASCII: lone surrogates become \\ud800 escapes


def _deep(field: str, depth: int, extra: str = '"id": "deep", ') -> bytes:
    """``field`` nested ``depth`` levels deep (arrays in arrays)."""
    nested = "[" * depth + "]" * depth
    return ('{"text": "hi", ' + extra + json.dumps(field) + ": " + nested + "}").encode()


def _valid_but(field: str, value: Any, text: str, cid: Any) -> bytes:
    """A command that would be served, but for ``field``: ``value``."""
    return _encode({"text": text, "id": cid, "mute": True, field: value})


VALID_BUT_ONE = st.builds(_valid_but, st.sampled_from(FIELDS), VALUES,
                          st.sampled_from(["Say hi.", "turn on the kitchen light", " "]),
                          st.sampled_from(["v1", 7, "\ud800", None]))

PAYLOADS = st.one_of(
    VALID_BUT_ONE,
    VALID_BUT_ONE,
    st.dictionaries(st.sampled_from(FIELDS) | STRINGS, VALUES, max_size=5).map(_encode),
    st.binary(max_size=200),
    st.binary(max_size=40).map(lambda b: b'{"text": "hi\xff' + b + b'"}'),  # not UTF-8
    st.tuples(st.sampled_from(FIELDS), st.integers(30, 1000)).map(lambda a: _deep(*a)),
    st.sampled_from([64 * 1024 - 20, 64 * 1024 + 1]).map(
        lambda n: json.dumps({"text": "a" * n}).encode()),
    VALUES.map(lambda v: json.dumps(v).encode()),
)


def expected_answers(topic: str, payload: bytes, retain: bool) -> int:
    """0 for what is not for this Jarvis, else 1."""
    if retain and not payload:
        return 0  # clears a retained message
    try:
        command = parse_command(topic, payload, Topics(BASE), retain=retain, site=SITE)
    except PayloadError:
        return 1
    return 0 if command is None else 1


class Fuzz:
    def __init__(self, loop: LoopThread, hub: HubProcess, probe: Probe) -> None:
        self.loop, self.hub, self.probe = loop, hub, probe
        self.sent = 0

    async def settle(self) -> None:
        """A model ask answered after everything sent before it."""
        self.sent += 1
        cid = f"settle-{self.sent}"
        await self.probe.publish(f"{BASE}/cmd/ask", json.dumps(
            {"text": "Say ok.", "id": cid, "max_tokens": 1}))
        await self.probe.wait_for(lambda t, p: t == f"{BASE}/reply" and loads(p)["id"] == cid,
                                  timeout=60)

    def answers_since(self, start: int) -> list[tuple[str, bytes]]:
        """Answers from ``start`` on, the settling asks' replies left out."""
        out = []
        for topic, payload, _, _ in self.probe.messages[start:]:
            if topic not in ANSWERS:
                continue
            try:
                cid = loads(payload).get("id")
            except ValueError:
                cid = None
            if not (isinstance(cid, str) and cid.startswith("settle-")):
                out.append((topic, payload))
        return out


@pytest.fixture(scope="module")
def fuzz(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    need_mosquitto()
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    broker = Mosquitto(tmp / "broker")
    broker.start()

    async def up() -> Fuzz:
        hub = HubProcess(process_env(broker, tmp, SITE=SITE), tmp)
        probe = await Probe(broker.port).start(f"{BASE}/#", "hermes/#")
        await probe.wait_for(lambda t, p: t == f"{BASE}/availability" and p == b"online",
                             timeout=90)
        return Fuzz(loop_thread, hub, probe)

    rig = loop_thread.run(up(), 120)
    try:
        yield rig
    finally:
        loop_thread.run(rig.probe.stop())
        rig.hub.kill()
        broker.stop(kill=True)


def _surrogate_examples(test: Any) -> Any:
    for topic, payload in SURROGATE_CASES:
        test = example(topic=topic, payload=payload, retain=False)(test)
    return test


SURROGATE_CASES = [  # the string fields that once killed the task building the answer
    (f"{BASE}/cmd/ask", b'{"text": "hi", "id": "\\ud800"}'),
    (f"{BASE}/cmd/ask", b'{"text": "hi \\ud800", "id": "s1"}'),
    (f"{BASE}/cmd/ask", b'{"text": "hi", "id": "s2", "conversation_id": "\\ud800"}'),
    (f"{BASE}/cmd/cancel", b'{"id": "s3", "target": "\\udfff"}'),
    (HERMES_SAY, b'{"text": "hi", "siteId": "\\ud800"}'),
    (HERMES_SAY, b'{"text": "hi", "sessionId": "\\ud800", "id": "s4"}'),
    (HERMES_SAY, b'{"text": "hi", "id": "\\udc80"}'),
]


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(topic=st.sampled_from(TOPICS), payload=PAYLOADS, retain=st.booleans())
@_surrogate_examples
def test_every_payload_gets_exactly_one_answer(fuzz: Fuzz, topic: str, payload: bytes,
                                               retain: bool) -> None:
    expected = expected_answers(topic, payload, retain)

    async def scenario() -> list[tuple[str, bytes]]:
        start = len(fuzz.probe.messages)
        await fuzz.probe.publish(topic, payload, retain=retain)
        if retain and payload:
            await fuzz.probe.publish(topic, b"", retain=True)  # clear it again
        await fuzz.settle()
        # Commands other than asks run in tasks of their own (reload reads a file in a
        # thread), so their answer may come after the settling ask's: wait for it.
        while True:
            seen = len(fuzz.probe.messages)
            if len(fuzz.answers_since(start)) >= expected:
                return fuzz.answers_since(start)
            await fuzz.probe.wait_for(lambda t, _: t in ANSWERS, start=seen, timeout=30)

    answers = fuzz.loop.run(scenario(), 90)
    assert len(answers) == expected, answers
    assert fuzz.hub.proc.poll() is None, fuzz.hub.output[-3000:]
    for _, body in answers:
        assert len(body) < 2000  # an answer never echoes the payload


def test_a_900_deep_hermes_payload_logs_one_line(fuzz: Fuzz) -> None:
    """900 levels of nesting in each field of a Hermes say: one error and one log line
    each (no traceback of thousands of frames)."""
    fields = ["text", "id", "siteId", "sessionId", "lang"]

    async def scenario() -> tuple[list[str], list[tuple[str, bytes]]]:
        await fuzz.settle()
        start, lines = len(fuzz.probe.messages), len(fuzz.hub.lines)
        for field in fields:
            await fuzz.probe.publish(HERMES_SAY, _deep(field, 900, extra=""))
        await fuzz.settle()
        return fuzz.hub.lines[lines:], fuzz.answers_since(start)

    logged, answers = fuzz.loop.run(scenario(), 90)
    assert [t for t, _ in answers] == [f"{BASE}/error"] * len(fields)
    assert {loads(b)["code"] for _, b in answers} == {"invalid_payload"}
    about = [line for line in logged if HERMES_SAY in line]
    assert len(about) == len(fields) and all("deeper than 32" in line for line in about)
    assert len(logged) < 3 * len(fields), logged[:20]  # nothing else: no traceback


def test_after_the_fuzz_a_normal_ask_is_answered(fuzz: Fuzz) -> None:
    async def scenario() -> dict[str, Any]:
        await fuzz.probe.publish(f"{BASE}/cmd/mute", b'{"mute": false}')  # the fuzz may
        await fuzz.probe.publish(f"{BASE}/cmd/ask", json.dumps(           # have muted it
            {"text": "turn on the kitchen light", "id": "normal"}))
        _, body = await fuzz.probe.wait_for(
            lambda t, p: t == f"{BASE}/reply" and loads(p)["id"] == "normal", timeout=60)
        result: dict[str, Any] = loads(body)
        return result

    reply = fuzz.loop.run(scenario(), 90)
    assert reply["actions"][0]["device"] == "kitchen_light"
    assert fuzz.hub.proc.poll() is None
    assert "Traceback" not in fuzz.hub.output and "never retrieved" not in fuzz.hub.output
