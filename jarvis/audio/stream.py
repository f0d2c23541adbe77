"""Live audio through ``sounddevice``: a microphone as an async stream of 16 kHz mono
float32 chunks, and a speaker that plays a stream of chunks.

Both open the device at the rate Jarvis wants when the device accepts it and
otherwise at the device's own rate, resampling in between. Samples cross PortAudio
as int16 so that no conversion or dithering happens there. PortAudio calls the
microphone callback on its own thread; chunks reach the event loop through
``call_soon_threadsafe`` and a bounded queue (the oldest chunk is dropped and
counted if the consumer falls behind). Speaker writes block, so they run in a
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from jarvis.audio.devices import DeviceInfo, resolve_device, sounddevice, supported_rate
from jarvis.audio.echo import EchoReference
from jarvis.audio.errors import AudioDeviceError
from jarvis.audio.formats import ASR_RATE, FloatArray, to_float32, to_int16
from jarvis.audio.resample import Resampler

log = logging.getLogger(__name__)


class Microphone:
    """``async with Microphone(...) as mic: async for chunk in mic: ...``

    Chunks are mono float32 at ``rate`` (16 kHz by default), about ``block_s`` long.
    ``device_rate`` forces the rate the device is opened at (default: ``rate`` if the
    device supports it, else its default rate).
    """

    def __init__(
        self,
        device: str = "",
        *,
        rate: int = ASR_RATE,
        block_s: float = 0.032,
        device_rate: int | None = None,
        max_queue_s: float = 10.0,
    ) -> None:
        self.device_spec = device
        self.rate = rate
        self.block_s = block_s
        self._forced_rate = device_rate
        self._max_chunks = max(2, int(max_queue_s / block_s))
        self.device: DeviceInfo | None = None
        self.device_rate = 0
        self.dropped_chunks = 0
        self.status_flags: Counter[str] = Counter()
        """How often PortAudio reported each status flag (``"input overflow"``, ...):
        one counter per kind, so a microphone open for months stays the same size."""
        self._queue: asyncio.Queue[FloatArray | None] | None = None
        self._stream: Any = None
        self._resampler: Resampler | None = None

    async def __aenter__(self) -> Microphone:
        await asyncio.to_thread(self._open, asyncio.get_running_loop())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        sd = sounddevice()
        self.device = resolve_device(self.device_spec, "input")
        self.device_rate = self._forced_rate or supported_rate(self.device, "input", self.rate)
        if self.device_rate != self.rate:
            self._resampler = Resampler(self.device_rate, self.rate)
        queue: asyncio.Queue[FloatArray | None] = asyncio.Queue()
        self._queue = queue

        def put(chunk: FloatArray) -> None:
            if queue.qsize() >= self._max_chunks:
                queue.get_nowait()
                self.dropped_chunks += 1
            queue.put_nowait(chunk)

        def callback(indata: npt.NDArray[np.int16], frames: int, time: Any, status: Any) -> None:
            if status:
                self.note_status(status)
            chunk = to_float32(indata[:, 0].copy())
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(put, chunk)

        try:
            self._stream = sd.InputStream(
                device=self.device.index, samplerate=self.device_rate, channels=1,
                dtype="int16", blocksize=max(1, int(self.device_rate * self.block_s)),
                callback=callback,
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            self._stream = None
            raise AudioDeviceError(
                f"cannot open the microphone {self.device.label()} at {self.device_rate} Hz "
                f"({exc}); choose another with JARVIS_INPUT_DEVICE (see `jarvis devices`)"
            ) from None
        log.debug("microphone %s open at %d Hz", self.device.label(), self.device_rate)

    def note_status(self, status: object) -> None:
        """Count the flags of one PortAudio callback status (a ``sounddevice.CallbackFlags``,
        whose text is the set flags joined by ``", "``)."""
        self.status_flags.update(kind for kind in str(status).split(", ") if kind)

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await asyncio.to_thread(_close_stream, stream, abort=True)
        if self._queue is not None:
            self._queue.put_nowait(None)
        if self.dropped_chunks:
            log.warning("microphone: %d chunks dropped (consumer too slow)", self.dropped_chunks)
        if self.status_flags:
            log.warning("microphone: PortAudio reported %s", ", ".join(
                f"{kind} x{count}" for kind, count in sorted(self.status_flags.items())))

    def __aiter__(self) -> Microphone:
        return self

    async def __anext__(self) -> FloatArray:
        if self._queue is None:
            raise RuntimeError("use the Microphone inside `async with`")
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                self._queue.put_nowait(None)
                raise StopAsyncIteration
            if self._resampler is not None:
                chunk = self._resampler.process(chunk)
            if len(chunk):
                return chunk


def _close_stream(stream: Any, abort: bool) -> None:
    try:
        if abort:
            stream.abort()
        else:
            stream.stop()
    except Exception:
        log.debug("error while stopping an audio stream", exc_info=True)
    finally:
        try:
            stream.close()
        except Exception:
            log.debug("error while closing an audio stream", exc_info=True)


class Speaker:
    """Plays mono audio (int16 or float) on an output device.

    ``await speaker.play(chunks, rate)`` plays an async or plain iterable of chunks
    as they arrive and returns when the last one has been heard (or raises
    ``CancelledError`` after cutting the sound at once, for barge-in).

    Samples are written in blocks of ``block_s``, so :meth:`pause` silences the speaker
    within about one block (what the device had buffered is dropped, and played again
    on :meth:`resume`). With a ``reference``, every block written is also pushed there:
    the far end for echo cancellation.
    """

    def __init__(self, device: str = "", *, device_rate: int | None = None,
                 reference: EchoReference | None = None, block_s: float = 0.02) -> None:
        self.device_spec = device
        self._forced_rate = device_rate
        self.device: DeviceInfo | None = None
        self.device_rate = 0
        self.underflows = 0
        self.reference = reference
        self.block_s = block_s
        self._playback: _Playback | None = None

    def _open(self, rate: int) -> Any:
        sd = sounddevice()
        self.device = resolve_device(self.device_spec, "output")
        self.device_rate = self._forced_rate or supported_rate(self.device, "output", rate)
        try:
            stream = sd.OutputStream(
                device=self.device.index, samplerate=self.device_rate, channels=1,
                dtype="int16",
            )
            stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(
                f"cannot open the speaker {self.device.label()} at {self.device_rate} Hz "
                f"({exc}); choose another with JARVIS_OUTPUT_DEVICE (see `jarvis devices`)"
            ) from None
        return stream

    async def check(self, rate: int) -> DeviceInfo:
        """Open the output for ``rate`` Hz audio and close it again; AudioDeviceError if
        it cannot be opened. Lets a command fail before it does any work rather than
        when its first sound is ready."""
        stream = await asyncio.to_thread(self._open, rate)
        await asyncio.to_thread(_close_stream, stream, True)
        assert self.device is not None
        return self.device

    def pause(self) -> None:
        """Go quiet now (within one block); :meth:`resume` goes on where it stopped."""
        if self._playback is not None:
            self._playback.running.clear()

    def resume(self) -> None:
        if self._playback is not None:
            self._playback.running.set()

    @property
    def playing(self) -> bool:
        """Samples are being written to the device now (not paused, not waiting for the
        next chunk): the echo reference must be arriving."""
        playback = self._playback
        return playback is not None and playback.writing and playback.running.is_set()

    @property
    def paused(self) -> bool:
        return self._playback is not None and not self._playback.running.is_set()

    async def play(
        self,
        chunks: AsyncIterable[npt.ArrayLike] | Iterable[npt.ArrayLike],
        rate: int,
    ) -> float:
        """Play every chunk (mono samples at ``rate``); returns the seconds played."""
        stream = await asyncio.to_thread(self._open, rate)
        resampler = Resampler(rate, self.device_rate) if self.device_rate != rate else None
        playback = self._playback = _Playback(stream, self.device_rate, self.block_s)
        played = 0
        finished = False
        try:
            async for chunk in _aiter(chunks):
                data = np.asarray(chunk).reshape(-1)
                if resampler is not None:
                    data = resampler.process(to_float32(data))
                played += await asyncio.to_thread(self._write, playback, data)
            if resampler is not None:
                played += await asyncio.to_thread(self._write, playback, resampler.flush())
            finished = True
        finally:
            playback.stopped.set()
            playback.running.set()  # wakes a writer waiting in pause
            if self._playback is playback:
                self._playback = None
            if not finished and self.reference is not None:
                self.reference.clear()  # cut: what was queued will never be heard
            # stop() waits until everything written has been played; abort() cuts it.
            await asyncio.shield(asyncio.to_thread(_close_stream, stream, not finished))
        return played / self.device_rate

    def _write(self, playback: _Playback, data: npt.ArrayLike) -> int:
        playback.writing = True
        try:
            return self._write_blocks(playback, to_int16(data))
        finally:
            playback.writing = False

    def _write_blocks(self, playback: _Playback, pcm: npt.NDArray[np.int16]) -> int:
        written = 0
        for start in range(0, len(pcm), playback.block):
            if not playback.running.is_set():
                self._hold(playback)
            if playback.stopped.is_set():
                break
            block = pcm[start:start + playback.block]
            if playback.stream.write(block.reshape(-1, 1)):
                self.underflows += 1
            if self.reference is not None:
                self.reference.push(block, self.device_rate)
            playback.remember(block)
            written += len(block)
        return written

    def _hold(self, playback: _Playback) -> None:
        """Paused: drop what the device holds, wait, then play it again and go on."""
        stream = playback.stream
        with contextlib.suppress(Exception):
            stream.abort()
        if self.reference is not None:
            self.reference.clear()
        playback.running.wait()
        if playback.stopped.is_set():
            return
        stream.start()
        replay = playback.unheard()
        if len(replay):
            stream.write(replay.reshape(-1, 1))
            if self.reference is not None:
                self.reference.push(replay, self.device_rate)

    async def play_array(self, samples: npt.ArrayLike, rate: int) -> float:
        return await self.play([samples], rate)


class _Playback:
    """One :meth:`Speaker.play`: its stream, its pause state and the samples written
    last (what an abort may have dropped before they were heard)."""

    def __init__(self, stream: Any, rate: int, block_s: float) -> None:
        self.stream = stream
        self.block = max(1, int(rate * block_s))
        self.running = threading.Event()
        self.running.set()
        self.stopped = threading.Event()
        self.writing = False
        latency = float(getattr(stream, "latency", 0.0) or 0.0)
        self._keep = int(latency * rate) + self.block
        self._recent: deque[npt.NDArray[np.int16]] = deque()
        self._recent_len = 0

    def remember(self, block: npt.NDArray[np.int16]) -> None:
        self._recent.append(block)
        self._recent_len += len(block)
        while self._recent and self._recent_len - len(self._recent[0]) >= self._keep:
            self._recent_len -= len(self._recent.popleft())

    def unheard(self) -> npt.NDArray[np.int16]:
        """The last samples written: the device's buffer when it was aborted."""
        recent = list(self._recent)
        self._recent.clear()
        self._recent_len = 0
        if not recent:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(recent)[-self._keep:]


async def _aiter(
    chunks: AsyncIterable[npt.ArrayLike] | Iterable[npt.ArrayLike],
) -> AsyncIterator[npt.ArrayLike]:
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
