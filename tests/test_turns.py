"""The pure parts of a turn: the repetition guard, "start over", conversations with a
lifecycle, the speculation gate, request validation and the event bus. No models."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jarvis.voice.conversations import Conversations, split_reset
from jarvis.voice.events import EventBus, EventType, Source, TurnEvent
from jarvis.voice.repetition import RepeatedOpening, ReplyGuard, normalized_words, opening
from jarvis.voice.turn import (
    MAX_REQUEST_CHARS,
    RequestError,
    SpeculationGate,
    SpeculationTimeout,
    validate_request,
)

EARLIER = ["A good man is someone who knows how to cook."]


def feed_all(guard: ReplyGuard, pieces: list[str]) -> str:
    """What the guard releases for ``pieces`` fed in order, then finished."""
    return "".join(guard.feed(p) for p in pieces) + guard.finish()


def word_pieces(text: str) -> list[str]:
    """``text`` as a model streams it: one word (with its leading space) at a time."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


# --------------------------------------------------------------------------- ReplyGuard


def test_guard_holds_the_opening_until_it_is_complete() -> None:
    guard = ReplyGuard(EARLIER)
    assert guard.feed("The") == ""
    assert guard.feed(" kitchen") == ""
    assert guard.feed(" light is") == ""  # "is" may still grow: three words are complete
    released = guard.feed(" on")  # four complete words: the opening is checked
    assert released == "The kitchen light is"  # released at once: it feeds the first audio
    assert guard.text() == "The kitchen light is"
    assert released + guard.finish() == "The kitchen light is on"


def test_guard_holds_words_back_for_the_loop_check_after_the_first_audio() -> None:
    guard = ReplyGuard(EARLIER, eager_chars=10)
    released = guard.feed("The kitchen light is on ")  # past 10 characters from here on
    assert released == "The kitchen light is on"
    released = guard.feed("and the hall light is off ")
    assert released == " and the hall "  # "light is off" (ngram - 1 words) stay held
    assert guard.finish() == "light is off "


def test_guard_raises_on_a_repeated_opening_before_releasing_anything() -> None:
    guard = ReplyGuard(EARLIER)
    released = []
    with pytest.raises(RepeatedOpening, match="a good man is"):
        for piece in word_pieces("a Good, man is kind and patient."):  # case, punctuation
            released.append(guard.feed(piece))
    assert "".join(released) == ""


def test_guard_without_raising_marks_the_repeat_and_releases_it() -> None:
    guard = ReplyGuard(EARLIER, raise_on_repeat=False)
    text = "A good man is kind."
    assert feed_all(guard, word_pieces(text)) == text
    assert guard.repeated and not guard.looped


def test_guard_ignores_an_opening_that_only_shares_three_words() -> None:
    guard = ReplyGuard(EARLIER)
    text = "A good man was here."
    assert feed_all(guard, word_pieces(text)) == text
    assert not guard.repeated and not guard.looped


def test_guard_catches_a_repeated_opening_after_a_bullet_whatever_the_pieces() -> None:
    text = "- A good man is someone kind."
    with pytest.raises(RepeatedOpening):
        feed_all(ReplyGuard(EARLIER), [text])  # one piece: raises
    with pytest.raises(RepeatedOpening):
        feed_all(ReplyGuard(EARLIER), word_pieces(text))  # word by word: must raise too


def test_guard_cuts_a_loop_before_the_repeat() -> None:
    guard = ReplyGuard([], eager_chars=0)
    released = feed_all(guard, word_pieces("I like cats and I like cats and I like cats."))
    assert released == "I like cats and "
    assert guard.looped
    assert guard.feed(" more words after the loop") == ""  # nothing more once cut
    assert guard.finish() == ""


def test_guard_cuts_an_early_loop_where_it_is_found() -> None:
    # Within the first characters (the first audio) words are not held back: the loop
    # is cut as soon as it is seen, a few words into the repeat.
    guard = ReplyGuard([])
    released = feed_all(guard, word_pieces("I like cats and I like cats and I like cats."))
    assert released == "I like cats and I like cats" and guard.looped


def test_guard_cuts_a_loop_that_arrives_in_one_piece() -> None:
    guard = ReplyGuard([])
    assert feed_all(guard, ["Sure. Turn it on, turn it on, turn it on, turn it on."]) \
        == "Sure. Turn it on, "
    assert guard.looped


def test_guard_releases_a_short_reply_at_the_end() -> None:
    guard = ReplyGuard(EARLIER)
    assert guard.feed("Hi there") == ""
    assert guard.finish() == "Hi there"
    assert not guard.looped and not guard.repeated


_CORE = st.text("abcdefghijklmnopqrstuvwxyz0123456789'", min_size=1, max_size=8).filter(
    lambda w: w.strip("'") != "")
_SEP = st.sampled_from([" ", "  ", "\n", " \n ", "\t"])
_PUNCT = st.sampled_from(["", "", ",", ".", "!", "?", ";", ":", '"'])


