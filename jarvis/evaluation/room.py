"""A synthetic room for echo-cancellation tests and benchmarks (nothing at run time
needs it): what the microphone hears of what the speaker plays.

The echo path is a pure delay (the playback and capture buffers plus the flight time
from the speaker to the microphone), then a room impulse response (a direct path, then
exponentially decaying noise for the reverberation), then a gain (the speaker's volume
and the distance). The direct path is the first and strongest tap of the impulse
response, so the echo path's delay, as a cross-correlation would find it, is exactly
``delay_ms``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, FloatArray, to_float32
from jarvis.audio.resample import resample

_REFLECTION_GAP_MS = 3.0
"""Silence between the direct path and the first reflection (speaker and microphone
a metre or so from the nearest wall)."""


def synthetic_rir(rt60_s: float, rate: int = ASR_RATE, seed: int = 0, *,
                  drr_db: float = 3.0) -> FloatArray:
    """A room impulse response with unit energy: a direct path (tap 0), a short gap,
    then Gaussian noise whose amplitude falls by 60 dB in ``rt60_s`` seconds.

    ``drr_db`` is the direct-to-reverberant energy ratio: 3 dB is a speaker a metre
    from the microphone in a furnished room; lower is farther or barer.
    """
    if rt60_s <= 0:
        raise ValueError(f"rt60_s must be positive, got {rt60_s}")
    length = max(2, int(rt60_s * rate))
    gap = min(length - 1, max(1, int(_REFLECTION_GAP_MS * rate / 1000)))
    rng = np.random.default_rng(seed)
    t = np.arange(length - gap) / rate
    tail = rng.standard_normal(length - gap) * np.exp(-3.0 * math.log(10.0) * t / rt60_s)
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / float(np.sum(tail**2)))
    h = np.zeros(length, dtype=np.float64)
    h[0] = 1.0
    h[gap:] += tail
    peak = float(np.max(np.abs(h[1:])))
    if peak >= 1.0:  # keep the direct path the strongest tap
        h[1:] *= 0.9 / peak
    h /= math.sqrt(float(np.sum(h**2)))
    return h.astype(np.float32)


def echo_path(far: npt.ArrayLike, *, delay_ms: float, rir: npt.ArrayLike | None = None,
              gain_db: float = 0.0, rate: int = ASR_RATE) -> FloatArray:
    """What the microphone hears of ``far``: delayed by ``delay_ms`` (rounded to a
    sample), convolved with ``rir`` (none: a single tap), scaled by ``gain_db``. Same
    length as ``far``."""
    x = to_float32(far).reshape(-1).astype(np.float64)
    if rir is not None:
        x = np.convolve(x, to_float32(rir).astype(np.float64))[: len(x)]
    shift = round(delay_ms * rate / 1000)
    if shift < 0:
        raise ValueError(f"delay_ms must not be negative, got {delay_ms}")
    out = np.zeros(len(x), dtype=np.float64)
    if shift < len(x):
        out[shift:] = x[: len(x) - shift]
    scaled: FloatArray = (out * 10.0 ** (gain_db / 20.0)).astype(np.float32)
    return scaled


def erle_db(mic_echo: npt.ArrayLike, residual: npt.ArrayLike) -> float:
    """Echo return loss enhancement: the echo's energy over what is left of it, in dB
    (the signals compared over their common length). Infinite when nothing is left."""
    e = to_float32(mic_echo).reshape(-1).astype(np.float64)
    r = to_float32(residual).reshape(-1).astype(np.float64)
    n = min(len(e), len(r))
    echo, left = float(np.sum(e[:n] ** 2)), float(np.sum(r[:n] ** 2))
    if left == 0.0:
        return math.inf
    if echo == 0.0:
        return -math.inf
    return 10.0 * math.log10(echo / left)


def level_db(samples: npt.ArrayLike) -> float:
    """RMS level in dB full scale (-inf for silence)."""
    x = to_float32(samples).reshape(-1).astype(np.float64)
    rms = math.sqrt(float(np.mean(x**2))) if len(x) else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def best_lag(reference: npt.ArrayLike, signal: npt.ArrayLike,
             max_lag: int = 400) -> tuple[int, float]:
    """(lag, correlation): the lag in samples, 0 to ``max_lag``, at which ``signal``
    best matches ``reference`` delayed (``signal[t] ~ reference[t - lag]``), and the
    Pearson correlation there. An echo canceller's output is a little late (AEC3:
    8 ms), so a comparison with the clean signal has to find that lag first."""
    ref = to_float32(reference).reshape(-1).astype(np.float64)
    sig = to_float32(signal).reshape(-1).astype(np.float64)
    n = min(len(ref), len(sig))
    max_lag = max(0, min(max_lag, n - 2))
    if n < 2:
        return 0, 0.0
    size = 1 << (n + max_lag).bit_length()
    spectrum = np.conj(np.fft.rfft(ref[:n] - ref[:n].mean(), size)) \
        * np.fft.rfft(sig[:n] - sig[:n].mean(), size)
    lag = int(np.argmax(np.fft.irfft(spectrum, size)[: max_lag + 1]))
    a, b = ref[: n - lag], sig[lag:n]
    if float(np.std(a)) == 0.0 or float(np.std(b)) == 0.0:
        return lag, 0.0
    return lag, float(np.corrcoef(a, b)[0, 1])


@dataclass(frozen=True)
class Room:
    """An echo path: delay, reverberation, level and the microphone's own noise."""

    delay_ms: float = 50.0
    """Playback buffer + capture buffer + flight time; 20-80 ms is a typical USB
    speaker and microphone pair."""
    rt60_s: float = 0.3
    """Reverberation time: 0.3 s a furnished living room, 0.6 s a kitchen."""
    gain_db: float = -6.0
    """Echo level relative to what was sent to the speaker."""
    seed: int = 0
    drr_db: float = 3.0
    noise_dbfs: float | None = -70.0
    """The microphone's noise floor (white, RMS dBFS); None for none."""
    rate: int = ASR_RATE

    @property
    def rir(self) -> FloatArray:
        return synthetic_rir(self.rt60_s, self.rate, self.seed, drr_db=self.drr_db)

    def echo(self, far: npt.ArrayLike) -> FloatArray:
        """The echo alone (no noise, no near end)."""
        return echo_path(far, delay_ms=self.delay_ms, rir=self.rir, gain_db=self.gain_db,
                         rate=self.rate)

    def noise(self, n: int) -> FloatArray:
        """The microphone's noise floor, ``n`` samples (reproducible per seed)."""
        if self.noise_dbfs is None:
            return np.zeros(n, dtype=np.float32)
        rng = np.random.default_rng(self.seed + 1_000_003)
        noise: FloatArray = (rng.standard_normal(n)
                             * 10.0 ** (self.noise_dbfs / 20.0)).astype(np.float32)
        return noise

    def mic(self, far: npt.ArrayLike, near: npt.ArrayLike | None = None) -> FloatArray:
        """The microphone: echo of ``far`` + ``near`` (the person; zero-padded or cut
        to ``far``'s length) + noise."""
        out = self.echo(far)
        if near is not None:
            x = to_float32(near).reshape(-1)[: len(out)]
            out = out.copy()
            out[: len(x)] += x
        return (out + self.noise(len(out))).astype(np.float32)

    def label(self) -> str:
        return f"{self.delay_ms:g} ms, RT60 {self.rt60_s:g} s, {self.gain_db:+g} dB"


