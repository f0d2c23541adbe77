"""Audio formats, resampling, files, and the real sounddevice path through ALSA files."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from jarvis.audio import (
    ASR_RATE,
    AudioError,
    AudioFormatError,
    Microphone,
    Resampler,
    WavSink,
    file_source,
    read_audio,
    resample,
    to_float32,
    to_int16,
    to_mono,
    write_wav,
)
from tests.support.speech import (
    CLI_SCRIPT,
    JFK,
    raw_int16,
    run_with_home,
    strip_zeros,
    write_asoundrc,
)

# --------------------------------------------------------------------------- formats


def test_int16_float_round_trip_is_exact() -> None:
    pcm = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    assert np.array_equal(to_int16(to_float32(pcm)), pcm)
    assert to_float32(pcm)[0] == -1.0


def test_other_integer_widths_scale_to_unit_range() -> None:
    assert to_float32(np.array([0, 128, 255], dtype=np.uint8)).tolist() == [-1.0, 0.0, 127 / 128]
    assert to_float32(np.array([2**31 - 1, -(2**31)], dtype=np.int32))[1] == -1.0


def test_to_int16_clips_instead_of_wrapping() -> None:
    assert to_int16(np.array([1.5, -2.0], dtype=np.float32)).tolist() == [32767, -32768]


def test_to_mono_averages_channels() -> None:
    stereo = np.array([[1.0, 0.0], [0.5, -0.5]], dtype=np.float32)
    assert to_mono(stereo).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="shape"):
        to_mono(np.zeros((2, 2, 2)))


# --------------------------------------------------------------------------- resampling

RATES = [8000, 16000, 22050, 24000, 44100, 48000]


@settings(max_examples=40, deadline=None)
@given(
    src=st.sampled_from(RATES), dst=st.sampled_from(RATES),
    chunks=st.lists(st.integers(0, 700), min_size=1, max_size=12), seed=st.integers(0, 2**16),
)
def test_streaming_resampler_equals_one_shot(src: int, dst: int, chunks: list[int],
                                             seed: int) -> None:
    signal = np.random.default_rng(seed).uniform(-1, 1, sum(chunks)).astype(np.float32)
    whole = resample(signal, src, dst)
    assert len(whole) == math.ceil(len(signal) * dst / src)
    r = Resampler(src, dst)
    pieces, pos = [], 0
    for n in chunks:
        pieces.append(r.process(signal[pos:pos + n]))
        pos += n
    pieces.append(r.flush())
    assert np.array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize(("src", "dst"), [(16000, 22050), (22050, 16000), (48000, 16000),
                                          (44100, 16000), (16000, 48000)])
def test_resampled_tone_keeps_its_waveform_and_timing(src: int, dst: int) -> None:
    t = np.arange(src) / src
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, src, dst)
    expected = np.sin(2 * np.pi * 440 * np.arange(len(out)) / dst)
    middle = slice(len(out) // 10, -len(out) // 10)  # edges see the zeros around the clip
    assert np.abs(out[middle] - expected[middle]).max() < 2e-3


def test_downsampling_removes_what_the_new_rate_cannot_hold() -> None:
    t = np.arange(48000) / 48000
    too_high = np.sin(2 * np.pi * 9000 * t).astype(np.float32)  # above 8 kHz Nyquist
    out = resample(too_high, 48000, 16000)
    assert np.abs(out[1000:-1000]).max() < 0.01  # else it would alias to 7 kHz at full level


# --------------------------------------------------------------------------- files


def test_read_jfk_is_exact_16k_mono() -> None:
    audio = read_audio(JFK)
    pcm, rate = sf.read(JFK, dtype="int16")
    assert audio.rate == rate == ASR_RATE
    assert audio.duration_s == pytest.approx(11.0)
    assert np.array_equal(audio.samples, pcm.astype(np.float32) / 32768)


@pytest.mark.parametrize(("rate", "subtype", "fmt"), [
    (44100, "PCM_16", "FLAC"), (48000, "PCM_24", "WAV"), (8000, "PCM_U8", "WAV"),
    (22050, "FLOAT", "WAV"),
])
def test_any_rate_and_channel_count_reads_as_the_same_16k_signal(
    tmp_path: Path, rate: int, subtype: str, fmt: str
) -> None:
    original = read_audio(JFK).samples[: 3 * ASR_RATE]
    at_rate = resample(original, ASR_RATE, rate)
    stereo = np.stack([at_rate, at_rate * 0.5], axis=1)  # two different channels
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, rate, subtype=subtype, format=fmt)
    back = read_audio(path)
    assert back.rate == ASR_RATE
    assert abs(len(back.samples) - len(original)) <= 1
    n = min(len(back.samples), len(original))
    expected = original[:n] * 0.75  # the mean of the two channels
    error = back.samples[:n] - expected
    snr_db = 10 * np.log10(np.sum(expected**2) / np.sum(error**2))
    assert snr_db > (25 if subtype == "PCM_U8" else 40)


def test_write_wav_and_wav_sink_round_trip(tmp_path: Path) -> None:
    pcm = (np.sin(np.arange(22050) / 7) * 20000).astype(np.int16)
    write_wav(tmp_path / "a.wav", pcm, 22050)
    with WavSink(tmp_path / "b.wav", 22050) as sink:
        for block in np.array_split(pcm, 7):
            sink.write(block)
    for name in ("a.wav", "b.wav"):
        data, rate = sf.read(tmp_path / name, dtype="int16")
        assert rate == 22050 and np.array_equal(data, pcm)


def test_file_source_streams_the_whole_file() -> None:
    async def collect() -> np.ndarray:
        return np.concatenate([c async for c in file_source(JFK, chunk_s=0.25)])

    assert np.array_equal(asyncio.run(collect()), read_audio(JFK).samples)


def test_empty_but_valid_wav_gives_no_samples(tmp_path: Path) -> None:
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.int16), 16000)
    assert len(read_audio(tmp_path / "empty.wav").samples) == 0


def _bad_file(tmp_path: Path, kind: str) -> Path:
    jfk = JFK.read_bytes()
    path = tmp_path / f"{kind}.wav"
    if kind == "truncated":
        path.write_bytes(jfk[: len(jfk) // 2])
    elif kind == "header-only":
        path.write_bytes(jfk[:30])
    elif kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is a text file, not audio\n" * 20)
    elif kind == "png":
        path = tmp_path / "picture.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return path


@pytest.mark.parametrize(("kind", "problem"), [
    ("truncated", "truncated WAV"),
    ("header-only", "not a readable sound file"),
    ("zero-bytes", "not a readable sound file"),
    ("garbage", "not a readable sound file"),
    ("png", "not a readable sound file"),
])
def test_broken_files_are_clear_errors_naming_the_file(
    tmp_path: Path, kind: str, problem: str
) -> None:
    path = _bad_file(tmp_path, kind)
    with pytest.raises(AudioFormatError) as info:
        read_audio(path)
    message = str(info.value)
    assert str(path) in message and problem in message
    assert "\n" not in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="is a directory"):
        read_audio(tmp_path)


# --------------------------------------------------------------------------- devices

MIC_SCRIPT = """
import asyncio, sys
import numpy as np
from jarvis.audio import Microphone

