"""Echo cancellation (jarvis.audio.echo): the reference FIFO, AEC3 with the estimated
delay, on real piper speech played through the synthetic room of
jarvis/evaluation/room.py and captured in 32 ms chunks.

Measured (x86_64, AEC3 of pywebrtc-audio 0.2.0) on the reply below, the echo 6 dB
under what was played, RT60 0.3 s, microphone noise at -70 dBFS: ERLE 38.7-39.2 dB of
AEC3 alone after the first two seconds at 20, 50 and 80 ms (the noise floor limits it;
-12 dB of echo gives 33 dB); the delay estimate exact to the sample, first accepted
0.6 s after playback starts; about 1.2 % of a core. Silero flags 245 frames of the raw
echo as speech (the endpointer confirms it: a barge-in), none of the residual. Speech
over an echo as loud as itself keeps 0.73 correlation with the clean speech, -3.3 dB of
level and 34 of its 68 speech frames, and is confirmed 0.4 s after it starts.
bench/echo_bench.py has the wider picture (24 rooms, long delays, the gate's effect).
"""

from __future__ import annotations

import itertools
import math
import platform
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jarvis.audio import ASR_RATE, FloatArray, resample
from jarvis.audio.echo import EchoCanceller, EchoReference, echo_cancel_unavailable
from jarvis.evaluation.room import Playback, Room, best_lag, erle_db, level_db, play_through

if TYPE_CHECKING:
    from jarvis.speech.silero import SileroVad
    from jarvis.speech.tts import PiperTts

FAR_TEXT = ("The weather today will be mostly sunny with a high of twenty three degrees. "
            "In the evening a light breeze comes from the west, and tomorrow looks much "
            "the same.")
NEAR_TEXT = "Hey Jarvis, turn off the kitchen lights please."

needs_aec = pytest.mark.skipif(echo_cancel_unavailable() is not None,
                               reason=echo_cancel_unavailable() or "")

Chunks = list[tuple[np.ndarray, int]]


@pytest.fixture(scope="module")
def far_chunks(tts: PiperTts) -> Chunks:
    """The reply as the speaker gets it: piper's pieces, int16 at 22050 Hz."""
    return [(c.samples, c.sample_rate) for c in tts.sentence_parts(FAR_TEXT)]


def cancel(room: Room, chunks: Chunks, *, gate: bool = True,
           **kwargs: object) -> tuple[Playback, EchoCanceller]:
    reference = EchoReference()
    canceller = EchoCanceller(reference)
    if not gate:
        canceller.residual_gate_db = None
    playback = play_through(room, chunks, canceller=canceller, reference=reference,
                            **kwargs)  # type: ignore[arg-type]
    return playback, canceller


def far_end(playback: Playback) -> int:
    """One past the last sample the speaker played."""
    return int(np.nonzero(playback.far)[0][-1]) + 1


def speech_frames(vad: SileroVad, audio: FloatArray) -> np.ndarray:
    vad.reset()
    whole = len(audio) // 512 * 512
    return vad.score(audio[:whole]) > 0.5


