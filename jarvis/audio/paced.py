"""A microphone read at the pace of its sample clock: :class:`PacedMicrophone` hands on
16 kHz mono int16 chunks never faster than real time, as :class:`SampleClock` allows.

``jarvis satellite`` streams it to its controller, which would take the flood from a
device without a clock (the ALSA ``file`` capture of the tests) for a broken stream.
I/O only: the device is named by the caller, no setting is read here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from jarvis.audio.devices import resolve_device, sounddevice, supported_rate
from jarvis.audio.errors import AudioDeviceError
from jarvis.audio.formats import ASR_RATE, Int16Array, to_float32, to_int16
from jarvis.audio.resample import Resampler

log = logging.getLogger(__name__)


class SampleClock:
    """When audio may be delivered: sample ``n`` not before ``start + n / rate`` (less
    ``lead_s``, the jitter of a real device). After a stall (more than ``max_lag_s``
    behind) the clock moves on, so at most ``max_lag_s`` of catching up goes out as a
    burst. A microphone whose crystal runs fast is held to the nominal rate too (its
    driver drops a block now and then): a controller may treat more as a flood."""

    def __init__(self, rate: int, *, lead_s: float = 0.1, max_lag_s: float = 0.5,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.lead_s = lead_s
        self.max_lag_s = max_lag_s
        self._now = now
        self.start = now()
        self.samples = 0

    def wait_s(self, samples: int) -> float:
        """Count ``samples`` more; how long to wait before delivering them (0 = now)."""
        now = self._now()
        self.samples += samples
        due = self.start + self.samples / self.rate
        early = due - now - self.lead_s
        if early > 0:
            return early
        late = now - due
        if late > self.max_lag_s:
            self.start += late - self.max_lag_s
        return 0.0


class PacedMicrophone:
    """``async with PacedMicrophone(device) as mic: async for chunk in mic: ...``: 16 kHz
    mono int16 chunks of about ``chunk_samples``, never faster than real time.

    Unlike :class:`jarvis.audio.stream.Microphone` (PortAudio's callback, which a device
    without a clock calls as fast as it can, dropping what the consumer cannot take),
    the device is read with blocking reads in a thread of its own that waits for the
    :class:`SampleClock`: a real microphone blocks in the read and the clock never
    waits; an ALSA ``file`` capture is delivered in real time with nothing lost.

    Iteration raises :class:`AudioDeviceError` when the device stops delivering.
    """

    def __init__(self, device: str = "", *, chunk_samples: int = 1024,
                 max_queue_s: float = 5.0) -> None:
        self.device_spec = device
        self.chunk_samples = chunk_samples
        self.label = "the default microphone" if not device else f"microphone {device!r}"
        self.device_rate = 0
        self.overflows = 0
        self.dropped = 0
        self._max_chunks = max(2, int(max_queue_s * ASR_RATE / chunk_samples))
        self._queue: asyncio.Queue[Int16Array | None] = asyncio.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._error: AudioDeviceError | None = None

    async def __aenter__(self) -> PacedMicrophone:
        await asyncio.to_thread(self._open)
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,),
                                        name="paced-microphone", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _open(self) -> None:
        sd = sounddevice()
        device = resolve_device(self.device_spec, "input")
        self.label = f"microphone {device.label()}"
        self.device_rate = supported_rate(device, "input", ASR_RATE)
        try:
            stream = sd.InputStream(device=device.index, samplerate=self.device_rate,
                                    channels=1, dtype="int16", latency="high")
            stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(
                f"cannot open the {self.label} at {self.device_rate} Hz ({exc}); choose "
                "another with JARVIS_INPUT_DEVICE (see `jarvis devices`)") from None
        self._stream = stream

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        stream = self._stream
        block = max(1, round(self.chunk_samples * self.device_rate / ASR_RATE))
        resampler = (Resampler(self.device_rate, ASR_RATE) if self.device_rate != ASR_RATE
                     else None)
        clock = SampleClock(self.device_rate)
        try:
            while not self._stop.is_set():
                try:
                    data, overflowed = stream.read(block)
                except Exception as exc:  # PortAudioError: the device went away
                    self._error = AudioDeviceError(
                        f"the {self.label} stopped ({exc}); check it or choose another "
                        "with JARVIS_INPUT_DEVICE")
                    break
                self.overflows += bool(overflowed)
                pcm: Int16Array = np.ascontiguousarray(data[:, 0])
                wait = clock.wait_s(len(pcm))
                if wait > 0 and self._stop.wait(wait):
                    break
                if resampler is not None:
                    pcm = to_int16(resampler.process(to_float32(pcm)))
                if len(pcm):
                    try:
                        loop.call_soon_threadsafe(self._put, pcm)
                    except RuntimeError:  # the loop is closed
                        break
        finally:
            _close_stream(stream)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def _put(self, chunk: Int16Array) -> None:
        if self._queue.qsize() >= self._max_chunks:
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(chunk)

    def __aiter__(self) -> PacedMicrophone:
        return self

    async def __anext__(self) -> Int16Array:
        chunk = await self._queue.get()
        if chunk is None:
            self._queue.put_nowait(None)
            if self._error is not None and not self._stop.is_set():
                raise self._error
            raise StopAsyncIteration
        return chunk

    async def close(self) -> None:
        """Stop reading (within one block) and close the device."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 2.0)
            if thread.is_alive():
                log.warning("%s: a read did not return; leaving it behind", self.label)
        elif self._stream is not None:
            await asyncio.to_thread(_close_stream, self._stream)
        self._stream = None
        if self.overflows or self.dropped:
            log.warning("%s: %d overflows, %d chunks dropped", self.label, self.overflows,
                        self.dropped)


def _close_stream(stream: Any) -> None:
    for step in (stream.abort, stream.close):
        try:
            step()
        except Exception:
            log.debug("closing a microphone stream", exc_info=True)
