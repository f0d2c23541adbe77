"""The wake-word detector (microWakeWord ``hey_jarvis``) on real synthesized speech:
the bundled piper voice (``spoken``/``tts`` fixtures) and espeak-ng."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from jarvis.audio import ASR_RATE, FloatArray, to_int16
from jarvis.errors import ConfigError, ModelError
from jarvis.evaluation import voices
from jarvis.speech import wakeword
from jarvis.speech.tts import PiperTts
from jarvis.speech.wakeword import (
    BUNDLED_WAKE_WORDS,
    WakeDetection,
    WakeWordDetector,
    is_bundled,
)
from tests.support.speech import COMMANDS, silence

Say = Callable[[str], FloatArray]
WAKE_REQUEST = "Hey Jarvis, what time is it?"
STRIDE_SAMPLES = 3 * 160  # one model output per 30 ms


def feed(detector: WakeWordDetector, audio: FloatArray, chunk: int = 1280) -> list[WakeDetection]:
    """Every detection, feeding ``audio`` through ``process`` as a microphone would."""
    found = []
    for start in range(0, len(audio), chunk):
        detection = detector.process(audio[start:start + chunk])
        if detection is not None:
            found.append(detection)
    return found


def padded(audio: FloatArray, before_s: float = 0.5, after_s: float = 1.0) -> FloatArray:
    return np.concatenate([silence(before_s), audio, silence(after_s)])


def pauses(audio: FloatArray, min_s: float = 0.12, floor_db: float = 30.0) -> list[tuple[int, int]]:
    """(start, end) of the quiet stretches of at least ``min_s`` between the first and the
    last sound (10 ms frames ``floor_db`` below the loudest)."""
    frame = 160
    count = len(audio) // frame
    power = np.mean(audio[:count * frame].reshape(count, frame).astype(np.float64) ** 2, axis=1)
    loud = power >= power.max() * 10 ** (-floor_db / 10)
    first, last = np.flatnonzero(loud)[[0, -1]]
    gaps, start = [], None
    for i in range(first, last + 1):
        if not loud[i] and start is None:
            start = i
        elif loud[i] and start is not None:
            if (i - start) * frame >= min_s * ASR_RATE:
                gaps.append((start * frame, i * frame))
            start = None
    return gaps


@pytest.fixture
def detector() -> WakeWordDetector:
    return WakeWordDetector("hey_jarvis")


@pytest.fixture(scope="module")
def need_espeak() -> None:
    if not voices.espeak_available():
        pytest.skip("espeak-ng is not installed; apt-get install espeak-ng")


# --------------------------------------------------------------------------- names


def test_bundled_models_are_listed_and_unknown_names_are_config_errors() -> None:
    assert BUNDLED_WAKE_WORDS == ("alexa", "hey_jarvis", "hey_mycroft", "okay_nabu")
    assert is_bundled("hey_jarvis") and is_bundled(" Hey_Jarvis ")
    assert not is_bundled("hey jarvis") and not is_bundled("hey_jervis")
    with pytest.raises(ConfigError) as caught:
        WakeWordDetector("hey_jervis")
    message = str(caught.value)
    assert message.startswith("JARVIS_WAKE_WORD=hey_jervis: no such wake-word model")
    assert "alexa, hey_jarvis, hey_mycroft, okay_nabu" in message
    assert "\n" not in message


def test_each_bundled_model_loads_with_its_phrase() -> None:
    phrases = {name: WakeWordDetector(name).phrase for name in BUNDLED_WAKE_WORDS}
    assert phrases == {"alexa": "Alexa", "hey_jarvis": "Hey Jarvis",
                       "hey_mycroft": "Hey Mycroft", "okay_nabu": "Okay Nabu"}


def test_a_broken_or_missing_tflite_library_is_a_model_error_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = wakeword._package_dir()
    assert package is not None
    fake = tmp_path / "pymicro_wakeword"
    shutil.copytree(package / "models", fake / "models")
    (fake / "lib").mkdir()
    monkeypatch.setattr(wakeword, "_package_dir", lambda: fake)
    with pytest.raises(ModelError, match=r"libtensorflowlite_c\) is missing.*pip install"):
        WakeWordDetector("hey_jarvis")
    (fake / "lib" / "libtensorflowlite_c.so").write_bytes(b"not a shared library")
    with pytest.raises(ModelError, match=r"cannot be loaded .*pip install --force-reinstall"):
        WakeWordDetector("hey_jarvis")


def test_cutoff_overrides_the_models_own_and_is_validated(spoken: Say) -> None:
    assert WakeWordDetector("hey_jarvis").cutoff == 0.97  # the model's JSON
    low = WakeWordDetector("hey_jarvis", cutoff=0.5)
    assert low.cutoff == 0.5
    audio = padded(spoken(WAKE_REQUEST))
    default = feed(WakeWordDetector("hey_jarvis"), audio)
    early = feed(low, audio)
    assert len(default) == len(early) == 1
    assert early[0].sample <= default[0].sample and early[0].probability > 0.5
    assert feed(WakeWordDetector("hey_jarvis", cutoff=0.999999), audio) == []
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match="cutoff must be between 0 and 1"):
            WakeWordDetector("hey_jarvis", cutoff=bad)


def test_importing_the_module_does_not_load_the_model_library() -> None:
    code = ("import sys, jarvis.speech.wakeword as w; "
            "print(w.BUNDLED_WAKE_WORDS, 'pymicro_wakeword' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip().endswith("False"), out
    assert "hey_jarvis" in out


# --------------------------------------------------------------------------- piper


def test_fires_once_after_jarvis_and_before_the_request(detector: WakeWordDetector,
                                                         spoken: Say) -> None:
    audio = padded(spoken(WAKE_REQUEST))
    found = feed(detector, audio)
    assert len(found) == 1, found
    hit = found[0]
    assert (hit.name, hit.phrase) == ("hey_jarvis", "Hey Jarvis")
    assert hit.probability > detector.cutoff
    assert detector.position == len(audio)
    # The comma is a pause: "Hey Jarvis" before it, "what time is it" after it.
    gap_start, request_start = pauses(audio)[0]
    assert gap_start - 0.1 * ASR_RATE <= hit.sample < request_start, (
        hit.sample, gap_start, request_start)


@pytest.mark.parametrize("kind", ["pink", "white", "babble"])
def test_fires_at_10_db_snr(detector: WakeWordDetector, spoken: Say, jfk_audio: FloatArray,
                            kind: str) -> None:
    clean = padded(spoken(WAKE_REQUEST))
    reference = feed(detector, clean)[0].sample
    detector.reset()
    source = jfk_audio if kind == "babble" else None  # babble: six overlapping Kennedys
    noisy = voices.add_noise(clean, 10.0, seed=3, kind=kind, source=source)
    measured = 10 * np.log10(voices.active_level(clean)
                             / np.mean((noisy - clean).astype(np.float64) ** 2))
    assert 9.5 < measured < 10.5  # the noise really is at 10 dB
    found = feed(detector, noisy)
    assert len(found) == 1, found
    assert abs(found[0].sample - reference) <= 0.25 * ASR_RATE


@pytest.mark.parametrize("length_scale", [0.8, 1.2])
def test_fires_on_faster_and_slower_speech(detector: WakeWordDetector, tts: PiperTts,
                                           length_scale: float) -> None:
    audio = padded(voices.piper_say(tts, "Hey Jarvis, turn on the kitchen lights.",
                                    length_scale))
    assert len(feed(detector, audio)) == 1


@pytest.mark.slow
def test_no_wake_phrase_no_detection(detector: WakeWordDetector, spoken: Say,
                                     jfk_audio: FloatArray) -> None:
    sentences = ["What time is it?", *COMMANDS,  # COMMANDS has "good night jarvis"
                 "Hey Travis, what time is it?", "Jarvis is a name.",
                 "The harvest was good this year.", "Hey, jar of jam please.",
                 "Jarvis, turn on the lights."]
    stream = np.concatenate([np.concatenate([spoken(s), silence(0.4)]) for s in sentences]
                            + [jfk_audio, silence(0.5)])
    assert len(stream) > 60 * ASR_RATE  # a minute of speech
    assert feed(detector, stream) == []
    # The same stream with the wake phrase in the middle fires once, there.
    middle = len(stream) // 2
    wake = spoken(WAKE_REQUEST)
    detector.reset()
    found = feed(detector, np.concatenate([stream[:middle], silence(0.3), wake,
                                           stream[middle:]]))
    assert len(found) == 1 and middle < found[0].sample < middle + len(wake) + ASR_RATE // 3


# --------------------------------------------------------------------------- streaming


def test_chunk_sizes_do_not_move_the_detection(spoken: Say) -> None:
    audio = padded(spoken("Hey Jarvis."), 0.3, 0.6)
    samples = {}
    for chunk in (1, 160, 512, 4000, len(audio)):
        detector = WakeWordDetector("hey_jarvis")
        found = feed(detector, audio, chunk)
        assert len(found) == 1, (chunk, found)
        samples[chunk] = found[0].sample
        assert detector.position == len(audio)
    assert max(samples.values()) - min(samples.values()) <= STRIDE_SAMPLES, samples
    # Random chunk lengths (partial blocks carried over) and int16 input agree too.
    rng = np.random.default_rng(7)
    detector = WakeWordDetector("hey_jarvis")
    cuts = np.cumsum(rng.integers(1, 700, size=len(audio) // 100))
    pieces = np.split(to_int16(audio), cuts[cuts < len(audio)])
    found = [d for piece in pieces if (d := detector.process(piece)) is not None]
    assert [d.sample for d in found] == [samples[160]]


def test_reset_starts_a_new_stream(detector: WakeWordDetector, spoken: Say) -> None:
    audio = padded(spoken("Hey Jarvis."), 0.3, 0.6)
    first = feed(detector, audio)
    detector.reset()
    assert detector.position == 0
    second = feed(detector, audio)
    assert first == second and len(first) == 1


def test_one_utterance_fires_once_even_without_refractory(spoken: Say) -> None:
    """The model's output stays above the cut-off for a run of outputs after the phrase:
    only the first of them is a detection."""
    detector = WakeWordDetector("hey_jarvis", refractory_s=0.0)
    assert len(feed(detector, padded(spoken(WAKE_REQUEST)), chunk=160)) == 1


def test_rearm_after_a_consumed_detection_does_not_fire_again(spoken: Say) -> None:
    audio = padded(spoken(WAKE_REQUEST))
    detector = WakeWordDetector("hey_jarvis", refractory_s=0.0)
    position = 0
    while (hit := detector.process(audio[position:position + 160])) is None:
        position += 160
        assert position < len(audio), "no detection"
    detector.rearm()  # the stale window is gone, the model's state still holds "Jarvis"
    rest = audio[position + 160:]
    assert feed(detector, rest, chunk=160) == []
    # ... and it is armed again for the next "Hey Jarvis".
    again = feed(detector, np.concatenate([silence(0.5), spoken("Hey Jarvis."), silence(0.5)]))
    assert len(again) == 1 and again[0].sample > hit.sample


def test_refractory_period_suppresses_a_quick_repeat(spoken: Say) -> None:
    twice = np.concatenate([silence(0.3), spoken("Hey Jarvis."), silence(0.2),
                            spoken("Hey Jarvis."), silence(0.6)])
    both = feed(WakeWordDetector("hey_jarvis", refractory_s=0.0), twice)
    assert len(both) == 2
    gap = both[1].sample - both[0].sample
    assert 0.5 * ASR_RATE < gap < 2.0 * ASR_RATE
    assert len(feed(WakeWordDetector("hey_jarvis", refractory_s=gap / ASR_RATE + 0.1),
                    twice)) == 1
    # With a pause longer than the refractory period, the default detector fires twice.
    apart = np.concatenate([twice[:len(twice) // 2], silence(1.5), twice[len(twice) // 2:]])
    assert len(feed(WakeWordDetector("hey_jarvis"), apart)) == 2


# --------------------------------------------------------------------------- espeak-ng


@pytest.mark.usefixtures("need_espeak")
def test_espeak_voices_that_it_hears_and_ones_it_must_ignore(detector: WakeWordDetector) -> None:
    # Female and soft espeak variants are heard; the default male formant voices are
    # mostly not, and the rest only at some speeds (see bench/wakeword_bench.py).
    for voice, wpm in (("en-us+belinda", 150), ("en-us+belinda", 180), ("en-us+f3", 160),
                       ("en-gb-x-rp+shelby", 165)):
        detector.reset()
        audio = padded(voices.espeak_say("hey jarvis, turn on the lights", voice, wpm))
        assert len(feed(detector, audio)) == 1, (voice, wpm)
    for voice in ("en-us", "en-us+belinda", "en-gb-x-rp", "en+aunty"):
        detector.reset()
        stream = np.concatenate([padded(voices.espeak_say(s, voice), 0.2, 0.3) for s in (
            "What time is it?", "Turn on the kitchen lights.", "Jarvis is a name.",
            "The harvest was good this year.", "Hey, how are you doing today?")])
        assert feed(detector, stream) == [], voice


def test_shift_voice_scales_pitch_and_length() -> None:
    t = np.arange(ASR_RATE) / ASR_RATE
    tone = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    for factor in (0.9, 1.1):
        shifted = voices.shift_voice(tone, factor)
        assert shifted.dtype == np.float32
        assert abs(len(shifted) - ASR_RATE / factor) <= 2
        peak = np.argmax(np.abs(np.fft.rfft(shifted))) * ASR_RATE / len(shifted)
        assert abs(peak - 200 * factor) < 3, (factor, peak)
    with pytest.raises(ValueError, match="factor"):
        voices.shift_voice(tone, 3.0)


@pytest.mark.usefixtures("need_espeak")
def test_espeak_say_makes_16_khz_speech_and_clear_errors() -> None:
    audio = voices.espeak_say("hello there", "en-us", 175)
    assert audio.dtype == np.float32 and 0.3 * ASR_RATE < len(audio) < 3 * ASR_RATE
    assert 0.05 < float(np.max(np.abs(audio))) <= 1.0
    slow = voices.espeak_say("hello there", "en-us", 100)
    assert len(slow) > 1.3 * len(audio)
    with pytest.raises(RuntimeError, match="no-such-voice"):
        voices.espeak_say("hello", "no-such-voice")
