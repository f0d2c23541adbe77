"""What listening turns on and why; the wake phrase's second check on transcripts; the
wake-word gate on real speech; the echo reference watch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from jarvis.audio.echo import EchoReference
from jarvis.audio.formats import ASR_RATE, FloatArray
from jarvis.config import PipelineSettings
from jarvis.errors import ConfigError
from jarvis.speech.asr import WAKE_LOGPROB_CORROBORATED, WAKE_LOGPROB_MIN, Transcript
from jarvis.speech.silero import Endpointer
from jarvis.speech.vad import SpeechStarted, UtteranceEnded
from jarvis.speech.wakeword import WakeWordDetector
from jarvis.voice.listening import (
    AWAKE_S,
    FrontEnd,
    ReferenceWatch,
    confirmed_request,
    plan_listening,
    resolve_wake_word,
    strip_wake_phrase,
    wake_request,
)
from tests.support.speech import default_settings


def pipeline_settings(**changes: object) -> PipelineSettings:
    return replace(default_settings().pipeline, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the plan


def test_the_defaults_are_the_model_and_for_a_speaker_echo_cancellation_and_barge_in() -> None:
    p = default_settings().pipeline
    assert p.wake_word == "hey_jarvis" and p.echo_cancel == "auto" and p.barge_in is None
    live = plan_listening(p, speaker=True, microphone=True)
    assert (live.wake_model, live.echo_cancel, live.barge_in) == ("hey_jarvis", True, True)
    files = plan_listening(p, speaker=False, microphone=False)
    assert (files.echo_cancel, files.barge_in) == (False, False)
    assert files.lines()[1] == ("echo cancellation: off (nothing to cancel: replies are not "
                                "played on a speaker)")


def test_explicit_settings_win_and_say_so() -> None:
    plan = plan_listening(pipeline_settings(echo_cancel="off", barge_in=True, wake_word=""),
                          speaker=True, microphone=True)
    assert plan.lines() == ["wake word: off (JARVIS_WAKE_WORD=off: everything heard is answered)",
                            "echo cancellation: off (JARVIS_ECHO_CANCEL=off)",
                            "barge-in: on (JARVIS_BARGE_IN=true)"]


@pytest.mark.parametrize(("value", "expected"), [
    ("hey_jarvis", ("hey_jarvis", "")), ("Hey  Jarvis", ("hey_jarvis", "")),
    ("okay-nabu", ("okay_nabu", "")), ("hello computer", (None, "hello computer")),
    ("", (None, "")),
])
def test_wake_word_values(value: str, expected: tuple[str | None, str]) -> None:
    assert resolve_wake_word(value) == expected


def test_a_model_name_that_is_not_bundled_lists_the_bundled_ones() -> None:
    with pytest.raises(ConfigError, match="bundled: alexa, hey_jarvis, hey_mycroft, okay_nabu"):
        resolve_wake_word("hey_jervis")


# --------------------------------------------------------------------------- transcripts


@pytest.mark.parametrize(("text", "request_"), [
    ("Hey Jarvis, what time is it?", "what time is it?"),
    ("Hey, Jervis. Turn on the light.", "Turn on the light."),
    ("Okay hey Javis what's the weather", "what's the weather"),
    ("Hey Jarvis.", ""),
    ("Hey Janice, what time is it?", None),  # fooled the model, not the transcript
    ("Hey Charles, turn it off.", None),
    ("What time is it?", None),
    ("", None),  # whisper heard nothing
    ("...", None),
])
def test_the_transcript_confirms_the_wake_word(text: str, request_: str | None) -> None:
    assert wake_request(text, "Hey Jarvis") == request_


def test_the_words_can_be_held_to_one_edit() -> None:
    assert wake_request("Hey Jabbis, what time is it?", "Hey Jarvis") == "what time is it?"
    assert wake_request("Hey Jabbis, what time is it?", "Hey Jarvis", max_edits=1) is None
    assert wake_request("Hey Javis, lights.", "Hey Jarvis", max_edits=1) == "lights."


def test_a_name_heard_as_two_words_is_found() -> None:
    assert wake_request("Hey, my craft, what time is it?", "Hey Mycroft",
                        max_edits=1) == "what time is it?"
    assert wake_request("Hey Jar vis, lights.", "Hey Jarvis") == "lights."
    assert wake_request("Hey, jar of jam, please.", "Hey Jarvis", max_edits=1) is None


def _transcript(text: str, score: float | None, prefix: str = "") -> Transcript:
    return Transcript(text, "en", 2.0, 0.1, wake_score=score, wake_prefix=prefix)


def test_the_wake_score_decides_and_the_request_is_what_was_read_after_the_phrase() -> None:
    passed = _transcript("Hey, Jarvis. What time is it?", WAKE_LOGPROB_MIN + 0.2, "Hey, Jarvis")
    assert confirmed_request(passed, "Hey Jarvis") == "What time is it?"
    alone = _transcript("Hey Jarvis.", -0.1, "Hey Jarvis")
    assert confirmed_request(alone, "Hey Jarvis") == ""
    # Between the two bars the free transcript must agree, within one edit.
    unsure = WAKE_LOGPROB_MIN - 0.5
    assert unsure > WAKE_LOGPROB_CORROBORATED
    assert confirmed_request(_transcript("Hey Jervis, lights on.", unsure),
                             "Hey Jarvis") == "lights on."
    assert confirmed_request(_transcript("Hey Jabbis, what time is it?", unsure),
                             "Hey Jarvis") is None  # two edits: "Hey Janice" misheard
    assert confirmed_request(_transcript("Hang on, the lights.", unsure), "Hey Jarvis") is None
    assert confirmed_request(_transcript("", unsure), "Hey Jarvis") is None
    # Below them, words that would pass the transcript check do not pass.
    fooled = _transcript("Good night Jarvis.", WAKE_LOGPROB_CORROBORATED - 0.01)
    assert confirmed_request(fooled, "Hey Jarvis") is None
    # No score (a long-form input): the words decide.
    assert confirmed_request(_transcript("Hey Jarvis, lights on.", None),
                             "Hey Jarvis") == "lights on."
    assert confirmed_request(_transcript("Hey Janice, lights on.", None), "Hey Jarvis") is None


def test_a_follow_up_may_say_the_wake_phrase_or_not() -> None:
    assert strip_wake_phrase("Hey Jarvis, and tomorrow?", "hey jarvis") == "and tomorrow?"
    assert strip_wake_phrase("And tomorrow?", "hey jarvis") == "And tomorrow?"


# --------------------------------------------------------------------------- the gate


def _said(spoken: object, text: str) -> FloatArray:
    audio: FloatArray = spoken(text)  # type: ignore[operator]
    return audio


def test_the_gate_hears_nothing_until_the_wake_word_then_the_request_whole(
    spoken: object
) -> None:
    silence = np.zeros(int(0.8 * ASR_RATE), np.float32)
    weather = _said(spoken, "What is the weather like today?")
    stream = np.concatenate([silence, weather, silence,
                             _said(spoken, "Hey Jarvis, what time is it?"),
                             np.zeros(int((AWAKE_S + 1.0) * ASR_RATE), np.float32)])
    front = FrontEnd(Endpointer(default_settings().vad),
                     detector=WakeWordDetector("hey_jarvis"))
    started, utterances, wakes = [], [], []
    for i in range(0, len(stream), 512):
        heard = front.process(stream[i:i + 512])
        if heard.wake is not None:
            wakes.append(i)
        started += [e for e in heard.events if isinstance(e, SpeechStarted)]
        utterances += [e for e in heard.events if isinstance(e, UtteranceEnded)]
    assert len(wakes) == 1
    wake_at = wakes[0]
    assert wake_at > len(silence) * 2 + len(weather)  # fires after "hey jarvis" was said...
    assert len(utterances) == 1 and len(started) == 1  # ...the weather was never heard
    # ...and the utterance still starts with "hey": the pre-roll went to the endpointer.
    assert utterances[0].duration_s > 1.2
    assert not front.listening  # the awake window closed again
    assert len(stream) > AWAKE_S * ASR_RATE


# --------------------------------------------------------------------------- reference


def test_a_reference_that_stops_arriving_is_said_once_then_its_return() -> None:
    now = [0.0]
    reference = EchoReference(clock=lambda: now[0])
    watch = ReferenceWatch(reference, stale_s=1.0, clock=lambda: now[0])
    assert watch.check(playing=True) is None  # the reply just started
    now[0] = 0.5
    reference.push(np.zeros(160, np.float32), ASR_RATE)
    messages = []
    for t in (1.0, 1.4, 2.0, 2.6, 3.0):
        now[0] = t
        messages.append(watch.check(playing=True))
    assert [m is not None for m in messages] == [False, False, True, False, False]
    assert "nothing from the speaker for 1.5 s" in str(messages[2])
    now[0] = 3.2
    reference.push(np.zeros(160, np.float32), ASR_RATE)
    assert watch.check(playing=True) == "echo cancellation: the speaker's output is back"
    now[0] = 9.0
    assert watch.check(playing=False) is None  # between replies nothing is expected
