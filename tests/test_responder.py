"""The one responder with the real starter model (greedy, 8 tokens by default) and the
real example device map: one TURN_END per turn, device requests without the model, bad
input, a failing backend, interruption, the repetition guard, "start over" and idle
expiry keeping the context cache hitting, and the same error words on every entry point.

The backend is loaded once per module (``backend`` in conftest.py, on ``loop_thread``);
each test builds its own responder (fresh conversations) over it with
:func:`~jarvis.voice.assembly.make_responder`. Fakes appear only as fault-injection
wrappers around the real backend."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from jarvis.devices.device_map import DeviceCommand, load_device_map
from jarvis.errors import BackendError
from jarvis.home.hub import AskFailed, MqttFrontend
from jarvis.home.schema import HERMES_SAY, PayloadError, Topics, parse_command
from jarvis.llm.base import ChatMessage, GenerationOptions, GenerationStats, TokenStream
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.voice.assembly import make_responder
from jarvis.voice.conversations import RESET_REPLY, Conversations
from jarvis.voice.events import EventType, Outcome, Source, Stage, TurnEvent
from jarvis.voice.turn import MAX_REQUEST_CHARS, RequestError, Turn, TurnResult, validate_request
from tests.support.mqtt import TEST_SYSTEM_PROMPT, LoopThread, hub_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DEVICES = ROOT / "config" / "devices.example.toml"
TIMEOUT = 120.0


# --------------------------------------------------------------------------- seams


class Recording:
    """The real backend, noting the messages of every request (a seam for faults)."""

    def __init__(self, real: LlamaCppBackend) -> None:
        self.real = real
        self.requests: list[list[ChatMessage]] = []

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> TokenStream:
        self.requests.append(list(messages))
        return self.real.stream_chat(messages, options)

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        self.real.prepare(history)

    async def start(self) -> None:
        raise AssertionError("the shared backend is started by its fixture")

    async def close(self) -> None:
        raise AssertionError("the shared backend is closed by its fixture")

    def info(self) -> dict[str, Any]:
        return self.real.info()


class Scripted:
    """A token stream that says ``pieces`` (what a broken model would say)."""

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)
        self.stats: GenerationStats | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        for piece in self.pieces:
            if self.cancelled:
                break
            await asyncio.sleep(0)
            yield piece
        self.stats = GenerationStats(0, 0, len(self.pieces), "stop", 0.0, 0.0)


class FailingMidStream:
    """Fault injection: the real stream, broken by a BackendError after ``after`` pieces."""

    def __init__(self, real: TokenStream, after: int) -> None:
        self.real = real
        self.after = after
        self.stats: GenerationStats | None = None

    def cancel(self) -> None:
        self.real.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        inner = self.real.__aiter__()
        async with contextlib.aclosing(inner):
            n = 0
            async for piece in inner:
                yield piece
                n += 1
                if n >= self.after:
                    self.real.cancel()
                    raise BackendError("llama.cpp decode failed: injected fault")


class FailsOnce(Recording):
    """The first request breaks mid-stream; the later ones are the real model's."""

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> TokenStream:
        stream = super().stream_chat(messages, options)
        return FailingMidStream(stream, after=2) if len(self.requests) == 1 else stream


class CopiesItself(Recording):
    """Fault injection: what the starter model does once an odd reply sits in its
    history. With ``repeat`` set, every request that carries history (``always``: every
    request) is answered with ``repeat``, streamed word by word."""

    def __init__(self, real: LlamaCppBackend, *, always: bool = False) -> None:
        super().__init__(real)
        self.repeat = ""
        self.always = always

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> TokenStream:
        has_history = any(m.role == "assistant" for m in messages)
        if self.repeat and (has_history or self.always):
            self.requests.append(list(messages))
            words = self.repeat.split(" ")
            return Scripted([words[0]] + [" " + w for w in words[1:]])
        return super().stream_chat(messages, options)


# --------------------------------------------------------------------------- helpers


