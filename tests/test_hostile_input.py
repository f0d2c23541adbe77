"""Hostile input (issue 12): sound files that lie in their headers, files that are not
files, files too long to hold, and commands that would fail silently without a sound
device. Each finding is reproduced as a user (or an attacker) would meet it: through
the real ``jarvis`` entry point, in a separate process where memory or blocking is at
stake, with the process's own peak RSS as the measure.
"""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jarvis.audio import ASR_RATE, AudioError, AudioFormatError, read_audio
from tests.support.speech import JFK, run_with_home, write_asoundrc

ROOT = Path(__file__).resolve().parent.parent

# A child process that runs the real entry point under a data-size limit and reports
# its exit status and its own peak resident memory. Without the limit today's code
# grows until the machine swaps; with it the failure is a MemoryError traceback.
CHILD = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
from jarvis.cli.main import main
code = main(sys.argv[2:])
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "peak_mb": peak_kb / 1024}))
sys.exit(code)
"""
DATA_LIMIT = 1536 << 20  # far above what any check here needs, far below what today's takes


def run_jarvis(home: Path, *args: str, timeout: float = 120, limit: int = DATA_LIMIT,
               **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    """``jarvis ARGS`` in a fresh process (HOME = ``home``), with its exit status and
    peak RSS in MB; a process that hangs fails the test with TimeoutExpired."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    environ.update({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                    "JARVIS_CACHE_DIR": "", "OPENBLAS_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}, **env)
    result = subprocess.run([sys.executable, "-c", CHILD, str(limit), *args], env=environ,
                            cwd=home, capture_output=True, text=True, timeout=timeout,
                            check=False)
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return result, report


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``jarvis: error:`` line a failed command printed, and nothing else."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("jarvis: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- WAV headers


