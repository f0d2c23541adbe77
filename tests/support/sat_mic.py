"""A microphone for ``wyoming-satellite --mic-command``: raw s16le on stdout, paced in
real time.

    python sat_mic.py WAV [WAV ...] [--rate 16000] [--channels 1] [--lead-s 0.5]
                      [--gap-s 1.0] [--marks FILE] [--loop-silence | --no-loop-silence]

The stream is ``--lead-s`` of silence, each WAV (converted to ``--rate`` and
``--channels``: linear resampling, the mono signal copied to every channel) with
``--gap-s`` of silence between WAVs, then silence until whoever reads stdout closes it
(``--loop-silence``, the default, what a microphone does) or an exit at the end of the
last WAV (``--no-loop-silence``). It writes chunks of 1024 frames, each when the
sample clock (``time.monotonic()`` at the start, plus frames / rate) says the chunk's
last frame has been "recorded", as a sound card would.

``--marks FILE`` appends JSON lines ``{"event": ..., "t": time.monotonic(), ...}``:

* ``start``: the origin of the sample clock (``"rate"``, ``"channels"``);
* ``speech_start`` / ``speech_end`` for each WAV (``"index"``, ``"frame"`` in the
  stream): when the chunk holding the WAV's first / last voiced sample was written
  (voiced: in a 20 ms frame whose RMS is above 1 % of full scale, or above the
  recording's noise floor: see :func:`voiced_threshold`; ``--voiced-rms`` sets it);
* ``end``: the last WAV's last chunk was written.

``--wait-for PREFIX``: before WAV *i* (from 0) the microphone hears silence until a file
``PREFIX<i>`` exists, so a test or benchmark says when each request is spoken (a
satellite drops what its microphone hears before a hub runs it).

``CLOCK_MONOTONIC`` is system-wide, so a benchmark can compare these times with
``time.monotonic()`` in other processes on the machine.

Standalone: stdlib and numpy only (it runs under whichever Python the test passes in
the mic command). :func:`mic_command` builds the argv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

CHUNK_FRAMES = 1024
VOICED_THRESHOLD = 0.01
"""The least RMS (fraction of full scale) of a voiced 20 ms frame."""
FRAME_S = 0.02
SCRIPT = Path(__file__).resolve()

Int16Array = npt.NDArray[np.int16]


def mic_command(wavs: Sequence[Path], *, rate: int = 16000, channels: int = 1,
                lead_s: float = 0.5, gap_s: float = 1.0, marks: Path | None = None,
                loop_silence: bool = True, voiced_rms: float | None = None,
                python: str | None = None, wait_for: str | None = None,
                chunk_frames: int = CHUNK_FRAMES) -> list[str]:
    """The argv that runs this script (under ``python``, default this interpreter)."""
    argv = [python or sys.executable, str(SCRIPT), *map(str, wavs), "--rate", str(rate),
            "--channels", str(channels), "--lead-s", str(lead_s), "--gap-s", str(gap_s),
            "--loop-silence" if loop_silence else "--no-loop-silence"]
    if marks is not None:
        argv += ["--marks", str(marks)]
    if voiced_rms is not None:
        argv += ["--voiced-rms", str(voiced_rms)]
    if wait_for is not None:
        argv += ["--wait-for", wait_for]
    if chunk_frames != CHUNK_FRAMES:
        argv += ["--chunk-frames", str(chunk_frames)]
    return argv


# --------------------------------------------------------------------------- audio


def read_wav_mono(path: Path) -> tuple[npt.NDArray[np.float64], int]:
    """The 16-bit PCM WAV at ``path`` as mono floats in [-1, 1] (channels averaged) and
    its sample rate."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: {8 * wav.getsampwidth()}-bit WAV; only 16-bit PCM")
        channels, rate = wav.getnchannels(), wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    return samples.reshape(-1, channels).mean(axis=1), rate


def resample(samples: npt.NDArray[np.float64], src_rate: int,
             dst_rate: int) -> npt.NDArray[np.float64]:
    """``samples`` at ``dst_rate``, by linear interpolation."""
    if src_rate == dst_rate or len(samples) == 0:
        return samples
    count = round(len(samples) * dst_rate / src_rate)
    positions = np.arange(count) * (src_rate / dst_rate)
    resampled: npt.NDArray[np.float64] = np.interp(positions, np.arange(len(samples)),
                                                   samples)
    return resampled