async def main(seconds, device_rate):
    wanted = int(seconds * 16000)
    got = []
    # ALSA's file/null devices run unpaced (hundreds of times real time) and the queue
    # drops its oldest chunk when full, so it must hold what arrives before we read.
    async with Microphone(device_rate=device_rate or None, max_queue_s=300) as mic:
        async for chunk in mic:
            got.append(chunk)
            if sum(map(len, got)) >= wanted:
                break
        print(mic.device.name, mic.device_rate, mic.dropped_chunks)
    np.save(sys.argv[3], np.concatenate(got)[:wanted])

asyncio.run(main(float(sys.argv[1]), int(sys.argv[2])))
"""


def _jfk_as_mic(home: Path) -> np.ndarray:
    pcm: np.ndarray = sf.read(JFK, dtype="int16")[0]
    pcm.tofile(home / "mic.raw")
    write_asoundrc(home, home / "mic.raw")
    return pcm


def test_microphone_captures_the_wav_fed_as_input_exactly(tmp_path: Path) -> None:
    pcm = _jfk_as_mic(tmp_path)
    result = run_with_home(tmp_path, MIC_SCRIPT, "3", "0", str(tmp_path / "got.npy"))
    assert result.returncode == 0, result.stderr
    name, rate, dropped = result.stdout.split()
    assert (name, rate, dropped) == ("default", "16000", "0")
    got = np.load(tmp_path / "got.npy")
    assert np.array_equal(got, pcm[: len(got)].astype(np.float32) / 32768)


def test_microphone_resamples_a_48k_device_to_16k(tmp_path: Path) -> None:
    # The device runs at 48 kHz (ALSA's own rate converter garbles file capture, so the
    # raw file is 48 kHz too); Jarvis opens it at 48 kHz and resamples to 16 kHz.
    original = read_audio(JFK).samples
    at_48k = to_int16(resample(original, ASR_RATE, 48000))
    at_48k.tofile(tmp_path / "mic48.raw")
    write_asoundrc(tmp_path, tmp_path / "mic48.raw", mic_rate=48000)
    result = run_with_home(tmp_path, MIC_SCRIPT, "3", "48000", str(tmp_path / "got.npy"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["default", "48000", "0"]
    got = np.load(tmp_path / "got.npy")
    assert len(got) == 3 * ASR_RATE
    expected = resample(to_float32(at_48k), 48000, ASR_RATE)[: len(got)]
    assert np.allclose(got, expected, atol=1e-6)  # streamed in chunks == one-shot
    error = got - original[: len(got)]
    snr_db = 10 * np.log10(np.sum(original[: len(got)] ** 2) / np.sum(error**2))
    assert snr_db > 35  # 16 -> 48 -> 16 kHz gives back the recording


def test_microphone_status_flags_are_counted_not_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Months of PortAudio overflow reports take one counter per kind of flag."""
    sd = pytest.importorskip("sounddevice")
    lib = sd._lib
    mic = Microphone()
    for _ in range(100_000):
        mic.note_status(sd.CallbackFlags(lib.paInputOverflow))
    mic.note_status(sd.CallbackFlags(lib.paInputOverflow | lib.paInputUnderflow))
    assert mic.status_flags == {"input overflow": 100_001, "input underflow": 1}
    caplog.set_level("WARNING", logger="jarvis.audio.stream")
    asyncio.run(mic.close())  # never opened: it only reports
    assert "PortAudio reported input overflow x100001, input underflow x1" in caplog.text


