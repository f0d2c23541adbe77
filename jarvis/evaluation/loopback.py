"""A simulated living room for the voice loop: one full-duplex sound device whose
microphone hears the person *and* what its own speaker plays, through a
:class:`~jarvis.evaluation.room.Room` (delay, reverberation, attenuation).

It is both the pipeline's microphone (:meth:`LoopbackRoom.microphone`) and its sink
(``play``, ``pause``, ``resume``, as :class:`~jarvis.voice.sinks.SpeakerSink`), driven
by one sample clock, as a real sound card is: each 32 ms tick, the speaker plays the
next samples of its queue (nothing while paused), they are pushed to the echo
reference as the real speaker does, their echo is added to what the microphone hears
``delay_ms`` later, and the person's scheduled speech is mixed in. Everything is
measured on that clock, from the audio: when the speaker went quiet, and where the
person's speech truly started.

Only the acoustics are simulated; the pipeline, the echo canceller, the wake word, the
VAD, the model and the voice are the real ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from jarvis.audio.echo import EchoReference
from jarvis.audio.formats import ASR_RATE, FloatArray, to_float32
from jarvis.audio.resample import Resampler
from jarvis.evaluation.room import Room
from jarvis.speech.tts import TtsChunk

TICK = 512
"""Samples per microphone chunk (32 ms), as the real microphone delivers them."""


def speech_onset(audio: npt.ArrayLike, *, threshold_dbfs: float = -40.0,
                 window: int = 160) -> int:
    """The first sample of a 10 ms window whose level reaches ``threshold_dbfs``: the
    true start of speech in a clean recording (-1 if it never does)."""
    x = to_float32(audio).reshape(-1)
    usable = len(x) // window * window
    if not usable:
        return -1
    rms = np.sqrt(np.mean(x[:usable].reshape(-1, window) ** 2, axis=1))
    loud = np.flatnonzero(rms >= 10.0 ** (threshold_dbfs / 20.0))
    return int(loud[0]) * window if len(loud) else -1


@dataclass
class Quiet:
    """The speaker went quiet at ``sample`` (mic clock) because of ``why``."""

    sample: int
    why: str
    """"pause" (a possible barge-in) or "cut" (the reply was cancelled)."""


@dataclass
class _Said:
    start: int
    audio: FloatArray = field(repr=False)


class LoopbackRoom:
    """See the module docstring. ``reference`` is the echo canceller's far end (None:
    no echo cancellation, the speaker is still heard)."""

    def __init__(self, room: Room, *, reference: EchoReference | None = None,
                 realtime: bool = True) -> None:
        self.room = room
        self.reference = reference
        self.realtime = realtime
        self.position = 0
        """Samples the microphone has delivered (the shared clock)."""
        self.quiet: list[Quiet] = []
        self.playing_since: int | None = None
        """When the current reply's first sample was played (None between replies)."""
        self.on_first_sample: Callable[[int], None] | None = None
        """Called with the clock when a reply's first sample is played."""
        self._rir = room.rir * 10.0 ** (room.gain_db / 20.0)
        self._delay = round(room.delay_ms * ASR_RATE / 1000.0)
        self._echo = np.zeros(self._delay + len(self._rir) + 2 * TICK, dtype=np.float32)
        self._queue: deque[FloatArray] = deque()
        self._drained = asyncio.Event()
        self._paused = False
        self._said: list[_Said] = []
        self._closed = False
        self._noise_rng = np.random.default_rng(room.seed + 7)

    # ------------------------------------------------------------------ the person

    def say(self, audio: npt.ArrayLike, at: int) -> int:
        """Schedule the person's ``audio`` (16 kHz) to start at sample ``at``; returns
        the sample where its speech truly starts."""
        x = to_float32(audio).reshape(-1)
        self._said.append(_Said(at, x))
        return at + max(0, speech_onset(x))

    def close(self) -> None:
        """End the microphone stream after the current tick."""
        self._closed = True

    # ------------------------------------------------------------------ the microphone

    async def microphone(self) -> AsyncIterator[FloatArray]:
        """The microphone: person + echo + noise, 32 ms at a time, paced in real time
        (unless ``realtime`` is off)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._closed:
            if self.realtime:
                delay = start + self.position / ASR_RATE - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield self._tick()

    def _tick(self) -> FloatArray:
        n = TICK
        played = self._play(n)
        if self.reference is not None and (played.any() or self.playing_since is not None):
            self.reference.push(played, ASR_RATE)
        if played.any():
            contribution = np.convolve(played, self._rir).astype(np.float32)
            self._echo[self._delay:self._delay + len(contribution)] += contribution
        mic: FloatArray = self._echo[:n].copy()
        self._echo = np.concatenate([self._echo[n:], np.zeros(n, dtype=np.float32)])
        for said in self._said:
            lo = max(said.start, self.position)
            hi = min(said.start + len(said.audio), self.position + n)
            if lo < hi:
                mic[lo - self.position:hi - self.position] += said.audio[
                    lo - said.start:hi - said.start]
        if self.room.noise_dbfs is not None:
            mic += (self._noise_rng.standard_normal(n)
                    * 10.0 ** (self.room.noise_dbfs / 20.0)).astype(np.float32)
        self.position += n
        return mic

    def _play(self, n: int) -> FloatArray:
        out = np.zeros(n, dtype=np.float32)
        if self._paused:
            return out
        filled = 0
        while filled < n and self._queue:
            head = self._queue[0]
            take = min(n - filled, len(head))
            out[filled:filled + take] = head[:take]
            filled += take
            if take == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[take:]
        if filled and self.playing_since is None:
            self.playing_since = self.position
            if self.on_first_sample is not None:
                self.on_first_sample(self.position)
        if not self._queue:
            self._drained.set()
        return out

    # ------------------------------------------------------------------ the speaker

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None:
        resampler = Resampler(rate, ASR_RATE) if rate != ASR_RATE else None
        try:
            async for chunk in chunks:
                data = to_float32(chunk.samples).reshape(-1)
                if resampler is not None:
                    data = resampler.process(data)
                if len(data):
                    self._drained.clear()
                    self._queue.append(data)
            if resampler is not None:
                tail = resampler.flush()
                if len(tail):
                    self._drained.clear()
                    self._queue.append(tail)
            while self._queue:
                self._drained.clear()
                await self._drained.wait()
        except asyncio.CancelledError:
            if self._queue and not self._paused:
                self.quiet.append(Quiet(self.position, "cut"))
            self._queue.clear()
            if self.reference is not None:
                self.reference.clear()
            raise
        finally:
            self.playing_since = None
            self._paused = False

    def pause(self) -> None:
        if not self._paused and self._queue:
            self.quiet.append(Quiet(self.position, "pause"))
        self._paused = True

    def resume(self) -> None:
        self._paused = False


class NoPause:
    """The same sink without ``pause``: barge-in as it was before the pause (the reply
    stops only when speech is confirmed), for comparison."""

    def __init__(self, room: LoopbackRoom) -> None:
        self.room = room

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None:
        await self.room.play(chunks, rate)