def wav_bytes(pcm: bytes, *, rate: int = ASR_RATE, channels: int = 1, bits: int = 16,
              tag: int = 1, block_align: int | None = None, byte_rate: int | None = None,
              data_size: int | None = None, fmt_size: int = 16) -> bytes:
    """A RIFF WAV whose header says whatever it is told to (consistent by default)."""
    align = channels * ((bits + 7) // 8) if block_align is None else block_align
    fmt = struct.pack("<HHIIHH", tag, channels, rate,
                      rate * align if byte_rate is None else byte_rate, align, bits)
    fmt = fmt[:fmt_size] if fmt_size < 16 else fmt + bytes(fmt_size - 16)
    size = len(pcm) if data_size is None else data_size
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", size) + pcm)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jfk_pcm(seconds: float) -> bytes:
    pcm: np.ndarray = sf.read(JFK, dtype="int16")[0]
    return pcm[: int(seconds * ASR_RATE)].tobytes()


@pytest.mark.parametrize("claimed_rate", [1, 2**31 - 1])
def test_crafted_sample_rate_fails_fast_in_bounded_memory(tmp_path: Path,
                                                          claimed_rate: int) -> None:
    """A 1.7 s recording whose header claims 1 Hz (16,000 output samples per input
    sample: > 1.8 GB within a minute) or 2**31-1 Hz (a 539 GiB filter table) is one
    line, and costs no more memory than a file that does not exist."""
    crafted = tmp_path / "crafted.wav"
    crafted.write_bytes(wav_bytes(jfk_pcm(1.7), rate=claimed_rate, byte_rate=claimed_rate * 2))
    missing, baseline = run_jarvis(tmp_path, "transcribe", str(tmp_path / "missing.wav"))
    assert "no such file" in one_error_line(missing)
    result, report = run_jarvis(tmp_path, "transcribe", str(crafted), timeout=60)
    line = one_error_line(result)
    assert result.returncode == 2 and report["code"] == 2
    assert f"{claimed_rate} Hz" in line and "8 to 192 kHz" in line and str(crafted) in line
    assert report["peak_mb"] < baseline["peak_mb"] + 50, (report, baseline)


def _bad_headers(tmp_path: Path) -> list[tuple[Path, str]]:
    pcm = jfk_pcm(0.5)
    cases = {
        "zero-channels": (wav_bytes(pcm, channels=0, block_align=2, byte_rate=32000),
                          "0 channels"),
        "4khz": (wav_bytes(pcm, rate=4000), "4000 Hz"),
        "384khz": (wav_bytes(pcm, rate=384000), "384000 Hz"),
        "frame-size": (wav_bytes(pcm, block_align=4), "frame size is 4 bytes"),
        "byte-rate": (wav_bytes(pcm, byte_rate=12345), "byte rate is 12345"),
        "partial-frame": (wav_bytes(pcm + b"\0", data_size=len(pcm) + 1),
                          "not a whole number of 2-byte frames"),
        "short-fmt": (wav_bytes(pcm, fmt_size=12), "fmt chunk has 12 bytes"),
        "truncated": (wav_bytes(pcm, data_size=len(pcm) * 4), "truncated WAV"),
    }
    paths = []
    for name, (data, problem) in cases.items():
        path = tmp_path / f"{name}.wav"
        path.write_bytes(data)
        paths.append((path, problem))
    return paths


def test_impossible_wav_headers_are_one_clear_line(tmp_path: Path) -> None:
    for path, problem in _bad_headers(tmp_path):
        with pytest.raises(AudioFormatError) as info:
            read_audio(path)
        message = str(info.value)
        assert problem in message and str(path) in message, message
        assert "\n" not in message


def test_other_formats_get_the_same_rate_check(tmp_path: Path) -> None:
    """FLAC and AIFF carry their own rate fields; libsndfile believes them."""
    signal = np.zeros(4000, dtype=np.int16)
    for rate, fmt in ((4000, "AIFF"), (4000, "FLAC"), (1000, "WAV")):
        path = tmp_path / f"low-{rate}.{fmt.lower()}"
        sf.write(path, signal, rate, format=fmt, subtype="PCM_16")
        with pytest.raises(AudioFormatError, match=f"{rate} Hz; sound files are read at 8"):
            read_audio(path)


def test_valid_files_at_the_edges_of_the_range_still_read(tmp_path: Path) -> None:
    for rate in (8000, 192000):
        path = tmp_path / f"edge-{rate}.wav"
        sf.write(path, np.zeros(rate // 10, dtype=np.int16), rate)
        assert len(read_audio(path).samples) == ASR_RATE // 10


# --------------------------------------------------------------------------- not files

NOT_A_FILE = """
import sys
from jarvis.audio import read_audio, iter_file_chunks
from jarvis.errors import JarvisError
for path in sys.argv[1:]:
    for reader in (read_audio, lambda p: list(iter_file_chunks(p))):
        try:
            reader(path)
            print("READ", path)
        except JarvisError as exc:
            print("ERROR", exc)
"""


def test_a_fifo_or_device_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO with no writer blocked ``jarvis transcribe`` forever; a device never ends."""
    fifo = tmp_path / "input.wav"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-c", NOT_A_FILE, str(fifo), "/dev/zero"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    assert all(line.startswith("ERROR ") for line in lines), result.stdout
    assert lines[0] == lines[1] and lines[2] == lines[3]
    assert f"{fifo}: is a FIFO (named pipe), not a sound file" in lines[0]
    assert "/dev/zero: is a character device, not a sound file" in lines[2]
    assert "save the audio to a file first" in lines[0]


def test_missing_directory_and_too_long_paths(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "nope" / "x.wav")
    with pytest.raises(AudioError, match="is a directory"):
        read_audio(tmp_path)
    long_path = tmp_path / ("x" * 10_000)
    with pytest.raises(AudioError) as info:
        read_audio(long_path)
    message = str(info.value)
    assert "File name too long" in message and len(message) < 400


# --------------------------------------------------------------------------- the fix hint


def test_the_suggested_ffmpeg_command_never_writes_onto_its_input(tmp_path: Path) -> None:
    from jarvis.audio.files import convert_command

    for name in ("speech.wav", "it's here.wav", "speech-16k-mono.wav", "noext"):
        path = tmp_path / name
        path.write_bytes(b"this is a text file, not audio\n" * 20)
        with pytest.raises(AudioFormatError) as info:
            read_audio(path)
        command = str(info.value).split("convert it with: ", 1)[1]
        argv = shlex.split(command)
        assert argv[:3] == ["ffmpeg", "-i", str(path)]
        output = Path(argv[-1])
        assert (tmp_path / output).resolve() != path.resolve()
        assert output.name != path.name
    assert shlex.split(convert_command(Path("x.wav")))[-1] == "x-16k-mono.wav"


# --------------------------------------------------------------------------- long files


def _long_wav(path: Path, seconds: float) -> Path:
    """``seconds`` of speech (JFK, repeated) at 16 kHz, written in pieces."""
    speech: np.ndarray = sf.read(JFK, dtype="int16")[0]
    with sf.SoundFile(path, "w", samplerate=ASR_RATE, channels=1, subtype="PCM_16") as f:
        left = int(seconds * ASR_RATE)
        while left > 0:
            f.write(speech[:left])
            left -= min(left, len(speech))
    return path


def test_a_ten_minute_file_is_refused_with_the_limit_in_bounded_memory(tmp_path: Path) -> None:
    """A 10-minute WAV took 1.4 GB in ``converse``: it is refused before it is read
    (JARVIS_MAX_INPUT_S), within 1.5x the memory of transcribing a 10-second file."""
    short = _long_wav(tmp_path / "ten-seconds.wav", 10)
    long = _long_wav(tmp_path / "ten-minutes.wav", 600)
    ok, short_report = run_jarvis(tmp_path, "transcribe", str(short))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "ask not what your country" in ok.stdout
    for command in ("transcribe", "converse"):
        refused, report = run_jarvis(tmp_path, command, str(long), timeout=60)
        line = one_error_line(refused)
        assert refused.returncode == 2, refused.stderr
        assert "600.0 s of audio, longer than the 30 s limit (JARVIS_MAX_INPUT_S)" in line
        assert report["peak_mb"] <= 1.5 * short_report["peak_mb"], (report, short_report)
    # The limit is the user's: a lower one refuses the 10-second file too.
    refused, _ = run_jarvis(tmp_path, "transcribe", str(short), JARVIS_MAX_INPUT_S="5")
    assert "10.0 s of audio, longer than the 5 s limit" in one_error_line(refused)


def test_reading_in_blocks_gives_the_same_samples_and_stops_at_the_limit(
    tmp_path: Path,
) -> None:
    """Block-wise reading and resampling equal the whole-file result, and a limit is
    enforced while reading when the header does not state the length."""
    stereo = tmp_path / "stereo-44k.wav"
    speech = read_audio(JFK).samples
    from jarvis.audio import resample

    at_44k = resample(speech, ASR_RATE, 44100)
    sf.write(stereo, np.stack([at_44k, -at_44k], axis=1), 44100, subtype="FLOAT")
    whole = resample(np.zeros_like(at_44k), 44100, ASR_RATE)  # channels cancel: silence
    assert np.array_equal(read_audio(stereo).samples, whole)
    mono = tmp_path / "mono-44k.wav"
    sf.write(mono, at_44k, 44100, subtype="FLOAT")
    assert np.array_equal(read_audio(mono).samples, resample(at_44k, 44100, ASR_RATE))
    with pytest.raises(AudioError, match=r"11\.0 s of audio, longer than the 3 s limit "
                                         r"\(SOME_LIMIT\)"):
        read_audio(mono, max_seconds=3, limit_name="SOME_LIMIT")
    # An OGG states its length too, but decoding is what counts: stop at the limit.
    ogg = tmp_path / "speech.ogg"
    sf.write(ogg, speech, ASR_RATE, format="OGG", subtype="VORBIS")
    with pytest.raises(AudioError, match=r"longer than the 3 s limit"):
        read_audio(ogg, max_seconds=3)
    assert read_audio(ogg, max_seconds=12).duration_s == pytest.approx(11.0, abs=0.05)


def test_the_setting_is_documented_and_validated() -> None:
    from jarvis.config import load_settings
    from jarvis.errors import ConfigError

    assert load_settings({}).audio.max_input_s == 30.0
    assert load_settings({"JARVIS_MAX_INPUT_S": "600"}).audio.max_input_s == 600.0
    with pytest.raises(ConfigError, match="JARVIS_MAX_INPUT_S='0' is invalid"):
        load_settings({"JARVIS_MAX_INPUT_S": "0"})
    assert "JARVIS_MAX_INPUT_S" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- no sound device

NO_DEVICE_ASOUNDRC = textwrap.dedent("""
    # The default device names a sound card that does not exist: PortAudio can open
    # nothing, as on a server or a container without sound.
    pcm.!default { type hw card 9 device 0 }
    ctl.!default { type hw card 9 }
""")


def test_no_output_device_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    """``converse FILE`` and ``ask --speak`` printed ``jarvis> `` and exited 0 with
    nothing said on a machine with no usable output: they must say so and fail,
    before loading any model."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(NO_DEVICE_ASOUNDRC)
    request = tmp_path / "request.wav"
    request.write_bytes(wav_bytes(jfk_pcm(3.0)))
    for args in (("converse", str(request)), ("ask", "What time is it?", "--speak")):
        result, report = run_jarvis(home, *args, timeout=120)
        line = one_error_line(result)
        assert result.returncode == 2 and report["code"] == 2, result.stderr
        assert "no output device could be opened" in line, line
        assert "jarvis>" not in result.stdout


CHECK_SPEAKER = """
import asyncio
from jarvis.errors import JarvisError
from jarvis.voice.sinks import SpeakerSink
try:
    asyncio.run(SpeakerSink().check())
    print("OK")
except JarvisError as exc:
    print("ERROR", exc)
"""


def test_the_output_check_passes_where_a_device_can_play(tmp_path: Path) -> None:
    """The check opens the device and closes it: fine on a usable output (an ALSA file
    device here), an error without one."""
    usable, broken = tmp_path / "usable", tmp_path / "broken"
    write_asoundrc(usable, usable / "mic.raw")
    broken.mkdir()
    (broken / ".asoundrc").write_text(NO_DEVICE_ASOUNDRC)
    assert run_with_home(usable, CHECK_SPEAKER).stdout.strip() == "OK"
    assert run_with_home(broken, CHECK_SPEAKER).stdout.startswith(
        "ERROR no output device could be opened: ")


def test_converse_with_nothing_to_answer_says_so(tmp_path: Path) -> None:
    """A file with no speech in it was "answered" with an empty ``jarvis> `` and exit 0."""
    silent = tmp_path / "silence.wav"
    silent.write_bytes(wav_bytes(bytes(2 * ASR_RATE * 2)))
    result, _ = run_jarvis(tmp_path, "converse", str(silent), "--output",
                           str(tmp_path / "reply.wav"), timeout=300, JARVIS_WARMUP="false")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "jarvis: nothing answered: no speech was heard in it" in result.stderr
    assert "jarvis>" not in result.stdout and not (tmp_path / "reply.wav").exists()
