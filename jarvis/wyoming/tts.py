"""Text to speech over Wyoming.

- ``synthesize`` → ``audio-start``, ``audio-chunk``\\*, ``audio-stop`` (what Home
  Assistant reads: it stops at the first ``audio-stop``). The text goes through the
  same streamed synthesis as a reply (:meth:`~jarvis.speech.tts.PiperTts.stream`), so
  the first chunk leaves after the first clause's first decoder window, not after the
  whole text.
- ``synthesize-start``, ``synthesize-chunk``\\*, ``synthesize-stop`` → one
  ``audio-start``, the audio of each clause as soon as its text is complete (the short
  first chunk included), ``audio-stop``, ``synthesize-stopped``. The ``synthesize``
  that Home Assistant sends inside a stream for older servers is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event

from jarvis.speech.tts import PiperTts, TtsChunk

Send = Callable[[Event], Awaitable[None]]

SAMPLES_PER_EVENT = 4096
"""Most samples in one ``audio-chunk`` (a long piece is split; the first is short anyway)."""


async def send_audio(tts: PiperTts, chunks: AsyncIterable[TtsChunk], send: Send) -> int:
    """Send ``chunks`` as ``audio-chunk`` events (int16 mono at the voice's rate);
    returns the number of samples sent."""
    sent = 0
    async for chunk in chunks:
        samples = chunk.samples
        for start in range(0, len(samples), SAMPLES_PER_EVENT):
            piece = samples[start:start + SAMPLES_PER_EVENT]
            await send(AudioChunk(rate=tts.sample_rate, width=2, channels=1,
                                  audio=piece.astype("<i2").tobytes()).event())
            sent += len(piece)
    return sent


def audio_start(tts: PiperTts) -> Event:
    return AudioStart(rate=tts.sample_rate, width=2, channels=1).event()


async def synthesize(tts: PiperTts, text: str, send: Send) -> int:
    """Answer one ``synthesize``: start, the audio, stop. TtsError for text with no
    words (before anything is sent)."""
    async with contextlib.aclosing(tts.stream(text)) as chunks:
        first = await anext_or_none(chunks)
        await send(audio_start(tts))
        sent = 0
        if first is not None:
            sent = await send_audio(tts, _prepend(first, chunks), send)
    await send(AudioStop().event())
    return sent


class TextStream:
    """A ``synthesize-start`` … ``synthesize-stop`` stream: text pieces in, audio out as
    each clause is ready (synthesis runs in a task while more text arrives)."""

    def __init__(self, tts: PiperTts, send: Send) -> None:
        self.tts = tts
        self.send = send
        self.chars = 0
        self._text: asyncio.Queue[str | None] = asyncio.Queue()
        self._task: asyncio.Task[int] = asyncio.create_task(self._run())

    def add(self, text: str) -> None:
        self.chars += len(text)
        self._text.put_nowait(text)

    @property
    def failed(self) -> BaseException | None:
        """The synthesis error, once the task has failed."""
        if self._task.done() and not self._task.cancelled():
            return self._task.exception()
        return None

    async def finish(self) -> int:
        """No more text: wait for the last audio; returns the samples sent."""
        self._text.put_nowait(None)
        return await self._task

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self) -> int:
        await self.send(audio_start(self.tts))
        async with contextlib.aclosing(self.tts.stream(self._pieces())) as chunks:
            sent = await send_audio(self.tts, chunks, self.send)
        await self.send(AudioStop().event())
        return sent

    async def _pieces(self) -> AsyncIterator[str]:
        while (text := await self._text.get()) is not None:
            yield text


async def anext_or_none(chunks: AsyncIterator[TtsChunk]) -> TtsChunk | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: TtsChunk, rest: AsyncIterator[TtsChunk]) -> AsyncIterator[TtsChunk]:
    yield first
    async for chunk in rest:
        yield chunk