def speech_starts(vad: SileroVad, audio: FloatArray) -> list[int]:
    """Where the default endpointer confirms speech (a barge-in when Jarvis speaks)."""
    from jarvis.speech.silero import Endpointer
    from jarvis.speech.vad import SegmenterConfig, SpeechStarted

    endpointer = Endpointer(SegmenterConfig(), model=vad)
    endpointer.reset()
    starts = []
    for pos in range(0, len(audio) // 512 * 512, 512):
        if any(isinstance(e, SpeechStarted) for e in endpointer.process(audio[pos:pos + 512])):
            starts.append(pos + 512)
    return starts


# --------------------------------------------------------------------------- reference


def test_the_reference_gives_back_what_was_pushed_and_zeros_after() -> None:
    reference = EchoReference()
    assert reference.last_push_s is None
    assert np.array_equal(reference.pull(5), np.zeros(5, np.float32))
    x = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    reference.push(x[:300], ASR_RATE)
    reference.push(x[300:], ASR_RATE)
    assert reference.last_push_s is not None
    out = np.concatenate([reference.pull(n) for n in (7, 500, 493)])
    assert np.array_equal(out, x)
    tail = reference.pull(100)
    assert len(tail) == 100 and not tail.any()


def test_int16_pushes_are_scaled_like_everywhere_else() -> None:
    reference = EchoReference()
    reference.push(np.array([16384, -32768, 0], dtype=np.int16), ASR_RATE)
    assert np.allclose(reference.pull(3), [0.5, -1.0, 0.0])


def test_a_push_at_22050_hz_is_resampled_like_the_whole_signal_at_once() -> None:
    rate = 22050
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    reference = EchoReference()
    cuts = [0, 100, 4096, 8192, 15000, rate]
    for a, b in itertools.pairwise(cuts):
        reference.push(tone[a:b], rate)
    queued = reference.queued_samples
    got = reference.pull(ASR_RATE)
    expected = resample(tone, rate, ASR_RATE)
    assert ASR_RATE - 40 < queued <= ASR_RATE  # the filter holds back its last ms
    assert np.allclose(got[:queued], expected[:queued], atol=1e-5)
    spectrum = np.abs(np.fft.rfft(got[: queued // 2 * 2]))
    assert abs(np.argmax(spectrum) * ASR_RATE / (queued // 2 * 2) - 1000) < 2


def test_playback_more_than_max_s_ahead_is_dropped_oldest_first() -> None:
    reference = EchoReference(max_s=2.0)
    x = np.arange(3 * ASR_RATE, dtype=np.float32) / (3 * ASR_RATE)
    reference.push(x, ASR_RATE)
    assert reference.dropped_samples == ASR_RATE
    assert np.array_equal(reference.pull(2 * ASR_RATE), x[ASR_RATE:])


def test_clear_forgets_what_was_queued_and_the_resampler_tail() -> None:
    reference = EchoReference()
    reference.push(np.ones(22050, np.float32) * 0.3, 22050)
    reference.clear()
    assert reference.queued_samples == 0
    assert not reference.pull(1000).any()
    reference.push(np.zeros(2205, np.float32), 22050)  # nothing of the old tail comes out
    assert np.abs(reference.pull(1600)).max() < 1e-6


def test_the_reference_is_safe_to_push_and_pull_from_two_threads() -> None:
    reference = EchoReference(max_s=100.0)
    chunk = np.full(441, 0.25, np.float32)
    pulled: list[FloatArray] = []

    def speaker() -> None:
        for _ in range(200):
            reference.push(chunk, 22050)

    thread = threading.Thread(target=speaker)
    thread.start()
    while thread.is_alive():
        pulled.append(reference.pull(512))
    thread.join()
    pulled.append(reference.pull(2 * ASR_RATE))
    out = np.concatenate(pulled)
    # 4 s of a constant: every resampled sample arrives once, in order
    assert abs(int(np.sum(np.abs(out - 0.25) < 1e-3)) - 4 * ASR_RATE) < 64
    assert reference.dropped_samples == 0


# --------------------------------------------------------------------------- canceller


def test_availability_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    echo_cancel_unavailable.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "pywebrtc_audio", None)  # import fails
        reason = echo_cancel_unavailable()
        assert reason is not None and platform.machine() in reason
        assert "echo cancellation off" in reason and "\n" not in reason
    finally:
        monkeypatch.undo()
        echo_cancel_unavailable.cache_clear()


@needs_aec
def test_pywebrtc_audio_works_here() -> None:
    assert echo_cancel_unavailable() is None


@needs_aec
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2000), min_size=1, max_size=30))
def test_any_chunking_comes_out_in_whole_frames_less_than_one_frame_behind(
        sizes: list[int]) -> None:
    canceller = EchoCanceller(EchoReference())
    fed = returned = 0
    for n in sizes:
        out = canceller.process(np.zeros(n, np.float32))
        fed += n
        returned += len(out)
        assert abs(len(out) - n) < 160 and len(out) % 160 == 0
        assert 0 <= fed - returned < 160


@needs_aec
def test_without_a_reference_the_microphone_passes_through_unchanged_in_level(
        spoken: Callable[[str], FloatArray]) -> None:
    near = np.concatenate([np.zeros(4000, np.float32), spoken(NEAR_TEXT)])
    canceller = EchoCanceller(EchoReference())
    out = np.concatenate([canceller.process(near[i:i + 512]) for i in range(0, len(near), 512)])
    lag, corr = best_lag(near, out)
    assert abs(level_db(out) - level_db(near[: len(out)])) < 0.5
    assert corr > 0.9 and lag < 160  # AEC3's 8 ms; its high-pass filter turns the phase
    assert not canceller.far_active and canceller.delay_ms is None
    assert math.isnan(canceller.stats()["delay_ms"])


@needs_aec
@pytest.mark.parametrize("delay_ms", [20, 50, 80])
def test_the_echo_is_cancelled_and_its_delay_estimated(far_chunks: Chunks,
                                                       delay_ms: int) -> None:
    """AEC3 itself (no residual echo gate)."""
    room = Room(delay_ms=delay_ms, rt60_s=0.3, gain_db=-6.0, seed=delay_ms)
    playback, canceller = cancel(room, far_chunks, gate=False)
    settled = slice(playback.far_start + 2 * ASR_RATE, far_end(playback))
    erle = erle_db(playback.mic[settled], playback.residual[settled])
    assert erle >= 25.0, f"ERLE {erle:.1f} dB at {delay_ms} ms"
    # The room's direct path is the first tap after the delay.
    assert canceller.delay_ms is not None
    assert abs(canceller.delay_ms - delay_ms) <= 5.0
    stats = canceller.stats()
    assert stats["erle_db"] >= 20.0
    assert stats["far_frames"] > 0.5 * stats["frames"]
    assert stats["cpu_s"] < 0.05 * stats["audio_s"]


@needs_aec
@pytest.mark.parametrize("delay_ms", [20, 50, 80])
def test_the_residual_of_echo_alone_is_no_barge_in(far_chunks: Chunks, silero: SileroVad,
                                                   delay_ms: int) -> None:
    """The point of the feature: Silero hears Jarvis in the raw microphone (the
    endpointer would cancel the reply), not in what the canceller leaves, from the
    first frame on. A reverberant room (RT60 0.6 s), the echo as loud as the reply."""
    room = Room(delay_ms=delay_ms, gain_db=0.0, rt60_s=0.6, seed=delay_ms)
    playback, canceller = cancel(room, far_chunks)
    raw = playback.mic[: len(playback.residual)]
    assert speech_frames(silero, raw).sum() > 100
    assert speech_starts(silero, raw)
    flagged = speech_frames(silero, playback.residual).sum()
    assert flagged <= 5, f"{flagged} residual frames flagged"
    assert not speech_starts(silero, playback.residual)
    assert canceller.stats()["gated_frames"] > 0


@needs_aec
def test_near_end_speech_over_the_echo_is_kept(far_chunks: Chunks, silero: SileroVad,
                                               spoken: Callable[[str], FloatArray]) -> None:
    """Barge-in: the person talks over Jarvis (echo as loud as them, after the
    canceller converged); their speech survives, and still reads as speech."""
    near = spoken(NEAR_TEXT)
    at = 4 * ASR_RATE
    playback, _ = cancel(Room(delay_ms=50, gain_db=0.0), far_chunks, near=near,
                         near_at_s=at / ASR_RATE)
    talk = slice(at, at + len(near))
    _, corr = best_lag(playback.near[talk], playback.residual[talk])
    assert corr > 0.6
    assert level_db(playback.residual[talk]) > level_db(playback.near[talk]) - 6.0
    clean = speech_frames(silero, playback.near[talk]).sum()
    kept = speech_frames(silero, playback.residual)[at // 512:(at + len(near)) // 512].sum()
    assert kept >= 0.3 * clean, f"{kept} of {clean} speech frames"
    starts = speech_starts(silero, playback.residual)
    assert starts and at < starts[0] < at + ASR_RATE  # the barge-in, within a second


@needs_aec
def test_after_the_echo_the_near_end_comes_through_whole(
        far_chunks: Chunks, spoken: Callable[[str], FloatArray]) -> None:
    near = spoken(NEAR_TEXT)
    room = Room(delay_ms=80, gain_db=-6.0)
    probe = play_through(room, far_chunks)
    at = far_end(probe) + ASR_RATE // 2
    playback, canceller = cancel(room, far_chunks, near=near, near_at_s=at / ASR_RATE)
    talk = slice(at, at + len(near))
    _, corr = best_lag(playback.near[talk], playback.residual[talk])
    assert corr > 0.9
    assert abs(level_db(playback.residual[talk]) - level_db(playback.near[talk])) < 1.0
    assert not canceller.far_active


@needs_aec
def test_a_reference_that_stops_arriving_leaves_the_microphone_as_it_is(
        far_chunks: Chunks) -> None:
    """The speaker side stops pushing at 3 s while the speaker plays on: no error,
    and the microphone passes through (there is nothing to cancel it with)."""
    playback, canceller = cancel(Room(delay_ms=50, gain_db=-6.0), far_chunks,
                                 reference_until_s=3.0)
    late = slice(5 * ASR_RATE, far_end(playback))
    assert abs(erle_db(playback.mic[late], playback.residual[late])) < 1.5
    assert not canceller.far_active
    early = slice(playback.far_start + ASR_RATE, 3 * ASR_RATE)
    assert erle_db(playback.mic[early], playback.residual[early]) > 20.0


@needs_aec
def test_a_delay_beyond_what_aec3_finds_alone_is_aligned(far_chunks: Chunks) -> None:
    """AEC3 finds up to about 500 ms itself; at 700 ms the estimated delay is applied
    to the reference before AEC3."""
    room = Room(delay_ms=700, gain_db=-6.0)
    reference = EchoReference()
    canceller = EchoCanceller(reference, max_delay_ms=1000)
    playback = play_through(room, far_chunks, canceller=canceller, reference=reference)
    assert canceller.delay_ms is not None and abs(canceller.delay_ms - 700) <= 5.0
    assert 600 <= canceller.reference_shift_ms < 700
    settled = slice(playback.far_start + 4 * ASR_RATE, far_end(playback))
    assert erle_db(playback.mic[settled], playback.residual[settled]) >= 20.0


@needs_aec
def test_reset_forgets_the_delay(far_chunks: Chunks) -> None:
    _, canceller = cancel(Room(delay_ms=20), far_chunks)
    assert canceller.delay_ms is not None
    canceller.reset()
    assert canceller.delay_ms is None and canceller.stats()["frames"] == 0