@st.composite
def _normal_reply(draw: st.DrawFn) -> str:
    """A reply with no repeated word at all (so no repeated 4-gram), in mixed case,
    with punctuation and odd whitespace."""
    cores = draw(st.lists(_CORE, unique_by=lambda w: w.replace("'", ""), max_size=30))
    parts = []
    for core in cores:
        word = draw(st.sampled_from([core, core.capitalize(), core.upper()]))
        parts.append(draw(_PUNCT) + word + draw(_PUNCT) + draw(_SEP))
    return draw(st.sampled_from(["", " ", "\n"])) + "".join(parts).rstrip(" \t")


@settings(max_examples=300, deadline=None)
@given(text=_normal_reply(), earlier=st.lists(_normal_reply(), max_size=3), data=st.data())
def test_guard_releases_all_of_a_normal_reply_whatever_the_pieces(
    text: str, earlier: list[str], data: st.DataObject
) -> None:
    mine = opening(text)
    assume(mine is None or all(opening(e) != mine for e in earlier))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=20)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert "".join(pieces) == text
    guard = ReplyGuard(earlier)
    assert feed_all(guard, pieces) == text
    assert guard.text() == text
    assert not guard.looped and not guard.repeated


@settings(max_examples=150, deadline=None)
@given(text=_normal_reply(), data=st.data())
def test_guard_raises_on_a_repeated_opening_whatever_the_pieces(
    text: str, data: st.DataObject
) -> None:
    assume(len(normalized_words(text)) >= 4)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=20)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    guard = ReplyGuard([text.upper() + " and then something else"])
    released = []
    with pytest.raises(RepeatedOpening):
        for piece in pieces:
            released.append(guard.feed(piece))
        guard.finish()
    assert "".join(released) == ""


# --------------------------------------------------------------------------- split_reset


@pytest.mark.parametrize(("text", "expected"), [
    ("start over", (True, "")),
    ("Start over.", (True, "")),
    ("new conversation, what's the time?", (True, "what's the time?")),
    ("Okay Jarvis, let's start again. Lights off.", (True, "Lights off.")),
    ("forget everything", (True, "")),
    ("start the oven", (False, "start the oven")),
    ("start overtime mode", (False, "start overtime mode")),
    ("I want to start over", (False, "I want to start over")),
    ("what is a new conversation?", (False, "what is a new conversation?")),
])
def test_split_reset(text: str, expected: tuple[bool, str]) -> None:
    assert split_reset(text) == expected


# --------------------------------------------------------------------------- Conversations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def conversations(clock: Clock | None = None, **kw: float) -> Conversations:
    return Conversations("You are Jarvis.", history_turns=8,
                         idle_s=kw.pop("idle_s", 300.0), clock=clock or Clock(),
                         max_conversations=int(kw.pop("max_conversations", 64)))


def test_conversation_expires_after_idle_s_of_silence() -> None:
    clock = Clock()
    convs = conversations(clock)
    convs.get("kitchen").conversation.add_turn("hi", "hello")
    clock.now += 299.0  # still alive, and this use starts the idle time again
    assert convs.get("kitchen").conversation.turns == [("hi", "hello")]
    clock.now += 299.0
    assert convs.get("kitchen").conversation.turns == [("hi", "hello")]
    assert convs.expired == 0
    clock.now += 300.5
    fresh = convs.get("kitchen").conversation
    assert fresh.turns == [] and fresh.system_prompt == "You are Jarvis."
    assert convs.expired == 1


def test_a_conversation_in_use_does_not_expire() -> None:
    clock = Clock()
    convs = conversations(clock)

    async def run() -> None:
        entry = convs.get("kitchen")
        entry.conversation.add_turn("hi", "hello")
        async with entry.lock:
            clock.now += 1000.0
            assert convs.get("kitchen").conversation.turns == [("hi", "hello")]
        assert convs.expired == 0

    asyncio.run(run())


def test_zero_idle_s_never_expires() -> None:
    clock = Clock()
    convs = conversations(clock, idle_s=0.0)
    convs.get("a").conversation.add_turn("hi", "hello")
    clock.now += 10**6
    assert convs.get("a").conversation.turns == [("hi", "hello")]


def test_reset_starts_afresh_and_leaves_others_alone() -> None:
    convs = conversations()
    convs.get("a").conversation.add_turn("hi", "hello")
    convs.get("b").conversation.add_turn("yo", "hey")
    convs.reset("a")
    assert convs.get("a").conversation.turns == []
    assert convs.get("b").conversation.turns == [("yo", "hey")]
    convs.reset("unknown")
    convs.reset(None)
    assert "unknown" not in convs and len(convs) == 2


