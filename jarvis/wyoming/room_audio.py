"""A room's microphone as its satellite sends it: ``audio-chunk`` payloads in whatever
PCM format the satellite uses, turned into 16 kHz mono for the room's voice pipeline,
never faster than real time.

A satellite streams at the pace of its microphone. One that sends faster (a bug, a
file played as a microphone, a replay) would make the hub spend its two cores on one
room's voice activity detection: audio beyond a burst of :data:`BURST_S` over real
time is dropped, and one that keeps it up for :data:`FLOOD_LIMIT_S` of dropped audio
is a :class:`FloodError` (the room is marked unavailable and reconnected).

While the room's speaker plays a reply the microphone is replaced by silence
(:meth:`RoomAudio.mute_until`): satellites have no echo cancellation, and the hub would
otherwise hear its own reply as the next request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from jarvis.audio.formats import ASR_RATE, FloatArray, to_mono
from jarvis.audio.resample import Resampler
from jarvis.errors import JarvisError
from jarvis.wyoming.asr import decode_pcm, fmt_text, pcm_problem

log = logging.getLogger(__name__)

BURST_S = 3.0
"""Audio a satellite may send ahead of real time (network jitter, a stall caught up)."""
FLOOD_LIMIT_S = 5.0
"""Audio dropped in one flood before the satellite counts as broken."""

Format = tuple[int, int, int]
"""(rate, width, channels)."""


class RoomAudioError(JarvisError):
    """Audio this room cannot use (an unsupported format)."""


class FloodError(JarvisError):
    """The satellite sends audio faster than real time and keeps on."""


class RoomAudio:
    """Satellite audio in, 16 kHz mono float chunks out (:meth:`chunks`)."""

    def __init__(self, room: str, *, burst_s: float = BURST_S,
                 flood_limit_s: float = FLOOD_LIMIT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.room = room
        self.burst_s = burst_s
        self.flood_limit_s = flood_limit_s
        self._clock = clock
        self._queue: asyncio.Queue[FloatArray | None] = asyncio.Queue()
        self._format: Format | None = None
        self._resampler: Resampler | None = None
        self._rest = b""
        self._tokens = burst_s
        self._stamp = clock()
        self._flooding = 0.0
        """Seconds dropped in the flood going on (0 when none)."""
        self._muted_until = 0.0
        self.received_s = 0.0
        """Seconds of audio received (at the satellite's rate)."""
        self.dropped_s = 0.0
        """Seconds of audio dropped for coming faster than real time."""
        self.last_audio_at: float | None = None
        self.closed = False

    # ------------------------------------------------------------------ in

    def feed(self, payload: bytes, fmt: Format) -> None:
        """One ``audio-chunk``. RoomAudioError for a format that cannot be read,
        FloodError once the satellite has flooded for :attr:`flood_limit_s`."""
        if self.closed:
            return
        rate, width, channels = fmt
        if fmt != self._format:
            self._start_format(fmt)
        data = self._rest + payload
        frame = width * channels
        usable = len(data) - len(data) % frame
        self._rest = data[usable:]
        frames = usable // frame
        if not frames:
            return
        now = self._clock()
        self.last_audio_at = now
        seconds = frames / rate
        self.received_s += seconds
        if not self._admit(seconds, now):
            return
        assert self._resampler is not None
        samples = decode_pcm(data[:usable], width).reshape(frames, channels)
        out = self._resampler.process(to_mono(samples))
        if now < self._muted_until:
            out = np.zeros_like(out)  # the room's own reply is playing: hear silence
        if len(out):
            self._queue.put_nowait(out)

    def silence(self, seconds: float) -> None:
        """Add ``seconds`` of silence (the satellite stopped its stream: an utterance in
        progress reaches its endpoint)."""
        if not self.closed and seconds > 0:
            self._queue.put_nowait(np.zeros(int(seconds * ASR_RATE), np.float32))

    def mute_until(self, when: float) -> None:
        """Hear silence from this room until ``when`` (``time.monotonic()``)."""
        self._muted_until = max(self._muted_until, when)

    def unmute(self) -> None:
        self._muted_until = 0.0

    def close(self) -> None:
        """End :meth:`chunks` (the connection is gone)."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    def _start_format(self, fmt: Format) -> None:
        rate, width, channels = fmt
        problem = pcm_problem(rate, width, channels)
        if problem is not None:
            raise RoomAudioError(f"audio in an unsupported format ({fmt_text(fmt)}): {problem}")
        if self._format is not None:
            log.info("room %s: the satellite's audio is now %s (was %s)", self.room,
                     fmt_text(fmt), fmt_text(self._format))
        self._format = fmt
        self._resampler = Resampler(rate, ASR_RATE)
        self._rest = b""

    def _admit(self, seconds: float, now: float) -> bool:
        """The real-time budget (a token bucket of :attr:`burst_s` seconds)."""
        self._tokens = min(self.burst_s, self._tokens + (now - self._stamp))
        self._stamp = now
        if self._tokens >= seconds:
            self._tokens -= seconds
            if self._flooding and self._tokens >= self.burst_s / 2:
                log.info("room %s: the satellite's audio is back to real time (%.1f s "
                         "were dropped)", self.room, self._flooding)
                self._flooding = 0.0
            return True
        if not self._flooding:
            log.warning("room %s: the satellite sends audio faster than real time; the "
                        "excess is dropped", self.room)
        self._flooding += seconds
        self.dropped_s += seconds
        if self._flooding > self.flood_limit_s:
            raise FloodError(
                f"the satellite sends audio faster than real time ({self.received_s:.0f} s "
                f"of audio so far, {self.dropped_s:.0f} s dropped): is its microphone a "
                "file or a replay?")
        return False

    # ------------------------------------------------------------------ out

    async def chunks(self) -> AsyncIterator[FloatArray]:
        """The room's audio at 16 kHz mono until :meth:`close`."""
        while (chunk := await self._queue.get()) is not None:
            yield chunk
