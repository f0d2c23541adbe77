"""Acoustic echo cancellation: take what the speaker plays out of what the microphone
hears, before wake word and VAD, so Jarvis does not hear itself.

::

    speaker side   reference.push(chunk, rate)        as each chunk goes to the device
    microphone     clean = canceller.process(chunk)    pulls len(chunk) reference samples

:class:`EchoReference` is the far end: a FIFO, at 16 kHz, of what was handed to the
speaker. The microphone side pulls as many samples as it captures, so the reference
advances on the capture clock and the two streams stay sample-aligned up to a delay
(the speaker's and the microphone's buffers, the flight time, whatever was queued).

:class:`EchoCanceller` runs WebRTC's AEC3 (``pywebrtc-audio``) on 10 ms frames, after
delaying the reference by the measured echo path delay. The delay is estimated, not
assumed: a GCC-PHAT cross-correlation of the last second of microphone against the
reference, recomputed while the far end is active, accepted only when its peak stands
far out of the rest of the correlation and two estimates in a row agree.

AEC3 finds a delay itself, up to about 500 ms (measured: it fails from 550 ms), and
every change of the reference's alignment costs it a second or so of reconvergence
(the echo comes through at 0-15 dB of suppression meanwhile). So the reference is
delayed only when the delay left to AEC3 would be over 400 ms or under 5 ms (an echo
that would come before its reference); a re-alignment leaves AEC3 50 ms.

AEC3 leaves residual echo in a reverberant room while it converges (the first second
or two, -50 to -70 dBFS), and Silero, which barely looks at level, can hear speech in
it. A residual echo gate takes another 20 dB off the frames AEC3 took 15 dB or more out
of while echo is possible (a person's voice goes through AEC3 nearly whole, so it is
not gated); measured by bench/echo_bench.py over 24 synthetic rooms, it takes the false
barge-ins from 3 to 0 and the speaker pauses from 11 to 4, while a person talking over
the echo keeps 62 % of their speech frames instead of 71 % and is confirmed 16 ms
later (median). ``residual_gate_db = None`` turns it off.

Costs, measured (thread CPU time) on a loaded 2-core x86 machine: about 1.1 % of one
core per second of audio for AEC3 and the framing, 1.2 % with the delay estimator,
1.4 % with the gate.

``pywebrtc-audio`` has no wheels for 32-bit ARM; it is imported on first use and
:func:`echo_cancel_unavailable` says whether it works here.
"""

from __future__ import annotations

import functools
import math
import platform
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, FloatArray, to_float32
from jarvis.audio.resample import Resampler

_FAR_ACTIVE_DBFS = -55.0
"""A 10 ms reference frame louder than this (RMS) is sound sent to the speaker."""
_ACTIVE_HOLD_S = 0.2
"""``far_active`` stays true this long after the last loud reference frame."""
_WINDOW_S = 1.0
"""Microphone audio correlated per delay estimate."""
_HOP_S = 0.25
"""Audio between delay estimates until one is accepted."""
_HOP_TRACKING_S = 1.0
"""Audio between delay estimates once one is accepted (the delay rarely changes)."""
_MIN_ACTIVE = 0.3
"""Fraction of the window in which the reference must be active to estimate."""
_BAND_HZ = (200.0, 6000.0)
"""Frequencies the correlation uses: speech, without hum and the top octave."""
_PSR_MIN = 12.0
"""Peak-to-sidelobe ratio (peak over the standard deviation of the rest) an estimate
needs to count; see :meth:`EchoCanceller._estimate`."""
_PEAK_RATIO_MIN = 1.5
"""How much higher the peak must be than the highest lag outside its neighbourhood."""
_PEAK_ZONE_MS = 2.0
"""The peak's neighbourhood, excluded from the sidelobe statistics."""
_AGREE_MS = 1.0
"""Two estimates in a row within this are one delay."""
_SLACK_MS = (5.0, 400.0)
"""The echo delay left to AEC3 after the reference is delayed: re-aligned outside it.
AEC3 handles up to 500 ms alone; every re-alignment costs it about a second."""
_TARGET_SLACK_MS = 50.0
"""The delay a re-alignment leaves to AEC3: room for the estimate's error and for the
delay to shrink a little (playback queued less) without another re-alignment."""
_BLOCK_FRAMES = 10
"""Frames handed to AEC3 per call (it accepts any multiple of 10 ms)."""
_ERLE_SMOOTHING_S = 2.0
_GATE_DB = 15.0
"""Default :attr:`EchoCanceller.residual_gate_db`."""
_GATE_DEPTH_DB = 20.0
"""How much more a gated frame loses."""