SPEAKER_SCRIPT = """
import asyncio, sys
import numpy as np
from jarvis.audio import Speaker

async def main():
    samples = np.load(sys.argv[1])
    speaker = Speaker(sys.argv[2], device_rate=int(sys.argv[3]) or None)
    chunks = np.array_split(samples, 5)   # played as a stream of chunks
    seconds = await speaker.play(chunks, 22050)
    print(speaker.device.name, speaker.device_rate, round(seconds, 3))

asyncio.run(main())
"""


def _chirp() -> np.ndarray:
    t = np.arange(22050) / 22050
    return (0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t) * 32767).astype(np.int16)


def test_speaker_plays_every_sample_in_order(tmp_path: Path) -> None:
    outputs = write_asoundrc(tmp_path, tmp_path / "mic.raw")
    samples = _chirp()
    np.save(tmp_path / "play.npy", samples)
    result = run_with_home(tmp_path, SPEAKER_SCRIPT, str(tmp_path / "play.npy"), "", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["default", "22050", "1.0"]
    assert np.array_equal(strip_zeros(raw_int16(outputs["speaker"])), strip_zeros(samples))


def test_speaker_resamples_for_a_48k_device_chosen_by_name(tmp_path: Path) -> None:
    outputs = write_asoundrc(tmp_path, tmp_path / "mic.raw")
    samples = _chirp()
    np.save(tmp_path / "play.npy", samples)
    result = run_with_home(tmp_path, SPEAKER_SCRIPT, str(tmp_path / "play.npy"), "speaker48",
                           "48000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["jspeaker48", "48000"]
    played = strip_zeros(raw_int16(outputs["speaker48"]))
    expected = strip_zeros(to_int16(resample(samples, 22050, 48000)))
    assert np.array_equal(played, expected)  # the device runs at 48 kHz: no ALSA conversion


DEVICE_SCRIPT = """
import sys
from jarvis.audio import resolve_device
from jarvis.errors import JarvisError
try:
    d = resolve_device(sys.argv[1], sys.argv[2])
    print("OK", d.index, d.name)
except JarvisError as exc:
    print("ERROR", exc)
"""


@pytest.mark.parametrize(("spec", "kind", "expected"), [
    ("", "input", "OK 3 default"),
    ("jmic", "input", "OK 0 jmic"),
    ("1", "output", "OK 1 jspeaker"),
    ("SPEAKER48", "output", "OK 2 jspeaker48"),
    ("speaker", "output", "ERROR JARVIS_OUTPUT_DEVICE='speaker' matches 2 output devices"),
    ("usb", "input", "ERROR JARVIS_INPUT_DEVICE='usb': no input device has that in its name"),
    ("17", "input", "ERROR JARVIS_INPUT_DEVICE=17: no device with that index"),
])
def test_device_selection_by_name_or_index(tmp_path: Path, spec: str, kind: str,
                                           expected: str) -> None:
    write_asoundrc(tmp_path, tmp_path / "mic.raw")
    result = run_with_home(tmp_path, DEVICE_SCRIPT, spec, kind)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected), result.stdout


def test_devices_command_lists_devices_and_marks_the_selected_ones(tmp_path: Path) -> None:
    write_asoundrc(tmp_path, tmp_path / "mic.raw")
    result = run_with_home(tmp_path, CLI_SCRIPT, "devices",
                           env={"JARVIS_OUTPUT_DEVICE": "jspeaker48"})
    assert result.returncode == 0, result.stderr
    marks = {}
    for line in result.stdout.splitlines():
        fields = line[3:].split()
        if len(fields) > 2 and fields[0].isdigit():
            marks[fields[1]] = line[:3]
    assert marks == {"jspeaker": "   ", "jmic": "   ", "default": "<  ", "jspeaker48": " > "}
    as_json = run_with_home(tmp_path, CLI_SCRIPT, "devices", "--json")
    data = json.loads(as_json.stdout)
    assert {d["name"] for d in data["devices"]} >= {"jmic", "jspeaker", "jspeaker48", "default"}
    assert data["selected_input"] == data["selected_output"] == 3


def _has_sound_cards() -> bool:
    cards = Path("/proc/asound/cards")
    return cards.exists() and "no soundcards" not in cards.read_text()


@pytest.mark.skipif(_has_sound_cards(), reason="this machine has real sound cards")
def test_headless_machine_gets_a_clear_message_not_a_traceback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()  # no .asoundrc, no sound cards: PortAudio sees nothing
    listing = run_with_home(home, CLI_SCRIPT, "devices")
    assert listing.returncode == 1
    assert "no sound devices found" in listing.stderr and "Traceback" not in listing.stderr
    say = run_with_home(home, CLI_SCRIPT, "say", "Hello.")
    assert say.returncode == 2
    assert say.stderr.startswith("jarvis: error: no sound devices found")
    assert "Traceback" not in say.stderr and "PortAudio" not in say.stderr.split(";")[0]


PAUSE_SCRIPT = """
import asyncio, sys
import numpy as np
from jarvis.audio import Speaker
from jarvis.audio.echo import EchoReference

async def main():
    samples = np.load(sys.argv[1])
    first, second = samples[:11025], samples[11025:]
    reference = EchoReference()
    speaker = Speaker("", reference=reference)
    loop = asyncio.get_running_loop()
    paused = []

    async def chunks():
        yield first
        speaker.pause()          # a possible barge-in between two chunks
        paused.append((speaker.paused, loop.time()))
        loop.call_later(0.3, speaker.resume)
        yield second

    started = loop.time()
    await speaker.play(chunks(), 22050)
    print(paused[0][0], round(loop.time() - paused[0][1], 1) >= 0.3, reference.pushed_samples)

asyncio.run(main())
"""


def test_a_paused_speaker_waits_then_replays_what_the_device_dropped(tmp_path: Path) -> None:
    outputs = write_asoundrc(tmp_path, tmp_path / "mic.raw")
    samples = _chirp()
    np.save(tmp_path / "play.npy", samples)
    result = run_with_home(tmp_path, PAUSE_SCRIPT, str(tmp_path / "play.npy"))
    assert result.returncode == 0, result.stderr
    was_paused, waited, pushed = result.stdout.split()
    assert was_paused == "True" and waited == "True"
    played = strip_zeros(raw_int16(outputs["speaker"]))
    first, second = samples[:11025], samples[11025:]
    first = first[np.flatnonzero(first)[0]:]  # as strip_zeros leaves it
    # All of the first chunk, then again what the abort may have dropped (its end),
    # then the second chunk: nothing is lost, nothing is out of order.
    assert np.array_equal(played[:len(first)], first)
    assert np.array_equal(played[-len(second):], second)
    replayed = played[len(first):len(played) - len(second)]
    assert 0 < len(replayed) <= len(first)
    assert np.array_equal(replayed, first[-len(replayed):])
    assert int(pushed) > 0  # the echo reference heard it all (at 16 kHz)