class Harness:
    """A responder with its own conversations over the shared backend (or a wrapper
    around it), the events it emitted and the device commands it sent."""

    def __init__(self, loop_thread: LoopThread, backend: Any, tmp: Path) -> None:
        self.loop_thread = loop_thread
        self.settings = hub_settings(tmp)
        self.responder, self.tracker = make_responder(backend, self.settings,
                                                      load_device_map(EXAMPLE_DEVICES))
        self.events: list[TurnEvent] = []
        self.responder.bus.subscribe(self.events.append)
        self.sent: list[tuple[DeviceCommand, ...]] = []
        self.responder.actuator = lambda commands: self.sent.append(tuple(commands))

    def run(self, coro: Any) -> Any:
        return self.loop_thread.run(coro, TIMEOUT)

    def turn(self, text: str, conversation_id: str | None = None,
             source: Source = Source.CLI, **kw: Any) -> tuple[Turn, TurnResult]:
        turn = Turn(source, conversation_id, request=text, **kw)
        return turn, self.run(self.responder.respond(turn))

    def ask(self, text: str, conversation_id: str | None = None, **kw: Any) -> TurnResult:
        return self.turn(text, conversation_id, **kw)[1]

    def of(self, turn_id: str) -> list[TurnEvent]:
        return [e for e in self.events if e.turn_id == turn_id]

    def ends(self) -> list[TurnEvent]:
        return [e for e in self.events if e.type is EventType.TURN_END]

    def history(self, conversation_id: str) -> list[tuple[str, str]]:
        assert conversation_id in self.responder.conversations
        return list(self.responder.conversations.get(conversation_id).conversation.turns)


def request_error(text: str) -> str:
    with pytest.raises(RequestError) as info:
        validate_request(text)
    return str(info.value)


def system_prompt_tokens(backend: LlamaCppBackend) -> int:
    n = len(backend.engine.system_prefix)
    assert n > 10  # the test system prompt is a sentence: this is a real prefix
    return n


def assert_hit_the_system_prompt(result: TurnResult, backend: LlamaCppBackend) -> None:
    stats = result.stats
    assert stats["cache_hit"] is True, stats
    assert isinstance(stats["cached_tokens"], int)
    assert stats["cached_tokens"] >= system_prompt_tokens(backend), stats


BAD_REQUESTS = [
    pytest.param("", id="empty"),
    pytest.param(" \n\t ", id="blank"),
    pytest.param("x" * (MAX_REQUEST_CHARS + 1), id="too-long"),
]


# --------------------------------------------------------------------------- TURN_END