@functools.cache
def echo_cancel_unavailable() -> str | None:
    """None when ``pywebrtc_audio`` imports and cancels; else a one-line reason."""
    try:
        from pywebrtc_audio import EchoCanceller as Aec3
    except ImportError:
        return (f"pywebrtc-audio is not installed for this platform ({platform.machine()}): "
                "echo cancellation off")
    except Exception as exc:  # a broken wheel: missing shared library, bad ABI
        return f"pywebrtc-audio does not load ({exc}): echo cancellation off"
    try:
        frame = np.zeros(ASR_RATE // 100, dtype=np.float32)
        Aec3(ASR_RATE, 1, 0).process(frame, frame)
    except Exception as exc:
        return f"pywebrtc-audio does not work here ({exc}): echo cancellation off"
    return None


class EchoReference:
    """Thread-safe FIFO of what was handed to the speaker (the far end), at 16 kHz.

    The speaker side pushes as it writes; the microphone side pulls the same number of
    samples as it captures, so both advance on the capture clock. What the microphone
    side has not pulled after ``max_s`` seconds is dropped (oldest first) and counted
    in :attr:`dropped_samples`: playback that ran ahead of capture by that much is
    beyond any echo delay worth finding.
    """

    def __init__(self, *, rate: int = ASR_RATE, max_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or max_s <= 0:
            raise ValueError(f"rate and max_s must be positive, got {rate}, {max_s}")
        self.rate = rate
        self._clock = clock
        self.max_samples = max(1, int(max_s * rate))
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()
        self._chunks: deque[FloatArray] = deque()
        self._queued = 0
        self._resamplers: dict[int, Resampler] = {}
        self._last_rate: int | None = None
        self._last_push: float | None = None
        self.dropped_samples = 0
        """Samples dropped because the queue was over ``max_s``."""
        self.pushed_samples = 0
        """Samples queued (at :attr:`rate`) since creation."""

    def push(self, samples: npt.ArrayLike, rate: int) -> None:
        """Queue ``samples`` (float32 in [-1, 1] or int16) as played at ``rate``."""
        x = to_float32(samples).reshape(-1)
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        with self._push_lock:
            pieces: list[FloatArray] = []
            if self._last_rate is not None and self._last_rate != rate:
                # A new stream rate: the previous stream's last millisecond is complete.
                previous = self._resamplers.pop(self._last_rate, None)
                if previous is not None:
                    pieces.append(previous.flush())
            self._last_rate = rate
            if rate == self.rate:
                pieces.append(x.astype(np.float32, copy=True))
            else:
                resampler = self._resamplers.get(rate)
                if resampler is None:
                    resampler = self._resamplers[rate] = Resampler(rate, self.rate)
                pieces.append(resampler.process(x))
            with self._lock:
                self._last_push = self._clock()
                for piece in pieces:
                    if len(piece):
                        self._chunks.append(piece)
                        self._queued += len(piece)
                        self.pushed_samples += len(piece)
                self._drop_over_limit()

    def _drop_over_limit(self) -> None:
        excess = self._queued - self.max_samples
        while excess > 0 and self._chunks:
            head = self._chunks[0]
            if len(head) <= excess:
                self._chunks.popleft()
                cut = len(head)
            else:
                self._chunks[0] = head[excess:]
                cut = excess
            self._queued -= cut
            self.dropped_samples += cut
            excess -= cut

    def pull(self, n: int) -> FloatArray:
        """The next ``n`` samples; zeros where nothing was played."""
        out = np.zeros(max(0, n), dtype=np.float32)
        filled = 0
        with self._lock:
            while filled < n and self._chunks:
                head = self._chunks[0]
                take = min(len(head), n - filled)
                out[filled:filled + take] = head[:take]
                filled += take
                if take == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
            self._queued -= filled
        return out

    def clear(self) -> None:
        """Playback was cut (barge-in): what was queued will never be heard. Waits for
        a push in progress (its resampling, a few ms)."""
        with self._push_lock, self._lock:
            self._chunks.clear()
            self._queued = 0
            for resampler in self._resamplers.values():
                resampler.reset()

    @property
    def queued_samples(self) -> int:
        with self._lock:
            return self._queued

    @property
    def last_push_s(self) -> float | None:
        """The clock's time (``time.monotonic()``) of the last push (None before the
        first)."""
        with self._lock:
            return self._last_push


class _History:
    """The last ``size`` samples of a stream (a ring buffer)."""

    def __init__(self, size: int) -> None:
        self._buf: FloatArray = np.zeros(size, dtype=np.float32)
        self._pos = 0

    def reset(self) -> None:
        self._buf[:] = 0.0
        self._pos = 0

    def push(self, x: FloatArray) -> None:
        size = len(self._buf)
        if len(x) >= size:
            self._buf[:] = x[-size:]
            self._pos = 0
            return
        end = self._pos + len(x)
        if end <= size:
            self._buf[self._pos:end] = x
        else:
            split = size - self._pos
            self._buf[self._pos:] = x[:split]
            self._buf[: end - size] = x[split:]
        self._pos = end % size

    def last(self, n: int, skip: int = 0) -> FloatArray:
        """``n`` samples, oldest first, ending ``skip`` samples before the newest."""
        size = len(self._buf)
        if n + skip > size:
            raise ValueError(f"history holds {size} samples, asked for {n} + {skip}")
        start = (self._pos - skip - n) % size
        if start + n <= size:
            piece: FloatArray = self._buf[start:start + n].copy()
            return piece
        joined: FloatArray = np.concatenate([self._buf[start:], self._buf[: n - (size - start)]])
        return joined


class EchoCanceller:
    """AEC3 on the microphone stream with an :class:`EchoReference` as the far end.

    One consumer: :meth:`process` is called from the capture side only (it pulls the
    reference as it goes). Any chunk length goes in; 10 ms frames go to AEC3, the rest
    waits for the next call, so each call returns a whole number of frames (up to 159
    samples more or fewer than it was given). AEC3 itself delays the signal by 8 ms.
    """

    def __init__(self, reference: EchoReference, *, rate: int = ASR_RATE,
                 max_delay_ms: int = 500) -> None:
        if rate != reference.rate:
            raise ValueError(f"the reference is at {reference.rate} Hz, the canceller at {rate}")
        if rate % 100:
            raise ValueError(f"rate must be a whole number of samples per 10 ms, got {rate}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must not be negative, got {max_delay_ms}")
        from pywebrtc_audio import EchoCanceller as Aec3

        self.reference = reference
        self.rate = rate
        self.max_delay_ms = max_delay_ms
        self._frame = rate // 100
        self._aec: Any = Aec3(rate, 1, 0)
        self._window = int(_WINDOW_S * rate)
        self._max_lag = int(max_delay_ms * rate / 1000)
        self._fft_size = self._window + self._max_lag  # no circular wrap for lags 0..max
        freqs = np.fft.rfftfreq(self._fft_size, 1.0 / rate)
        self._band = (freqs >= _BAND_HZ[0]) & (freqs <= _BAND_HZ[1])
        block = _BLOCK_FRAMES * self._frame
        self._mic_history = _History(self._window)
        self._far_history = _History(self._window + self._max_lag + block)
        self._active_threshold = (10.0 ** (_FAR_ACTIVE_DBFS / 20.0)) ** 2
        self._hold_frames = max(1, round(_ACTIVE_HOLD_S * 100))
        self._window_frames = self._window // self._frame
        self._erle_alpha = 1.0 / (_ERLE_SMOOTHING_S * 100)
        self._gate_floor = 10.0 ** (-_GATE_DEPTH_DB / 20.0)
        self.residual_gate_db: float | None = _GATE_DB
        """A frame AEC3 took this many dB or more out of, while its echo may still be
        arriving, is residual echo: it is attenuated by another 20 dB. None: AEC3's
        output as it is. See :meth:`_gate`."""
        self.reset()

    def reset(self) -> None:
        """Forget everything: AEC3's filters, the delay, the statistics."""
        self._aec.reset()
        self._mic_carry: FloatArray = np.zeros(0, dtype=np.float32)
        self._far_carry: FloatArray = np.zeros(0, dtype=np.float32)
        self._mic_history.reset()
        self._far_history.reset()
        self._activity: deque[bool] = deque(maxlen=self._window_frames)
        self._active_in_window = 0
        self._since_active = self._hold_frames
        self._since_estimate = 0
        self._candidate: int | None = None
        self._lag: int | None = None
        self._shift = 0
        self.delay_ms: float | None = None
        """The echo path delay (reference to microphone) in ms; None until estimated."""
        self.far_active = False
        """The reference carried sound in the last 200 ms."""
        self._frames = 0
        self._far_frames = 0
        self._mic_far_energy = 0.0
        self._out_far_energy = 0.0
        self._mic_recent = 0.0
        self._out_recent = 0.0
        self._estimates = 0
        self._confident = 0
        self._realignments = 0
        self._last_psr = 0.0
        self._cpu_s = 0.0
        self._gate_gain = 1.0
        self._gated_frames = 0

    def process(self, mic: npt.ArrayLike) -> FloatArray:
        """Cancel the echo in the next microphone chunk; returns the cleaned samples
        of every whole 10 ms frame so far."""
        started = time.thread_time()
        x = to_float32(mic).reshape(-1)
        far = self.reference.pull(len(x))
        mic_all = np.concatenate([self._mic_carry, x]) if len(self._mic_carry) else x
        far_all = np.concatenate([self._far_carry, far]) if len(self._far_carry) else far
        whole = len(mic_all) // self._frame * self._frame
        self._mic_carry = mic_all[whole:].copy()
        self._far_carry = far_all[whole:].copy()
        block = _BLOCK_FRAMES * self._frame
        pieces = [self._block(mic_all[start:min(start + block, whole)],
                              far_all[start:min(start + block, whole)])
                  for start in range(0, whole, block)]
        self._cpu_s += time.thread_time() - started
        if not pieces:
            return np.zeros(0, dtype=np.float32)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _block(self, mic: FloatArray, far: FloatArray) -> FloatArray:
        """Whole frames through the estimator and AEC3."""
        n = len(mic)
        self._mic_history.push(mic)
        self._far_history.push(far)
        aligned = self._far_history.last(n, self._shift) if self._shift else far
        out: FloatArray = self._aec.process(np.ascontiguousarray(mic, dtype=np.float32),
                                            np.ascontiguousarray(aligned, dtype=np.float32))
        frames = n // self._frame
        far_energy = np.mean(far.reshape(frames, self._frame).astype(np.float64) ** 2, axis=1)
        mic_energy = np.mean(mic.reshape(frames, self._frame).astype(np.float64) ** 2, axis=1)
        out_energy = np.mean(out.reshape(frames, self._frame).astype(np.float64) ** 2, axis=1)
        echo_possible = np.zeros(frames, dtype=bool)
        # The echo of a frame arrives up to the delay later; it rings for the hold.
        echo_hold = self._hold_frames + (0 if self._lag is None else self._lag // self._frame)
        for i in range(frames):
            active = bool(far_energy[i] > self._active_threshold)
            if len(self._activity) == self._activity.maxlen and self._activity[0]:
                self._active_in_window -= 1
            self._activity.append(active)
            self._active_in_window += active
            self._since_active = 0 if active else self._since_active + 1
            self.far_active = self._since_active < self._hold_frames
            echo_possible[i] = self._since_active < echo_hold
        if self.residual_gate_db is not None:
            out, out_energy = self._gate(out, mic_energy, out_energy, echo_possible)
        self._frames += frames
        for i in map(int, np.flatnonzero(echo_possible)):
            self._far_frames += 1
            self._mic_far_energy += float(mic_energy[i])
            self._out_far_energy += float(out_energy[i])
            a = self._erle_alpha
            self._mic_recent += a * (float(mic_energy[i]) - self._mic_recent)
            self._out_recent += a * (float(out_energy[i]) - self._out_recent)
        self._since_estimate += n
        hop = _HOP_S if self._lag is None else _HOP_TRACKING_S
        if (self._since_estimate >= hop * self.rate and self._max_lag > 0
                and self._active_in_window >= _MIN_ACTIVE * self._window_frames):
            self._since_estimate = 0
            self._update_delay()
        return out

    def _gate(self, out: FloatArray, mic_energy: npt.NDArray[np.float64],
              out_energy: npt.NDArray[np.float64], echo_possible: npt.NDArray[np.bool_]
              ) -> tuple[FloatArray, npt.NDArray[np.float64]]:
        """The residual echo gate: frames AEC3 took ``residual_gate_db`` or more out
        of while echo is possible are what is left of the echo, not a person (their
        voice goes through AEC3 nearly whole); they lose another ``_GATE_DEPTH_DB``.
        Gains move linearly across each frame, so the gate does not click."""
        assert self.residual_gate_db is not None
        frames = len(mic_energy)
        removed = mic_energy >= out_energy * 10.0 ** (self.residual_gate_db / 10.0)
        gains = np.where(removed & echo_possible, self._gate_floor, 1.0)
        before = np.concatenate([[self._gate_gain], gains[:-1]])
        ramp = np.arange(self._frame, dtype=np.float64) / self._frame
        per_sample = before[:, None] + (gains - before)[:, None] * ramp[None, :]
        self._gate_gain = float(gains[-1])
        gated: FloatArray = (out.reshape(frames, self._frame) * per_sample).astype(
            np.float32).reshape(-1)
        self._gated_frames += int(np.count_nonzero(gains < 1.0))
        energy = np.mean(gated.reshape(frames, self._frame).astype(np.float64) ** 2, axis=1)
        return gated, energy

    def _estimate(self) -> tuple[int, float, float]:
        """(lag in samples, peak-to-sidelobe ratio, peak over the highest sidelobe) of
        the GCC-PHAT cross-correlation of the last second of microphone with the
        reference over lags 0..max_delay_ms.

        PHAT divides the cross-spectrum by its magnitude, so every frequency counts
        the same: the correlation becomes a sharp peak at the echo path's direct
        delay (followed by the room's reflections) instead of the broad, pitch-rippled
        hump plain correlation gives on speech.
        """
        size = self._fft_size
        mic = self._mic_history.last(self._window).astype(np.float64)
        far = self._far_history.last(self._window + self._max_lag).astype(np.float64)
        cross = np.conj(np.fft.rfft(mic, size)) * np.fft.rfft(far, size)
        magnitude = np.abs(cross)
        floor = 1e-9 * float(magnitude.max(initial=0.0)) + 1e-20
        cross = np.where(self._band, cross / (magnitude + floor), 0.0)
        corr = np.fft.irfft(cross, size)[: self._max_lag + 1]
        # corr[j] = sum_i mic[i] * far[i + j]; far[i + max_lag - lag] is mic[i]'s source.
        peak = int(np.argmax(corr))
        zone = max(1, int(_PEAK_ZONE_MS * self.rate / 1000))
        rest = np.concatenate([corr[: max(0, peak - zone)], corr[peak + zone + 1:]])
        if len(rest) < 2:
            return self._max_lag - peak, 0.0, 0.0
        spread = float(np.std(rest))
        top = float(corr[peak])
        psr = (top - float(np.mean(rest))) / spread if spread > 0 else 0.0
        side = float(np.max(rest))
        ratio = top / side if side > 0 else math.inf
        return self._max_lag - peak, psr, ratio

    def _update_delay(self) -> None:
        lag, psr, ratio = self._estimate()
        self._estimates += 1
        self._last_psr = psr
        if psr < _PSR_MIN or ratio < _PEAK_RATIO_MIN:
            return
        self._confident += 1
        agree = max(1, int(_AGREE_MS * self.rate / 1000))
        candidate, self._candidate = self._candidate, lag
        if candidate is None or abs(candidate - lag) > agree:
            return
        self._lag = lag
        self.delay_ms = lag * 1000.0 / self.rate
        slack = self.delay_ms - self._shift * 1000.0 / self.rate
        if not _SLACK_MS[0] <= slack <= _SLACK_MS[1]:
            shift = max(0, lag - int(_TARGET_SLACK_MS * self.rate / 1000))
            if shift != self._shift:
                self._shift = shift
                self._realignments += 1

    @property
    def reference_shift_ms(self) -> float:
        """How much the reference is delayed before AEC3."""
        return self._shift * 1000.0 / self.rate

    def stats(self) -> dict[str, float]:
        """Counters and measures since the last reset.

        ``erle_db``: echo return loss enhancement, microphone energy over output energy
        (gate included) while the reference's echo was possible (near-end speech in
        that time lowers it); ``erle_recent_db`` the same over the last ~2 s;
        ``delay_ms`` (NaN until estimated); ``shift_ms`` the reference's delay before
        AEC3; ``frames`` and ``far_frames`` (10 ms frames, all and with the reference's
        echo possible); ``estimates``, ``confident_estimates``, ``realignments``;
        ``gated_frames`` (taken down by the residual echo gate); ``cpu_s`` thread CPU
        time spent in
        :meth:`process`; ``audio_s`` the audio it processed.
        """
        def ratio_db(num: float, den: float) -> float:
            if num <= 0.0 or den <= 0.0:
                return math.nan
            return 10.0 * math.log10(num / den)

        return {
            "erle_db": ratio_db(self._mic_far_energy, self._out_far_energy),
            "erle_recent_db": ratio_db(self._mic_recent, self._out_recent),
            "delay_ms": math.nan if self.delay_ms is None else self.delay_ms,
            "shift_ms": self.reference_shift_ms,
            "frames": float(self._frames),
            "far_frames": float(self._far_frames),
            "estimates": float(self._estimates),
            "confident_estimates": float(self._confident),
            "realignments": float(self._realignments),
            "gated_frames": float(self._gated_frames),
            "last_psr": self._last_psr,
            "cpu_s": self._cpu_s,
            "audio_s": self._frames / 100.0,
        }