def test_no_id_is_a_throwaway_conversation() -> None:
    convs = conversations()
    first = convs.get(None)
    first.conversation.add_turn("hi", "hello")
    second = convs.get(None)
    assert second is not first and second.conversation.turns == []
    assert len(convs) == 0 and None not in convs


def test_least_recently_used_conversations_go_first() -> None:
    convs = conversations(max_conversations=2)
    convs.get("a").conversation.add_turn("1", "one")
    convs.get("b")
    convs.get("a")  # a is now the most recently used
    convs.get("c")
    assert "b" not in convs and "a" in convs and "c" in convs and len(convs) == 2
    assert convs.get("a").conversation.turns == [("1", "one")]


def test_a_conversation_in_use_is_not_evicted() -> None:
    convs = conversations(max_conversations=2)

    async def run() -> None:
        busy = convs.get("a")
        busy.conversation.add_turn("1", "one")
        async with busy.lock:
            convs.get("b")
            convs.get("c")  # a is the oldest, but in use: b goes instead
            assert "a" in convs and "b" not in convs and "c" in convs
            assert len(convs) == 2
        assert convs.get("a") is busy and busy.conversation.turns == [("1", "one")]

    asyncio.run(run())


def test_a_new_conversation_is_kept_while_the_others_are_in_use() -> None:
    convs = conversations(max_conversations=1)

    async def run() -> None:
        busy = convs.get("a")
        async with busy.lock:
            entry = convs.get("b")
            entry.conversation.add_turn("hi", "hello")
            assert convs.get("b").conversation.turns == [("hi", "hello")]

    asyncio.run(run())


# --------------------------------------------------------------------------- SpeculationGate


def _event(n: int) -> TurnEvent:
    return TurnEvent(EventType.THINKING, f"t{n}", Source.MICROPHONE, text=str(n))


def test_gate_holds_events_until_commit_and_releases_them_in_order() -> None:
    gate = SpeculationGate(timeout_s=5.0)
    assert not gate.committed
    events = [_event(n) for n in range(5)]
    assert all(gate.hold(e) for e in events)
    published: list[TurnEvent] = []
    gate.commit(published.append)
    assert published == events
    assert gate.committed and gate.held == []
    assert gate.hold(_event(9)) is False  # once committed, events go straight out
    assert published == events


def test_gate_wait_returns_on_commit() -> None:
    async def run() -> None:
        gate = SpeculationGate(timeout_s=30.0)
        waiter = asyncio.create_task(gate.wait())
        await asyncio.sleep(0)  # let it start waiting
        assert not waiter.done()
        gate.commit(lambda e: None)
        await asyncio.wait_for(waiter, 5.0)
        await gate.wait()  # committed: at once

    asyncio.run(run())


def test_gate_wait_gives_up_after_its_timeout() -> None:
    async def run() -> None:
        gate = SpeculationGate(timeout_s=0.01)
        with pytest.raises(SpeculationTimeout, match="not committed within"):
            await gate.wait()
        assert not gate.committed

    asyncio.run(run())


# --------------------------------------------------------------------------- validate_request


def _message(text: str) -> str:
    with pytest.raises(RequestError) as info:
        validate_request(text)
    assert info.value.code == "invalid_request"
    return str(info.value)


def test_empty_and_blank_requests_get_the_same_message() -> None:
    empty = _message("")
    assert "empty" in empty
    assert _message("   ") == _message("\n\t ") == empty


def test_too_long_request_names_the_limit() -> None:
    message = _message("x" * (MAX_REQUEST_CHARS + 1))
    assert f"{MAX_REQUEST_CHARS:,}" in message and f"{MAX_REQUEST_CHARS + 1:,}" in message
    assert _message("y" * (MAX_REQUEST_CHARS + 1)) == message  # same length, same words


def test_valid_requests_are_stripped_and_the_limit_is_inclusive() -> None:
    assert validate_request("  lights on \n") == "lights on"
    at_limit = "x" * MAX_REQUEST_CHARS
    assert validate_request(f"  {at_limit}  ") == at_limit


# --------------------------------------------------------------------------- EventBus


def test_a_raising_listener_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[tuple[str, TurnEvent]] = []

    def broken(event: TurnEvent) -> None:
        seen.append(("broken", event))
        raise RuntimeError("observer bug")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(("after", e)))
    with caplog.at_level(logging.ERROR, logger="jarvis.voice.events"):
        bus.publish(_event(1))
        bus.publish(_event(2))
    assert [(who, e.text) for who, e in seen] == [("broken", "1"), ("after", "1"),
                                                   ("broken", "2"), ("after", "2")]
    failures = [r for r in caplog.records if r.exc_info is not None]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["observer bug"] * 2


def test_unsubscribe_stops_delivery() -> None:
    bus = EventBus()
    seen: list[TurnEvent] = []
    unsubscribe = bus.subscribe(seen.append)
    bus.publish(_event(1))
    unsubscribe()
    bus.publish(_event(2))
    assert [e.text for e in seen] == ["1"]
