"""Band-limited sample-rate conversion in numpy (no scipy), one-shot or streaming.

A windowed-sinc (Kaiser) polyphase resampler for any pair of integer rates. Output
sample ``n`` sits at input position ``n * src / dst`` and is the dot product of the
input around it with one of ``up`` precomputed filter phases, so a stream cut into
chunks of any size gives exactly the same samples as the whole signal at once, with
no delay: ``len(out) == ceil(len(in) * dst / src)``. The cut-off sits at 95 % of the
lower Nyquist frequency, so resampling never aliases.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import FloatArray, to_float32

_ZERO_CROSSINGS = 16
_ROLLOFF = 0.95
_KAISER_BETA = 8.6
_BLOCK = 4096
_TABLE_GROUP_ELEMENTS = 1 << 18
"""Filter taps computed at once while building the table (float64 temporaries)."""
_MAX_TAPS = 1 << 25
"""Largest filter table (128 MiB of float32): any pair of rates from 8 to 192 kHz needs
far less (at most about 7 million taps)."""


class Resampler:
    """Streaming resampler from ``src_rate`` to ``dst_rate`` (mono float32).

    Call :meth:`process` with consecutive chunks and :meth:`flush` once at the end;
    the outputs concatenated equal :func:`resample` of the whole input.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        g = math.gcd(src_rate, dst_rate)
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self.up, self.down = dst_rate // g, src_rate // g
        self.passthrough = self.up == self.down
        cutoff = 0.5 * min(1.0, self.up / self.down) * _ROLLOFF  # cycles per input sample
        half_width = _ZERO_CROSSINGS / (2.0 * cutoff)  # in input samples
        self.width = math.ceil(half_width)
        if self.up * 2 * self.width > _MAX_TAPS:  # e.g. a file header claiming 2**31-1 Hz
            raise ValueError(
                f"cannot resample {src_rate} -> {dst_rate} Hz: its filter would need "
                f"{self.up * 2 * self.width} taps (at most {_MAX_TAPS})"
            )
        # Phase p (output position frac = p / up) uses inputs base-width+1 .. base+width.
        ks = np.arange(-self.width + 1, self.width + 1, dtype=np.float64)
        self._taps = np.empty((self.up, len(ks)), dtype=np.float32)
        # Built a group of phases at a time: an odd rate pair (up to 16,000 phases of
        # hundreds of taps) then needs its float32 table and little more.
        group = max(1, _TABLE_GROUP_ELEMENTS // len(ks))
        for first in range(0, self.up, group):
            phases = np.arange(first, min(first + group, self.up), dtype=np.float64)
            tau = phases[:, None] / self.up - ks[None, :]  # input sample -> output position
            window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (tau / half_width) ** 2, 0.0,
                                                          None)))
            window /= np.i0(_KAISER_BETA)
            window[np.abs(tau) >= half_width] = 0.0
            self._taps[first:first + len(phases)] = 2.0 * cutoff * np.sinc(2.0 * cutoff * tau) \
                * window
        self._offsets = np.arange(-self.width + 1, self.width + 1, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Forget the stream so far."""
        # Input samples before index 0 are zeros: the buffer starts at -width.
        self._buf: FloatArray = np.zeros(self.width, dtype=np.float32)
        self._buf_start = -self.width
        self._total_in = 0
        self._next_out = 0
        self._flushed = False

    def process(self, chunk: npt.ArrayLike) -> FloatArray:
        """Resample the next chunk; returns every output sample that is complete."""
        x = to_float32(chunk).reshape(-1)
        if self._flushed:
            raise RuntimeError("Resampler.process() after flush(); call reset() first")
        if self.passthrough:
            self._total_in += len(x)
            copied: FloatArray = x.copy()
            return copied
        if len(x):
            self._buf = np.concatenate([self._buf, x])
            self._total_in += len(x)
        # Output n needs inputs up to base(n) + width, base(n) = n * down // up.
        last_input = self._total_in - 1
        end = self._last_output_needing(last_input - self.width)
        return self._produce(end)

    def flush(self) -> FloatArray:
        """The remaining output, treating the input after the end as silence."""
        if self.passthrough:
            self._flushed = True
            return np.zeros(0, dtype=np.float32)
        self._buf = np.concatenate([self._buf, np.zeros(self.width + 1, dtype=np.float32)])
        end = -(-self._total_in * self.up // self.down)  # ceil: outputs before the end
        out = self._produce(end)
        self._flushed = True
        return out

    def _last_output_needing(self, max_base: int) -> int:
        """One past the last output n with n * down // up <= max_base."""
        if max_base < 0:
            return self._next_out
        end = ((max_base + 1) * self.up + self.down - 1) // self.down
        limit = -(-self._total_in * self.up // self.down)
        return max(self._next_out, min(end, limit))

    def _produce(self, end: int) -> FloatArray:
        start = self._next_out
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        pieces: list[FloatArray] = []
        for block in range(start, end, _BLOCK):
            n = np.arange(block, min(block + _BLOCK, end), dtype=np.int64)
            pos = n * self.down
            base, phase = pos // self.up, pos % self.up
            idx = base[:, None] + self._offsets[None, :] - self._buf_start
            values = self._buf[idx]
            pieces.append(np.einsum("ij,ij->i", values, self._taps[phase]).astype(np.float32))
        self._next_out = end
        # Keep only what later outputs can still reach.
        keep_from = (end * self.down) // self.up - self.width + 1
        drop = max(0, keep_from - self._buf_start)
        if drop:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return np.concatenate(pieces)


def resample(samples: npt.ArrayLike, src_rate: int, dst_rate: int) -> FloatArray:
    """Resample a whole mono signal; returns float32 (the input itself if rates match)."""
    x = to_float32(samples).reshape(-1)
    if src_rate == dst_rate:
        return x
    r = Resampler(src_rate, dst_rate)
    head = r.process(x)
    tail = r.flush()
    return np.concatenate([head, tail])