def to_int16(samples: npt.NDArray[np.float64]) -> Int16Array:
    """Floats in [-1, 1] as s16, clipped."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def voiced_span(pcm: Int16Array, rate: int,
                threshold: float | None = None) -> tuple[int, int] | None:
    """The first and last sample of the voiced part of ``pcm``: from the start of the
    first to the end of the last 20 ms frame whose RMS exceeds ``threshold`` (a
    fraction of full scale; default :func:`voiced_threshold`). None if no frame does."""
    size = max(1, round(rate * FRAME_S))
    count = len(pcm) // size
    if count == 0:
        return None
    frames = pcm[:count * size].astype(np.float64).reshape(count, size) / 32768.0
    rms = np.sqrt((frames**2).mean(axis=1))
    limit = voiced_threshold(rms) if threshold is None else threshold
    voiced = np.flatnonzero(rms > limit)
    if len(voiced) == 0:
        return None
    return int(voiced[0]) * size, (int(voiced[-1]) + 1) * size - 1


def voiced_threshold(rms: npt.NDArray[np.float64]) -> float:
    """An RMS level between a recording's noise floor and its speech: 1 % of full
    scale, or ten times the noise floor (the 10th percentile frame) on a noisy
    recording, but at most a quarter of the loudest frame. On the JFK clip (floor
    about 0.9 %) this puts the end of "country" at 10.16 s, before the applause."""
    floor = float(np.percentile(rms, 10))
    return min(max(VOICED_THRESHOLD, 10 * floor), 0.25 * float(rms.max()))


@dataclass(frozen=True)
class Program:
    """The mono stream to play and the frames where marks fall."""

    pcm: Int16Array
    speech: list[tuple[int, int]]
    """Per WAV: the stream frames of its first and last voiced sample."""
    starts: list[int]
    """Per WAV: the stream frame it starts at."""


def build_program(wavs: Sequence[Path], rate: int, lead_s: float, gap_s: float,
                  voiced_rms: float | None = None) -> Program:
    """Lead silence, the WAVs at ``rate`` with gaps between, as one mono s16 stream."""
    parts: list[Int16Array] = [np.zeros(round(lead_s * rate), dtype=np.int16)]
    speech: list[tuple[int, int]] = []
    starts: list[int] = []
    offset = len(parts[0])
    for index, path in enumerate(wavs):
        if index:
            gap = np.zeros(round(gap_s * rate), dtype=np.int16)
            parts.append(gap)
            offset += len(gap)
        starts.append(offset)
        samples, wav_rate = read_wav_mono(path)
        pcm = to_int16(resample(samples, wav_rate, rate))
        span = voiced_span(pcm, rate, voiced_rms)
        first, last = span if span is not None else (0, max(len(pcm) - 1, 0))
        speech.append((offset + first, offset + last))
        parts.append(pcm)
        offset += len(pcm)
    return Program(np.concatenate(parts), speech, starts)


def interleave(mono: Int16Array, channels: int) -> bytes:
    """``mono`` as s16le frames of ``channels`` identical samples."""
    frames = np.repeat(mono.astype("<i2")[:, None], channels, axis=1)
    return frames.tobytes()


# --------------------------------------------------------------------------- streaming


class Marks:
    """Appends JSON lines to the marks file (nothing without one)."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = path.open("a") if path is not None else None

    def write(self, event: str, t: float | None = None, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, "t": time.monotonic() if t is None else t, **fields}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


def stream(program: Program, *, rate: int, channels: int, loop_silence: bool,
           out: IO[bytes], marks: Marks, wait_for: str | None = None,
           chunk_frames: int = CHUNK_FRAMES) -> None:
    """Write ``program`` (then silence, if ``loop_silence``) to ``out`` paced by the
    sample clock, writing marks as their chunks go out."""
    silence = bytes(chunk_frames * 2 * channels)
    pending = [(first, "speech_start", i) for i, (first, _) in enumerate(program.speech)]
    pending += [(last, "speech_end", i) for i, (_, last) in enumerate(program.speech)]
    pending.sort()
    pcm = program.pcm
    if loop_silence:  # whole chunks, so the silence after it stays on the sample clock
        pcm = np.concatenate([pcm, np.zeros(-len(pcm) % chunk_frames, dtype=np.int16)])
    audio_end, total = len(program.pcm), len(pcm)
    gates = [(start, f"{wait_for}{i}") for i, start in enumerate(program.starts)] \
        if wait_for else []
    t0 = time.monotonic()
    marks.write("start", t0, rate=rate, channels=channels)
    written = 0
    held = 0
    """Frames of silence sent while waiting for a gate (the sample clock runs on)."""
    while written < total or loop_silence:
        if gates and written + chunk_frames > gates[0][0]:
            if not os.path.exists(gates[0][1]):
                held += chunk_frames
                _sleep_until(t0 + (written + held) / rate)
                out.write(silence)
                out.flush()
                continue
            gates.pop(0)
        if written < total:
            end = min(written + chunk_frames, total)
            chunk = interleave(pcm[written:end], channels)
        else:
            end, chunk = written + chunk_frames, silence
        _sleep_until(t0 + (end + held) / rate)
        out.write(chunk)
        out.flush()
        while pending and pending[0][0] < end:
            frame, event, index = pending.pop(0)
            marks.write(event, index=index, frame=frame)
        if written < audio_end <= end:
            marks.write("end", frame=audio_end)
        written = end


def _sleep_until(due: float) -> None:
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wavs", nargs="+", type=Path, metavar="WAV")
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--lead-s", type=float, default=0.5)
    parser.add_argument("--gap-s", type=float, default=1.0)
    parser.add_argument("--marks", type=Path)
    parser.add_argument("--chunk-frames", type=int, default=CHUNK_FRAMES,
                        help="frames per write (what a sound card delivers at once)")
    parser.add_argument("--wait-for", metavar="PREFIX",
                        help="before WAV i, silence until the file PREFIX<i> exists")
    parser.add_argument("--voiced-rms", type=float,
                        help="RMS (fraction of full scale) above which a 20 ms frame is "
                             "voiced (default: from the noise floor)")
    parser.add_argument("--loop-silence", action=argparse.BooleanOptionalAction, default=True,
                        help="after the last WAV, silence until stdout closes (default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    program = build_program(args.wavs, args.rate, args.lead_s, args.gap_s, args.voiced_rms)
    marks = Marks(args.marks)
    try:
        stream(program, rate=args.rate, channels=args.channels,
               loop_silence=args.loop_silence, out=sys.stdout.buffer, marks=marks,
               wait_for=args.wait_for, chunk_frames=args.chunk_frames)
    except (BrokenPipeError, KeyboardInterrupt):
        # The reader went away: stop quietly (and keep Python's exit-time flush of
        # stdout from complaining about the closed pipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
