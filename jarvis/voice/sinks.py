"""Where spoken replies go: the speaker, or WAV files for headless runs."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import numpy as np

from jarvis.audio.echo import EchoReference
from jarvis.audio.errors import AudioDeviceError
from jarvis.audio.files import write_wav
from jarvis.audio.stream import Speaker
from jarvis.speech.tts import TtsChunk


class SpeakerSink:
    """Plays replies on a sounddevice output (``JARVIS_OUTPUT_DEVICE``); with a
    ``reference``, what it plays is the far end for echo cancellation."""

    def __init__(self, device: str = "", *, reference: EchoReference | None = None) -> None:
        self.speaker = Speaker(device, reference=reference)

    def pause(self) -> None:
        """Quiet now (barge-in heard a possible interruption); :meth:`resume` goes on."""
        self.speaker.pause()

    def resume(self) -> None:
        self.speaker.resume()

    @property
    def playing(self) -> bool:
        return self.speaker.playing

    async def check(self, rate: int = 22050) -> None:
        """Open the output device once and close it: AudioDeviceError("no output device
        could be opened: ...") now if nothing can play, not a reply nobody hears."""
        try:
            await self.speaker.check(rate)
        except AudioDeviceError as exc:
            raise AudioDeviceError(f"no output device could be opened: {exc}") from None

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None:
        async def samples() -> AsyncIterator[np.ndarray]:
            async for chunk in chunks:
                yield chunk.samples

        await self.speaker.play(samples(), rate)


class SilentSink:
    """For a machine whose speaker cannot be opened: replies are synthesised (their
    text still reaches MQTT and Wyoming) and dropped."""

    def __init__(self) -> None:
        self.dropped_s = 0.0

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None:
        async for chunk in chunks:
            self.dropped_s += chunk.duration_s


class WavReplySink:
    """Writes each reply to a WAV file: ``path`` itself, or ``reply-0001.wav``, ... in a
    directory. With ``realtime`` it also takes as long as playing would (so barge-in
    and "what was actually spoken" behave as with a speaker); an interrupted reply is
    written up to where it was cut."""

    def __init__(self, path: Path, *, realtime: bool = False, single_file: bool = False) -> None:
        self.path = path
        self.realtime = realtime
        self.single_file = single_file
        self.written: list[Path] = []
        self._numbers = itertools.count(1)
        if not single_file:
            path.mkdir(parents=True, exist_ok=True)

    def _next_path(self) -> Path:
        if self.single_file:
            return self.path
        return self.path / f"reply-{next(self._numbers):04d}.wav"

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None:
        parts: list[np.ndarray] = []
        try:
            async for chunk in chunks:
                parts.append(chunk.samples)
                if self.realtime:
                    await asyncio.sleep(chunk.duration_s)
        finally:
            if parts:
                target = self._next_path()
                await asyncio.shield(asyncio.to_thread(_write_atomic, target,
                                                       np.concatenate(parts), rate))
                self.written.append(target)


def _write_atomic(target: Path, samples: np.ndarray, rate: int) -> None:
    """Write then rename, so a file that exists is always complete (even on SIGTERM)."""
    partial = target.with_name(f".{target.name}.partial")
    write_wav(partial, samples, rate)
    os.replace(partial, target)
