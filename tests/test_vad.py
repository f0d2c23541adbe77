"""The endpointing state machine (pure, property-tested) and Silero VAD on real speech."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from jarvis.audio import ASR_RATE, FloatArray, file_source
from jarvis.evaluation.wer import word_error_rate
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.silero import FRAME, Endpointer, SileroVad
from jarvis.speech.vad import (
    EndReason,
    FramesDropped,
    OnsetRejected,
    PauseDetected,
    Segmenter,
    SegmenterConfig,
    SpeechOnset,
    SpeechResumed,
    SpeechStarted,
    UtteranceEnded,
    VadEvent,
)
from tests.support.speech import JFK, JFK_TEXT, default_settings, silence

# --------------------------------------------------------------------------- state machine

RATE = 1000  # 1 sample per ms keeps the arithmetic readable


def config(**overrides: float) -> SegmenterConfig:
    values: dict[str, float] = dict(threshold=0.5, silence_ms=100, min_speech_ms=30,
                                    preroll_ms=20, max_utterance_s=1.0)
    values.update(overrides)
    return SegmenterConfig(sample_rate=RATE, **values)  # type: ignore[arg-type]


def run(segmenter: Segmenter, frames: list[tuple[int, float]]) -> tuple[np.ndarray,
                                                                        list[VadEvent]]:
    """Push frames of the given lengths and probabilities; every sample is unique."""
    events: list[VadEvent] = []
    pos = 0
    pieces = []
    for length, prob in frames:
        frame = np.arange(pos, pos + length, dtype=np.float32)
        pieces.append(frame)
        events += segmenter.push(frame, prob)
        pos += length
    events += segmenter.flush()
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), events


def utterances(events: list[VadEvent]) -> list[UtteranceEnded]:
    return [e for e in events if isinstance(e, UtteranceEnded)]


frame_lists = st.lists(
    st.tuples(st.integers(1, 40), st.floats(0.0, 1.0)), min_size=0, max_size=120
)
configs = st.builds(
    config,
    threshold=st.floats(0.3, 0.8),
    silence_ms=st.integers(1, 150),
    min_speech_ms=st.integers(0, 80),
    preroll_ms=st.integers(0, 60),
    max_utterance_s=st.floats(0.05, 0.5),
    pause_ms=st.integers(0, 150),
)


@settings(max_examples=300, deadline=None)
@given(frames=frame_lists, cfg=configs)
def test_segments_plus_dropped_frames_reproduce_the_input_exactly(
    frames: list[tuple[int, float]], cfg: SegmenterConfig
) -> None:
    segmenter = Segmenter(cfg)
    stream, events = run(segmenter, frames)
    pieces = [e for e in events if isinstance(e, UtteranceEnded | FramesDropped)]
    rebuilt = np.concatenate([p.audio for p in pieces]) if pieces else np.zeros(0)
    assert np.array_equal(rebuilt, stream)  # nothing lost, nothing twice, in order
    position = 0
    for piece in pieces:  # and each piece says where it was
        assert piece.start_sample == position
        position += len(piece.audio)


@settings(max_examples=300, deadline=None)
@given(frames=frame_lists, cfg=configs)
def test_every_utterance_is_announced_and_respects_the_limits(
    frames: list[tuple[int, float]], cfg: SegmenterConfig
) -> None:
    # Real configurations have room for the pre-roll plus a frame or two (15 s vs 0.3 s).
    assume(cfg.max_utterance_s * 1000 >= cfg.preroll_ms + 2 * 40)
    segmenter = Segmenter(cfg)
    _, events = run(segmenter, frames)
    probs = {}  # first sample of each frame -> probability
    pos = 0
    for length, prob in frames:
        probs[pos] = (length, prob)
        pos += length
    started: SpeechStarted | None = None
    max_len = cfg.samples(cfg.max_utterance_s * 1000)
    for event in events:
        if isinstance(event, SpeechStarted):
            assert started is None
            started = event
        elif isinstance(event, UtteranceEnded):
            assert started is not None and started.start_sample == event.start_sample
            assert started.onset_sample - event.start_sample <= cfg.samples(cfg.preroll_ms) + 40
            last_frame = len(event.audio) and probs[max(p for p in probs if p < event.end_sample)]
            assert len(event.audio) < max_len + (last_frame[0] if last_frame else 0)
            speech = sum(n for p, (n, pr) in probs.items()
                         if event.start_sample <= p < event.end_sample and pr >= cfg.threshold)
            assert speech >= cfg.samples(cfg.min_speech_ms)
            started = None
    assert started is None and not segmenter.in_speech  # flush closed everything


@settings(max_examples=300, deadline=None)
@given(frames=frame_lists, cfg=configs)
@example(frames=[(1, 1.0)] + [(1, 0.0)] * 4 + [(34, 0.0), (1, 0.0), (1, 0.0)],
         cfg=config(silence_ms=40, min_speech_ms=0, preroll_ms=2, pause_ms=39))
def test_a_likely_end_is_the_utterance_so_far_and_is_taken_back_if_speech_resumes(
    frames: list[tuple[int, float]], cfg: SegmenterConfig
) -> None:
    _, events = run(Segmenter(cfg), frames)
    pause: PauseDetected | None = None
    for event in events:
        if isinstance(event, PauseDetected):
            assert pause is None  # one likely end at a time
            assert 0 < cfg.pause_ms < cfg.silence_ms
            assert event.silence_samples >= cfg.samples(cfg.pause_ms)
            pause = event
        elif isinstance(event, SpeechResumed):
            assert pause is not None
            pause = None
        elif isinstance(event, UtteranceEnded):
            if pause is not None:  # the same speech; only the trailing silence differs
                assert event.start_sample == pause.start_sample
                common = min(len(event.audio), len(pause.audio))
                assert np.array_equal(event.audio[:common], pause.audio[:common])
                # The end of the silence may go to the next utterance's pre-roll, so
                # the utterance can be shorter than the likely end, never by speech.
                assert len(pause.audio) - common <= pause.silence_samples
            pause = None
        else:
            assert pause is None or isinstance(event, SpeechStarted)
    assert pause is None


def test_an_onset_comes_first_and_a_burst_too_short_for_speech_is_rejected() -> None:
    seg = Segmenter(config(min_speech_ms=150, silence_ms=150, max_utterance_s=5.0))
    _, events = run(seg, [(100, 0.0), (100, 0.9), (100, 0.0), (100, 0.0), (100, 0.9),
                          (400, 0.9), (400, 0.0)])
    kinds = [type(e).__name__ for e in events if not isinstance(e, FramesDropped)]
    assert kinds == ["SpeechOnset", "OnsetRejected", "SpeechOnset", "SpeechStarted",
                     "UtteranceEnded"]
    onsets = [e.onset_sample for e in events if isinstance(e, SpeechOnset)]
    assert onsets == [100, 400]
    assert [e.sample for e in events if isinstance(e, OnsetRejected)] == [400]


def test_a_short_pause_is_a_likely_end_then_speech_resumes() -> None:
    seg = Segmenter(config(silence_ms=100, pause_ms=40))
    _, events = run(seg, [(50, 0.9), (50, 0.0), (50, 0.9), (60, 0.0), (60, 0.0)])
    kinds = [type(e).__name__ for e in events if not isinstance(e, SpeechOnset)]
    assert kinds == ["SpeechStarted", "PauseDetected", "SpeechResumed", "PauseDetected",
                     "UtteranceEnded"]
    first, second = (e for e in events if isinstance(e, PauseDetected))
    assert len(first.audio) == 100 and first.silence_samples == 50
    assert len(second.audio) == 210 and second.silence_samples == 60


def test_no_likely_end_unless_it_comes_before_the_endpoint() -> None:
    for pause_ms in (0, 100, 150):
        _, events = run(Segmenter(config(silence_ms=100, pause_ms=pause_ms)),
                        [(50, 0.9), (150, 0.0)])
        assert not [e for e in events if isinstance(e, PauseDetected | SpeechResumed)]


def test_preroll_keeps_the_audio_before_the_first_speech_frame() -> None:
    seg = Segmenter(config(preroll_ms=20, min_speech_ms=0))
    _, events = run(seg, [(10, 0.0)] * 5 + [(10, 0.9)] * 5 + [(10, 0.0)] * 10)
    (utt,) = utterances(events)
    assert [e for e in events if isinstance(e, SpeechStarted)] == [SpeechStarted(30, 50)]
    assert utt.start_sample == 30
    assert utt.reason is EndReason.SILENCE
    # pre-roll + speech + the silence that ended it, less what becomes the next pre-roll
    assert len(utt.audio) == 20 + 50 + 100 - 20


def test_speech_right_after_the_silence_timer_still_gets_its_preroll() -> None:
    seg = Segmenter(config(silence_ms=100, preroll_ms=20, min_speech_ms=0))
    _, events = run(seg, [(10, 0.9)] * 5 + [(10, 0.0)] * 10 + [(10, 0.9)] * 5)
    first, second = utterances(events)
    assert first.reason is EndReason.SILENCE and second.reason is EndReason.END_OF_STREAM
    assert second.start_sample == first.end_sample == 150 - 20  # 20 ms of the silence
    assert [e.onset_sample for e in events if isinstance(e, SpeechStarted)] == [0, 150]


def test_a_click_shorter_than_min_speech_is_not_an_utterance() -> None:
    seg = Segmenter(config(min_speech_ms=50))
    _, events = run(seg, [(10, 0.0)] * 3 + [(10, 0.99)] * 3 + [(10, 0.0)] * 30)
    assert not utterances(events) and not any(isinstance(e, SpeechStarted) for e in events)


def test_pauses_shorter_than_the_silence_limit_stay_in_one_utterance() -> None:
    seg = Segmenter(config(silence_ms=100))
    frames = [(10, 0.9)] * 10 + [(10, 0.1)] * 9 + [(10, 0.9)] * 10 + [(10, 0.1)] * 10
    _, events = run(seg, frames)
    assert len(utterances(events)) == 1


def test_hysteresis_values_between_the_thresholds_do_not_start_silence() -> None:
    seg = Segmenter(config(threshold=0.5, silence_ms=50))  # silence below 0.35
    _, events = run(seg, [(10, 0.9)] * 5 + [(10, 0.4)] * 20 + [(10, 0.9)] * 5)
    (utt,) = utterances(events)
    assert utt.reason is EndReason.END_OF_STREAM and len(utt.audio) == 300 + 0


def test_long_speech_is_cut_at_the_maximum_length() -> None:
    seg = Segmenter(config(max_utterance_s=0.2, min_speech_ms=0, preroll_ms=0))
    _, events = run(seg, [(10, 0.9)] * 50)
    lengths = [len(u.audio) for u in utterances(events)]
    assert lengths == [200, 200, 100]
    assert [u.reason for u in utterances(events)] == [EndReason.MAX_LENGTH] * 2 + [
        EndReason.END_OF_STREAM]


def test_config_defaults_are_the_settings_defaults() -> None:
    """A Segmenter made without settings endpoints like the configured assistant
    (JARVIS_VAD_SILENCE_MS=300 and the rest); only likely ends are off by default."""
    from_settings = SegmenterConfig.from_settings(default_settings().vad)
    assert dataclasses.replace(from_settings, pause_ms=0) == SegmenterConfig()
    assert SegmenterConfig().silence_ms == 300


def test_settings_map_to_the_config() -> None:
    vad = dataclasses.replace(default_settings().vad, threshold=0.6, silence_ms=450,
                              min_speech_ms=150, preroll_ms=250, max_utterance_s=9.5)
    cfg = SegmenterConfig.from_settings(vad)
    assert (cfg.threshold, cfg.silence_ms, cfg.min_speech_ms, cfg.preroll_ms,
            cfg.max_utterance_s, cfg.sample_rate) == (0.6, 450, 150, 250, 9.5, ASR_RATE)
    assert cfg.off_threshold == pytest.approx(0.45)


# --------------------------------------------------------------------------- Silero


def test_silero_scores_a_stream_the_same_however_it_is_chunked(
    silero: SileroVad, jfk_audio: FloatArray
) -> None:
    vad = silero
    audio = jfk_audio[: 200 * FRAME]
    vad.reset()
    whole = vad.score(audio)
    vad.reset()
    pieces = [vad.score(audio[i:i + 7 * FRAME]) for i in range(0, len(audio), 7 * FRAME)]
    assert np.allclose(np.concatenate(pieces), whole, atol=1e-5)
    assert whole.max() > 0.9  # speech
    vad.reset()
    assert vad.score(silence(1.0)[: 31 * FRAME]).max() < 0.1


def _segment(vad: SileroVad, audio: np.ndarray, silence_ms: int | None = None
             ) -> list[VadEvent]:
    cfg = SegmenterConfig.from_settings(default_settings().vad)
    if silence_ms is not None:
        cfg = dataclasses.replace(cfg, silence_ms=silence_ms)
    return Endpointer(cfg, vad).segment_all(audio)


COMMAND = "Turn on the kitchen lights."


@pytest.fixture(scope="module")
def jfk_pause_command(jfk_audio: FloatArray, spoken: Callable[[str], FloatArray]) -> FloatArray:
    """Kennedy, a 2 s pause, then a command in the piper voice."""
    return np.concatenate([silence(0.5), jfk_audio, silence(2.0), spoken(COMMAND),
                           silence(2.0)])


@pytest.mark.slow
def test_default_endpointing_splits_real_speech_at_its_pauses(
    silero: SileroVad, asr: WhisperAsr, jfk_pause_command: FloatArray
) -> None:
    # Kennedy pauses for about a second between phrases: with the default 300 ms of
    # silence each phrase is an utterance, and together they are the whole speech.
    assert default_settings().vad.silence_ms == 300
    utts = utterances(_segment(silero, jfk_pause_command))
    assert len(utts) == 5, [(u.start_sample / ASR_RATE, u.duration_s) for u in utts]
    texts = [asr.transcribe(u.audio).text for u in utts]
    assert word_error_rate(JFK_TEXT, " ".join(texts[:4])) <= 0.1, texts
    assert word_error_rate(COMMAND, texts[4]) == 0.0, texts


@pytest.mark.slow
def test_a_longer_silence_limit_gives_one_utterance_per_speaker_turn(
    silero: SileroVad, asr: WhisperAsr, jfk_pause_command: FloatArray
) -> None:
    events = _segment(silero, jfk_pause_command, silence_ms=1500)
    utts = utterances(events)
    assert len(utts) == 2, [(u.start_sample / ASR_RATE, u.duration_s) for u in utts]
    assert all(u.reason is EndReason.SILENCE for u in utts)
    # The cut falls inside the 2 s pause; each utterance starts with its pre-roll.
    pause_start = int(11.5 * ASR_RATE)
    assert pause_start <= utts[0].end_sample <= utts[1].start_sample <= pause_start + 2 * ASR_RATE
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    preroll = default_settings().vad.preroll_ms * ASR_RATE // 1000
    assert len(starts) == 2
    assert all(preroll <= s.onset_sample - s.start_sample < preroll + FRAME for s in starts)
    first, second = (asr.transcribe(u.audio).text for u in utts)
    assert word_error_rate(JFK_TEXT, first) <= 0.1, first
    assert word_error_rate(COMMAND, second) == 0.0, second


@pytest.mark.slow
def test_endpointer_streams_a_file_off_the_event_loop(silero: SileroVad,
                                                      jfk_audio: FloatArray) -> None:
    async def collect() -> list[VadEvent]:
        endpointer = Endpointer(default_settings().vad, silero)
        return [e async for e in endpointer.segment(file_source(JFK, chunk_s=0.05))]

    events = asyncio.run(collect())
    utts = utterances(events)
    assert utts and sum(len(u.audio) for u in utts) > 9 * ASR_RATE
    rebuilt = np.concatenate([e.audio for e in events
                              if isinstance(e, UtteranceEnded | FramesDropped)])
    assert np.array_equal(rebuilt, jfk_audio)