def test_every_turn_ends_with_one_turn_end_naming_its_id_source_and_outcome(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    h = Harness(loop_thread, backend, tmp_path)
    turns = [
        h.turn("What is the capital of France?", "a", Source.MQTT),
        h.turn("turn on the kitchen light", None, Source.CLI),
        h.turn("start over", "a", Source.MICROPHONE),
        h.turn("", "a", Source.MQTT),
        h.turn("Name a yellow fruit.", "b", Source.WYOMING),
    ]
    ignored = Turn(Source.MICROPHONE, "mic", transcript="la la la")
    turns.append((ignored, h.responder.ignore(ignored)))
    outcomes = [result.outcome for _, result in turns]
    assert outcomes == [Outcome.ANSWERED, Outcome.ANSWERED, Outcome.ANSWERED, Outcome.FAILED,
                        Outcome.ANSWERED, Outcome.IGNORED]
    assert len({turn.id for turn, _ in turns}) == len(turns)
    assert len(h.ends()) == len(turns)
    for turn, result in turns:
        assert result.turn_id == turn.id
        mine = h.of(turn.id)
        ends = [e for e in mine if e.type is EventType.TURN_END]
        assert len(ends) == 1, [e.type for e in mine]
        end = ends[0]
        assert mine[-1] is end  # nothing of a turn comes after its end
        assert end.source is turn.source
        assert end.outcome is result.outcome
        assert end.conversation_id == (turn.conversation_id or "")
        assert end.text == result.reply
        assert all(e.source is turn.source for e in mine)
    # The latency tracker counts the answered turns and the failed one, nothing else.
    summary = h.tracker.summary()
    assert summary.count + summary.errors == 5 and summary.errors == 1


# --------------------------------------------------------------------------- devices


def test_a_device_request_is_answered_without_the_model_and_acts_once(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    recording = Recording(backend)
    h = Harness(loop_thread, recording, tmp_path)
    turn, result = h.turn("turn on the kitchen light", "kitchen")
    assert result.outcome is Outcome.ANSWERED and result.intent == "local"
    assert recording.requests == []  # the chat model was not asked
    kinds = [e.type for e in h.of(turn.id)]
    assert EventType.FIRST_TOKEN not in kinds
    assert kinds == [EventType.THINKING, EventType.TURN_END]
    assert len(h.sent) == 1 and len(h.sent[0]) == 1
    command = h.sent[0][0]
    assert (command.device.id, command.action.name) == ("kitchen_light", "on")
    assert command.action.topic == "zigbee2mqtt/kitchen_light/set"
    assert json.loads(command.action.payload) == {"state": "ON"}
    assert result.actions == [command.describe()]
    assert h.of(turn.id)[-1].data["actions"] == [command.describe()]
    assert result.reply and "kitchen" in result.reply.lower()
    assert h.history("kitchen") == [("turn on the kitchen light", result.reply)]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text", BAD_REQUESTS)
def test_a_bad_request_fails_at_received_with_the_validation_message(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path, text: str
) -> None:
    recording = Recording(backend)
    h = Harness(loop_thread, recording, tmp_path)
    turn, result = h.turn(text, "c", Source.MQTT)
    message = request_error(text)
    assert result.outcome is Outcome.FAILED
    assert result.failed_stage is Stage.RECEIVED
    assert result.error == message and result.error_code == "invalid_request"
    events = h.of(turn.id)
    assert [e.type for e in events] == [EventType.ERROR, EventType.TURN_END]
    error, end = events
    assert error.stage is Stage.RECEIVED and error.text == message
    assert end.outcome is Outcome.FAILED and end.stage is Stage.RECEIVED
    assert end.data["error"] == message and end.data["code"] == "invalid_request"
    assert recording.requests == [] and not h.sent


# --------------------------------------------------------------------------- faults


def test_a_backend_failing_mid_stream_fails_the_turn_at_llm_and_the_next_turn_works(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    failing = FailsOnce(backend)
    h = Harness(loop_thread, failing, tmp_path)
    turn, result = h.turn("What is the capital of France?", "c", Source.MQTT)
    assert result.outcome is Outcome.FAILED and result.failed_stage is Stage.LLM
    assert "injected fault" in result.error and result.error_code == "llm_failed"
    events = h.of(turn.id)
    assert [e.type for e in events][-2:] == [EventType.ERROR, EventType.TURN_END]
    assert events[-2].stage is Stage.LLM and "injected fault" in events[-2].text
    assert events[-1].outcome is Outcome.FAILED and events[-1].stage is Stage.LLM
    assert h.history("c") == []  # a failed reply is not remembered

    again = h.ask("What is the capital of France?", "c", source=Source.MQTT)
    assert again.outcome is Outcome.ANSWERED and again.reply.strip()
    assert again.stats["finish_reason"] in ("stop", "length")
    assert len(failing.requests) == 2
    assert h.history("c") == [("What is the capital of France?", again.reply)]
    assert [e.outcome for e in h.ends()] == [Outcome.FAILED, Outcome.ANSWERED]


STORY = "Tell me a long story about a brave little dragon."


def interrupt_a_story(h: Harness) -> tuple[Turn, TurnResult, str, bool]:
    """A text turn interrupted (like MQTT ``cmd/cancel``) as soon as the first piece of
    its reply is released; returns the turn, its result, what was released and what
    ``interrupt()`` said."""
    responder = h.responder

    async def run() -> tuple[Turn, TurnResult, str, bool]:
        released: list[str] = []
        first = asyncio.Event()

        def on_text(piece: str) -> None:
            released.append(piece)
            first.set()

        turn = Turn(Source.MQTT, "story", request=STORY, max_tokens=96, on_text=on_text)
        task = asyncio.create_task(responder.respond(turn))
        await asyncio.wait_for(first.wait(), TIMEOUT)
        assert responder.busy
        stopped = responder.interrupt()
        result = await asyncio.wait_for(task, TIMEOUT)
        return turn, result, "".join(released), stopped

    turn, result, said, stopped = h.run(run())
    assert said.strip()  # something was released before the interruption
    return turn, result, said, stopped


def test_interrupt_returns_a_cancelled_result_and_frees_the_model(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    h = Harness(loop_thread, backend, tmp_path)
    turn, result, _, stopped = interrupt_a_story(h)
    assert stopped is True
    assert result.outcome is Outcome.CANCELLED and result.interrupted
    assert result.stats.get("finish_reason") != "length"  # it did not run to the end
    ends = [e for e in h.of(turn.id) if e.type is EventType.TURN_END]
    assert len(ends) == 1 and h.of(turn.id)[-1] is ends[0]
    assert ends[0].outcome is Outcome.CANCELLED and ends[0].data["interrupted"] is True
    assert not h.responder.busy and h.responder.interrupt() is False
    # The model is free again: the next turn is answered.
    assert h.ask("What is the capital of France?", "story").outcome is Outcome.ANSWERED


def test_interrupt_keeps_what_was_released_so_far(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    h = Harness(loop_thread, backend, tmp_path)
    turn, result, said, _ = interrupt_a_story(h)
    assert result.reply == said.strip()
    assert h.of(turn.id)[-1].text == said.strip()
    assert h.history("story") == [(STORY, said.strip())]


# --------------------------------------------------------------------------- repetition


def test_a_repeated_opening_is_regenerated_without_history_and_never_stored(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    model = CopiesItself(backend)
    h = Harness(loop_thread, model, tmp_path)
    q1, q2 = "What is the capital of France?", "Name a yellow fruit."
    first = h.ask(q1, "c")
    assert first.outcome is Outcome.ANSWERED and not first.regenerated
    opening_words = first.reply.split()[:4]
    assert len(opening_words) == 4, first.reply  # long enough to have an opening
    model.repeat = " ".join(opening_words) + " and so on, whatever you asked."

    released: list[str] = []
    turn, second = h.turn(q2, "c", Source.MQTT, on_text=released.append)
    assert second.outcome is Outcome.ANSWERED
    assert second.regenerated and h.responder.regenerated == 1
    assert h.of(turn.id)[-1].data["regenerated"] is True
    # Asked once with the history (answered with the copy), then once without it.
    with_history, fresh = model.requests[-2:]
    assert [m.role for m in with_history] == ["system", "user", "assistant", "user"]
    assert [(m.role, m.content) for m in fresh] == [("system", TEST_SYSTEM_PROMPT),
                                                   ("user", q2)]
    assert "whatever you asked" not in second.reply
    assert "".join(released) == second.reply  # nothing of the copy was let out
    assert second.reply.strip()
    assert_hit_the_system_prompt(second, backend)  # the fresh request hit the cache
    assert h.history("c") == [(q1, first.reply), (q2, second.reply.strip())]


@pytest.mark.parametrize(("reply", "flag"), [
    pytest.param(None, "repeated", id="copied-opening"),
    pytest.param("I like cats and I like cats and I like cats and", "looped", id="loop"),
])
def test_a_repeated_or_looping_reply_is_not_stored_in_the_history(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path,
    reply: str | None, flag: str
) -> None:
    model = CopiesItself(backend, always=True)  # even without history: no way out
    h = Harness(loop_thread, model, tmp_path)
    first = h.ask("What is the capital of France?", "c")
    assert len(first.reply.split()) >= 4, first.reply
    model.repeat = reply or " ".join(first.reply.split()[:4]) + " and so on."
    result = h.ask("Name a yellow fruit.", "c")
    assert result.outcome is Outcome.ANSWERED
    assert result.stats[flag] is True
    assert result.reply.strip()
    if flag == "looped":
        assert result.reply == "I like cats and I like cats"  # cut where the loop was seen
        assert not result.regenerated  # nothing in the history to blame
    else:
        assert result.regenerated and result.reply == model.repeat
    assert h.history("c") == [("What is the capital of France?", first.reply)]


# --------------------------------------------------------------------------- lifecycle


def test_start_over_empties_the_history_and_the_cache_keeps_hitting(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    model = Recording(backend)
    h = Harness(loop_thread, model, tmp_path)
    first = h.ask("What is the capital of France?", "s")
    assert h.history("s") == [("What is the capital of France?", first.reply)]

    reset = h.ask("Start over.", "s", source=Source.MICROPHONE)
    assert reset.outcome is Outcome.ANSWERED and reset.intent == "control"
    assert reset.reply == RESET_REPLY
    assert h.history("s") == []

    after = h.ask("Name a yellow fruit.", "s")
    assert after.outcome is Outcome.ANSWERED
    assert [m.role for m in model.requests[-1]] == ["system", "user"]
    assert_hit_the_system_prompt(after, backend)
    assert h.history("s") == [("Name a yellow fruit.", after.reply)]

    both = h.ask("new conversation, what is two plus two?", "s")
    assert both.request == "what is two plus two?" and both.intent == "chat"
    assert [(m.role, m.content) for m in model.requests[-1]] == [
        ("system", TEST_SYSTEM_PROMPT), ("user", "what is two plus two?")]
    assert_hit_the_system_prompt(both, backend)
    assert h.history("s") == [("what is two plus two?", both.reply)]


def test_an_idle_conversation_expires_and_starts_from_the_cached_system_prompt(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path
) -> None:
    model = Recording(backend)
    h = Harness(loop_thread, model, tmp_path)
    now = [0.0]
    h.responder.conversations = Conversations(
        TEST_SYSTEM_PROMPT, history_turns=8, idle_s=h.settings.pipeline.conversation_idle_s,
        clock=lambda: now[0])
    idle_s = h.responder.conversations.idle_s
    assert idle_s == 300.0  # JARVIS_CONVERSATION_IDLE_S's default

    first = h.ask("What is the capital of France?", "kitchen")
    now[0] += idle_s - 1  # not yet
    second = h.ask("Name a yellow fruit.", "kitchen")
    assert [m.role for m in model.requests[-1]] == ["system", "user", "assistant", "user"]
    assert len(h.history("kitchen")) == 2 and h.responder.conversations.expired == 0

    now[0] += idle_s + 1  # silence: the next turn starts a fresh conversation
    third = h.ask("What is two plus two?", "kitchen")
    assert h.responder.conversations.expired == 1
    assert [(m.role, m.content) for m in model.requests[-1]] == [
        ("system", TEST_SYSTEM_PROMPT), ("user", "What is two plus two?")]
    assert_hit_the_system_prompt(third, backend)
    assert h.history("kitchen") == [("What is two plus two?", third.reply)]
    assert first.outcome is second.outcome is third.outcome is Outcome.ANSWERED


# --------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("text", BAD_REQUESTS)
def test_mqtt_and_cli_give_the_same_error_words(
    loop_thread: LoopThread, backend: LlamaCppBackend, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], text: str
) -> None:
    message = request_error(text)
    topics = Topics("jarvis/test")
    # MQTT: the bridge's parser, for an ask and for a Hermes say.
    for topic in (topics.cmd_prefix + "ask", topics.cmd_prefix + "say", HERMES_SAY):
        with pytest.raises(PayloadError) as parsed:
            parse_command(topic, json.dumps({"text": text, "id": 7}).encode(), topics)
        assert (parsed.value.code, parsed.value.message) == ("invalid_request", message)
    # MQTT: an ask handed straight to the frontend (the responder's own check).
    frontend = MqttFrontend(*make_responder(backend, hub_settings(tmp_path),
                                            load_device_map(EXAMPLE_DEVICES)))
    with pytest.raises(AskFailed) as asked:
        loop_thread.run(frontend.ask(text, conversation_id="x"), TIMEOUT)
    assert (asked.value.code, str(asked.value)) == ("invalid_request", message)
    # CLI: `jarvis ask TEXT`, checked before any model is loaded.
    from jarvis.cli.main import main

    assert main(["ask", text]) == 2
    assert capsys.readouterr().err == f"jarvis: error: {message}\n"

