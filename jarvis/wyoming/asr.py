"""Speech to text over Wyoming: ``audio-start`` / ``audio-chunk``\\* / ``audio-stop`` →
``transcript``.

Audio comes in any rate (8–192 kHz), sample width (1–4 bytes) and channel count (1–256);
each chunk is converted on arrival (channels averaged, resampled to 16 kHz with the
streaming resampler), so at ``audio-stop`` only whisper is left to run, on the real
length of the utterance (:class:`~jarvis.speech.asr.WhisperAsr`). A chunk may end in
the middle of a sample frame: the rest waits for the next chunk. A stream longer than
the utterance limit (``JARVIS_VAD_MAX_UTTERANCE_S``) is refused as soon as it passes
it, so a client cannot make the server hold unbounded audio.

Recognition encodes only the real length (``JARVIS_ASR_TRIM_PADDING``); a transcript
the decoder was unsure of (average log-probability below
:data:`DOUBTFUL_LOGPROB`) is decoded again the standard way, with 30 s of padding. On
spoken commands that re-decode fixes most of the words the shortcut gets wrong and
runs for about one utterance in five, so the median stays the fast path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from jarvis.audio.formats import ASR_RATE, FloatArray, format_problem, to_float32, to_mono
from jarvis.audio.resample import Resampler
from jarvis.wyoming.protocol import WyomingError

if TYPE_CHECKING:  # annotations only: the satellite decodes PCM with this module, no ASR
    from jarvis.speech.asr import Transcript, WhisperAsr

log = logging.getLogger(__name__)

DOUBTFUL_LOGPROB = -0.2
"""A trimmed decode with a lower average token log-probability is decoded again with
the full padding. Measured on 66 piper commands (bench/wyoming_bench.py's corpus, three
voicings, 357 words): every wrong trimmed transcript scored below -0.19, 13 of 66 fell
below -0.2, and word errors went from 20 to 15, as many as padding every utterance."""

SAMPLE_WIDTHS = (1, 2, 3, 4)
"""Bytes per sample accepted: 8-bit unsigned, 16-, 24- and 32-bit signed PCM."""


def pcm_problem(rate: int, width: int, channels: int) -> str | None:
    """Why audio in this format cannot be read as PCM (None when it can)."""
    if width not in SAMPLE_WIDTHS:
        return f"sample width {width} bytes is not PCM (1, 2, 3 or 4)"
    return format_problem(rate, channels)


class AudioStream:
    """One utterance being received: its format, the audio so far at 16 kHz mono."""

    def __init__(self, rate: int, width: int, channels: int, *, max_s: float) -> None:
        problem = pcm_problem(rate, width, channels)
        if problem is not None:
            raise WyomingError(f"audio-start: unsupported audio format: {problem}",
                               "unsupported_audio_format")
        self.rate, self.width, self.channels = rate, width, channels
        self.max_s = max_s
        self.frames = 0
        """Sample frames received, at the input rate."""
        self._frame_bytes = width * channels
        self._rest = b""
        self._parts: list[FloatArray] = []
        self._resampler = Resampler(rate, ASR_RATE)

    @property
    def format(self) -> tuple[int, int, int]:
        return self.rate, self.width, self.channels

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def feed(self, audio: bytes, fmt: tuple[int, int, int]) -> None:
        """Add one chunk (``fmt`` = its rate, width, channels, which must be the stream's)."""
        if fmt != self.format:
            raise WyomingError(
                f"audio-chunk: format {fmt_text(fmt)} differs from the audio-start's "
                f"{fmt_text(self.format)}", "unsupported_audio_format")
        data = self._rest + audio
        usable = len(data) - len(data) % self._frame_bytes
        self._rest = data[usable:]
        frames = usable // self._frame_bytes
        if not frames:
            return
        if (self.frames + frames) / self.rate > self.max_s:
            raise WyomingError(
                f"audio longer than {self.max_s:g} s (JARVIS_VAD_MAX_UTTERANCE_S): end the "
                "utterance sooner or raise the limit", "audio_too_long")
        self.frames += frames
        samples = decode_pcm(data[:usable], self.width).reshape(frames, self.channels)
        self._parts.append(self._resampler.process(to_mono(samples)))

    def finish(self) -> FloatArray:
        """All of the utterance at 16 kHz mono (the resampler's tail included)."""
        self._parts.append(self._resampler.flush())
        samples = np.concatenate(self._parts)
        self._parts = []
        return samples


def decode_pcm(data: bytes, width: int) -> FloatArray:
    """Little-endian PCM bytes to float32 in [-1, 1] (8-bit is unsigned, as in WAV)."""
    if width == 1:
        return to_float32(np.frombuffer(data, dtype=np.uint8))
    if width == 2:
        return to_float32(np.frombuffer(data, dtype="<i2"))
    if width == 4:
        return to_float32(np.frombuffer(data, dtype="<i4"))
    triplets = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
    values = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
    values = np.where(values >= 1 << 23, values - (1 << 24), values)
    return (values / float(1 << 23)).astype(np.float32)


def fmt_text(fmt: tuple[int, int, int]) -> str:
    rate, width, channels = fmt
    return f"{rate} Hz, {width * 8}-bit, {channels} channel{'s' if channels != 1 else ''}"


async def recognise(asr: WhisperAsr, samples: FloatArray) -> Transcript:
    """``samples`` (16 kHz mono) to text: the trimmed decode, and the padded one when
    the trimmed one is doubtful (see :data:`DOUBTFUL_LOGPROB`)."""
    result = await asr.transcribe_async(samples)
    if result.method == "trimmed" and result.avg_logprob is not None \
            and result.avg_logprob < DOUBTFUL_LOGPROB:
        again = await asr.transcribe_async(samples, trim_padding=False)
        log.debug("doubtful transcript %r (avg log-prob %.2f) decoded again: %r",
                  result.text, result.avg_logprob, again.text)
        return again
    return result