def rooms(delays_ms: tuple[float, ...] = (20.0, 50.0, 80.0), *,
          rt60s: tuple[float, ...] = (0.3,), gains_db: tuple[float, ...] = (-6.0,)
          ) -> list[Room]:
    """Every combination of delay, reverberation and gain (a seed per impulse
    response)."""
    return [Room(delay_ms=d, rt60_s=t, gain_db=g, seed=i)
            for i, t in enumerate(rt60s) for d in delays_ms for g in gains_db]


class _Reference(Protocol):
    def push(self, samples: npt.ArrayLike, rate: int) -> None: ...


class _Canceller(Protocol):
    def process(self, mic: FloatArray) -> FloatArray: ...


@dataclass(frozen=True)
class Playback:
    """One simulated stretch of playback and capture, all on the microphone's
    timeline at 16 kHz (sample ``i`` of each array is the same instant)."""

    far: FloatArray
    """What the speaker played."""
    echo: FloatArray
    """What the microphone heard of it."""
    near: FloatArray
    """The near end (the person) alone."""
    mic: FloatArray
    """echo + near + the microphone's noise."""
    residual: FloatArray
    """The canceller's output (the microphone itself with no canceller); a little
    shorter than ``mic`` (its last partial frame)."""
    far_start: int
    """Sample at which the first reference chunk was pushed and played."""

    def seconds(self, start_s: float, end_s: float | None = None) -> slice:
        stop = None if end_s is None else int(end_s * ASR_RATE)
        return slice(int(start_s * ASR_RATE), stop)


