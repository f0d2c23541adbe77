"""Sample formats: the one internal representation and conversions to and from it.

Inside Jarvis audio is a 1-D ``float32`` numpy array in [-1, 1] at a known sample
rate (16 kHz for everything that goes to VAD and ASR, the voice's rate for TTS).
``int16`` is used only at the edges (WAV files, piper's output, some devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float32]
Int16Array: TypeAlias = npt.NDArray[np.int16]

ASR_RATE = 16000
"""Sample rate of everything fed to VAD and ASR."""

MIN_FILE_RATE = 8000
"""Lowest sample rate a sound file may have (telephone audio)."""
MAX_FILE_RATE = 192000
"""Highest sample rate a sound file may have (studio recordings)."""
MAX_CHANNELS = 256
"""Most channels a sound file may have (libsndfile itself stops at 1024)."""

_INT16_SCALE = 32768.0


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples and their rate."""

    samples: FloatArray
    rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate if self.rate else 0.0


def format_problem(rate: int, channels: int) -> str | None:
    """Why a sound file with this sample rate and channel count cannot be real audio
    (None when it can).

    A header is whatever its writer put there: 1 Hz or 2**31-1 Hz would make the
    resampler allocate without bound (every input sample becomes 16,000 output samples,
    or its filter table grows to hundreds of GiB), and 0 channels has no samples at all.
    """
    if channels < 1:
        return f"the header says it has {channels} channels"
    if channels > MAX_CHANNELS:
        return f"the header says it has {channels} channels; at most {MAX_CHANNELS} are read"
    if not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
        return (f"the header says its sample rate is {rate} Hz; sound files are read at "
                f"{MIN_FILE_RATE // 1000} to {MAX_FILE_RATE // 1000} kHz")
    return None


def to_float32(samples: npt.ArrayLike) -> FloatArray:
    """Any integer or float PCM array to float32 in [-1, 1] (same shape).

    Integers are scaled by their type's full range (int16 by 32768, int32 by 2**31,
    uint8 is offset-binary as in 8-bit WAV); floats are cast as they are.
    """
    arr = np.asarray(samples)
    if arr.dtype == np.float32:
        return arr
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return ((arr.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if arr.dtype.kind == "i":
        scale = float(2 ** (8 * arr.dtype.itemsize - 1))
        return (arr.astype(np.float64) / scale).astype(np.float32)
    if arr.dtype.kind == "b":
        return arr.astype(np.float32)
    raise TypeError(f"cannot convert {arr.dtype} samples to float32")


def to_int16(samples: npt.ArrayLike) -> Int16Array:
    """float (any range; clipped to [-1, 1]) or int16 samples to int16."""
    arr = np.asarray(samples)
    if arr.dtype == np.int16:
        return arr
    f = to_float32(arr)
    return np.clip(np.round(f * _INT16_SCALE), -32768, 32767).astype(np.int16)


def to_mono(samples: npt.ArrayLike) -> FloatArray:
    """``(frames,)`` or ``(frames, channels)`` to ``(frames,)`` float32, averaging channels."""
    arr = to_float32(samples)
    if arr.ndim == 1:
        return arr
    if arr.ndim != 2:
        raise ValueError(f"expected (frames,) or (frames, channels) samples, got shape {arr.shape}")
    if arr.shape[1] == 1:
        return np.ascontiguousarray(arr[:, 0])
    mono: FloatArray = arr.mean(axis=1, dtype=np.float32)
    return mono


def peak(samples: FloatArray) -> float:
    """Largest absolute sample value (0.0 for no samples)."""
    return float(np.max(np.abs(samples))) if len(samples) else 0.0