def _played(chunks: Sequence[tuple[npt.ArrayLike, int]], rate: int) -> list[FloatArray]:
    """The chunks at ``rate``, each run of chunks at one rate resampled as one signal
    (as a streaming resampler does it), cut back at the chunks' boundaries."""
    out: list[FloatArray] = []
    i = 0
    while i < len(chunks):
        j = i
        while j < len(chunks) and chunks[j][1] == chunks[i][1]:
            j += 1
        src = chunks[i][1]
        pieces = [to_float32(c).reshape(-1) for c, _ in chunks[i:j]]
        whole = resample(np.concatenate(pieces), src, rate)
        edges = np.cumsum([0] + [len(p) for p in pieces])
        cuts = [-(-int(e) * rate // src) for e in edges]
        cuts[-1] = len(whole)
        out.extend(whole[a:b] for a, b in itertools.pairwise(cuts))
        i = j
    return out


def play_through(room: Room, chunks: Sequence[tuple[npt.ArrayLike, int]], *,
                 canceller: _Canceller | None = None, reference: _Reference | None = None,
                 start_s: float = 0.5, tail_s: float = 1.0, near: npt.ArrayLike | None = None,
                 near_at_s: float = 0.0, mic_chunk: int = 512, lead_s: float = 0.2,
                 reference_until_s: float | None = None) -> Playback:
    """Play ``chunks`` (samples, rate), back to back from ``start_s``, through
    ``room`` while the microphone captures ``mic_chunk`` samples at a time into
    ``canceller``.

    The speaker side pushes each chunk into ``reference`` ``lead_s`` before it starts
    to play (the first one when it starts), the way a sink that writes ahead does;
    pushes after ``reference_until_s`` never happen (the speaker still plays). The
    first push lands on a microphone chunk boundary, so the reference is delivered
    exactly when the speaker starts and the echo path delay is ``room.delay_ms``.
    """
    rate = room.rate
    start = -(-int(start_s * rate) // mic_chunk) * mic_chunk
    played = _played(chunks, rate)
    far_len = sum(len(p) for p in played)
    near_x = np.zeros(0, dtype=np.float32) if near is None else to_float32(near).reshape(-1)
    near_at = int(near_at_s * rate)
    total = max(start + far_len, near_at + len(near_x)) + int(tail_s * rate)
    far = np.zeros(total, dtype=np.float32)
    far[start:start + far_len] = np.concatenate(played) if played else far[:0]
    near_track = np.zeros(total, dtype=np.float32)
    near_track[near_at:near_at + len(near_x)] = near_x
    echo = room.echo(far)
    mic = (echo + near_track + room.noise(total)).astype(np.float32)
    pushes: list[tuple[int, int]] = []  # (sample at which it is pushed, chunk index)
    at = start
    for i, p in enumerate(played):
        pushes.append((max(start, at - int(lead_s * rate)), i))
        at += len(p)
    until = math.inf if reference_until_s is None else reference_until_s * rate
    outputs: list[FloatArray] = []
    next_push = 0
    for pos in range(0, total, mic_chunk):
        while next_push < len(pushes) and pushes[next_push][0] <= pos:
            when, index = pushes[next_push]
            if reference is not None and when < until:
                samples, chunk_rate = chunks[index]
                reference.push(samples, chunk_rate)
            next_push += 1
        piece = mic[pos:pos + mic_chunk]
        outputs.append(canceller.process(piece) if canceller is not None else piece)
    residual = np.concatenate(outputs) if outputs else np.zeros(0, dtype=np.float32)
    return Playback(far, echo, near_track, mic, residual.astype(np.float32), start)
