"""Endpointing as a pure state machine: frames with a speech probability in, events out.

:class:`Segmenter` knows nothing about the model that scores frames (see
:mod:`jarvis.speech.silero`), so it can be driven by any numbers in a test. It turns a
stream of ``(frame, probability)`` pairs into:

- :class:`SpeechStarted` once speech has lasted ``min_speech_ms`` (shorter bursts such
  as clicks are not utterances);
- :class:`UtteranceEnded` with all of the utterance's audio, from ``preroll_ms``
  before the first speech frame (so the first syllable is never cut) to the end of
  ``silence_ms`` of silence, or earlier when ``max_utterance_s`` is reached or the
  stream ends. The last part of that silence (at most ``preroll_ms``, at most half
  of it) is kept as the next pre-roll instead, so speech that starts just as the
  silence timer fires keeps its first sound;
- :class:`FramesDropped` for audio that belongs to no utterance;
- with ``pause_ms`` set (shorter than ``silence_ms``), :class:`PauseDetected` when an
  utterance has been silent that long — a *likely* end, with a copy of the audio so
  far, so transcription and the reply can start before the endpoint is final — and
  :class:`SpeechResumed` if speech comes back before the endpoint (the likely end was
  wrong: discard that work).

The pre-roll is capped at half the maximum utterance length. Every sample pushed
appears exactly once, in order, in the audio of the
``UtteranceEnded`` and ``FramesDropped`` events (a property test checks this).

States: ``IDLE`` keeps a rolling pre-roll; the first frame at or above the threshold
moves to ``PENDING``, which becomes ``SPEECH`` when enough speech has been seen or
falls back to ``IDLE`` after ``silence_ms`` of silence. Silence starts at a frame
below ``neg_threshold`` (hysteresis, as Silero recommends) and lasts until a frame at
or above ``threshold``.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from jarvis.audio.formats import ASR_RATE, FloatArray
from jarvis.config import VadSettings


class EndReason(str, enum.Enum):
    """Why an utterance ended."""

    SILENCE = "silence"
    MAX_LENGTH = "max_length"
    END_OF_STREAM = "end_of_stream"


@dataclass(frozen=True)
class SpeechStarted:
    """Speech confirmed; the utterance's audio will start at ``start_sample``."""

    start_sample: int
    """Stream position (in samples) of the first sample of the utterance, pre-roll included."""
    onset_sample: int
    """Stream position of the first frame judged to be speech."""


@dataclass(frozen=True)
class UtteranceEnded:
    """An utterance is complete; ``audio`` is everything from its start to now."""

    audio: FloatArray = field(repr=False)
    start_sample: int
    reason: EndReason
    sample_rate: int = ASR_RATE

    @property
    def end_sample(self) -> int:
        return self.start_sample + len(self.audio)

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass(frozen=True)
class FramesDropped:
    """Audio that belongs to no utterance (silence, or speech too short to count)."""

    audio: FloatArray = field(repr=False)
    start_sample: int


@dataclass(frozen=True)
class PauseDetected:
    """The utterance has been silent for ``pause_ms``: probably its end. ``audio`` is a
    copy of the utterance so far (it is still delivered by :class:`UtteranceEnded`)."""

    audio: FloatArray = field(repr=False)
    start_sample: int
    silence_samples: int
    """How much of the end of ``audio`` is silence."""
    sample_rate: int = ASR_RATE

    @property
    def silence_s(self) -> float:
        return self.silence_samples / self.sample_rate


@dataclass(frozen=True)
class SpeechResumed:
    """Speech came back after a :class:`PauseDetected`: the utterance goes on."""

    sample: int
    """Stream position just after the frame that resumed speech."""


@dataclass(frozen=True)
class SpeechOnset:
    """A first frame judged to be speech: maybe speech, not yet :class:`SpeechStarted`
    (that needs ``min_speech_ms`` of it). Barge-in pauses playback here, so the speaker
    goes quiet without waiting for the confirmation."""

    onset_sample: int


@dataclass(frozen=True)
class OnsetRejected:
    """The sound after a :class:`SpeechOnset` was too short to be speech (a click, a
    cough, a door): whatever was paused for it may go on."""

    sample: int


VadEvent: TypeAlias = (SpeechStarted | UtteranceEnded | FramesDropped | PauseDetected
                       | SpeechResumed | SpeechOnset | OnsetRejected)


@dataclass(frozen=True)
class SegmenterConfig:
    """Thresholds and durations, in samples where it matters."""

    sample_rate: int = ASR_RATE
    threshold: float = 0.5
    neg_threshold: float | None = None
    """Below this a frame counts as silence; default ``threshold - 0.15``."""
    # The defaults are those of the JARVIS_VAD_* settings (a test keeps them equal),
    # except pause_ms: no likely ends unless asked for.
    silence_ms: int = 300
    min_speech_ms: int = 200
    preroll_ms: int = 500
    max_utterance_s: float = 15.0
    pause_ms: int = 0
    """Silence after which :class:`PauseDetected` fires; 0 (or not shorter than
    ``silence_ms``) = never."""

    @classmethod
    def from_settings(cls, vad: VadSettings, sample_rate: int = ASR_RATE) -> SegmenterConfig:
        return cls(
            sample_rate=sample_rate, threshold=vad.threshold, silence_ms=vad.silence_ms,
            min_speech_ms=vad.min_speech_ms, preroll_ms=vad.preroll_ms,
            max_utterance_s=vad.max_utterance_s, pause_ms=vad.speculate_ms,
        )

    @property
    def off_threshold(self) -> float:
        if self.neg_threshold is not None:
            return self.neg_threshold
        return max(0.01, self.threshold - 0.15)

    def samples(self, ms: float) -> int:
        return round(ms * self.sample_rate / 1000.0)


class State(str, enum.Enum):
    IDLE = "idle"
    PENDING = "pending"
    SPEECH = "speech"


class Segmenter:
    """The endpointing state machine (see the module docstring)."""

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        self.config = config or SegmenterConfig()
        c = self.config
        self._silence_limit = max(1, c.samples(c.silence_ms))
        self._min_speech = c.samples(c.min_speech_ms)
        self._max_len = max(1, c.samples(c.max_utterance_s * 1000.0))
        self._preroll = min(c.samples(c.preroll_ms), self._max_len // 2)
        pause = c.samples(c.pause_ms)
        self._pause_limit = pause if 0 < pause < self._silence_limit else 0
        self.reset()

    def reset(self, position: int = 0) -> None:
        """Forget everything; the next sample pushed is at stream ``position``."""
        self.state = State.IDLE
        self._frames: deque[FloatArray] = deque()
        self._buffered = 0
        self._buf_start = position
        self._pos = position
        self._speech = 0
        self._silence = 0
        self._onset = position
        self._paused = False

    @property
    def position(self) -> int:
        """Samples pushed so far (stream position of the next sample)."""
        return self._pos

    @property
    def in_speech(self) -> bool:
        return self.state is State.SPEECH

    def push(self, frame: FloatArray, speech_prob: float) -> list[VadEvent]:
        """Feed one frame and its speech probability; returns the events it caused."""
        frame = np.asarray(frame, dtype=np.float32).reshape(-1)
        n = len(frame)
        if n == 0:
            return []
        events: list[VadEvent] = []
        c = self.config
        is_speech = speech_prob >= c.threshold
        if is_speech:
            self._silence = 0
        elif self._silence > 0 or speech_prob < c.off_threshold:
            self._silence += n
        self._append(frame)

        if self.state is State.IDLE:
            if is_speech:
                self.state = State.PENDING
                self._onset = self._pos - n
                self._speech = 0
                self._silence = 0
                events.append(SpeechOnset(self._onset))
            else:
                self._silence = 0
                events += self._trim_preroll()
        if self.state is State.PENDING:
            if is_speech:
                self._speech += n
            if self._speech >= self._min_speech:
                self.state = State.SPEECH
                events.append(SpeechStarted(self._buf_start, self._onset))
            elif self._silence >= self._silence_limit or self._buffered >= self._max_len:
                self.state = State.IDLE
                self._silence = 0
                events.append(OnsetRejected(self._pos))
                events += self._trim_preroll()
                return events
        if self.state is State.SPEECH:
            if self._silence >= self._silence_limit:
                events.append(self._end(EndReason.SILENCE))
            elif self._buffered >= self._max_len:
                events.append(self._end(EndReason.MAX_LENGTH))
            else:
                events += self._pause_events(is_speech)
        return events

    def _pause_events(self, is_speech: bool) -> list[VadEvent]:
        if not self._pause_limit:
            return []
        if self._paused and is_speech:
            self._paused = False
            return [SpeechResumed(self._pos)]
        if not self._paused and self._silence >= self._pause_limit:
            self._paused = True
            audio = np.concatenate(self._frames) if self._frames else np.zeros(0, np.float32)
            return [PauseDetected(audio, self._buf_start, min(self._silence, len(audio)),
                                  self.config.sample_rate)]
        return []

    def flush(self) -> list[VadEvent]:
        """End of stream: close an utterance in progress, drop anything else buffered."""
        if self.state is State.SPEECH:
            return [self._end(EndReason.END_OF_STREAM)]
        events: list[VadEvent] = []
        if self._buffered:
            events.append(FramesDropped(self._take(len(self._frames)), self._buf_start))
        self.reset(self._pos)
        return events

    # ----------------------------------------------------------------- internals

    def _append(self, frame: FloatArray) -> None:
        self._frames.append(frame)
        self._buffered += len(frame)
        self._pos += len(frame)

    def _take(self, count: int) -> FloatArray:
        """Remove the first ``count`` buffered frames and return their samples."""
        taken = [self._frames.popleft() for _ in range(count)]
        self._buffered -= sum(len(f) for f in taken)
        if not taken:
            return np.zeros(0, dtype=np.float32)
        return taken[0].copy() if len(taken) == 1 else np.concatenate(taken)

    def _trim_preroll(self) -> list[VadEvent]:
        """Drop whole frames from the front while the rest still covers the pre-roll."""
        count = 0
        remaining = self._buffered
        for f in self._frames:
            if remaining - len(f) < self._preroll:
                break
            remaining -= len(f)
            count += 1
        if not count:
            return []
        start = self._buf_start
        audio = self._take(count)
        self._buf_start += len(audio)
        return [FramesDropped(audio, start)]

    def _end(self, reason: EndReason) -> UtteranceEnded:
        carried: list[FloatArray] = []
        if reason is EndReason.SILENCE:
            # Hand the end of the silence to the next utterance's pre-roll: speech that
            # starts just as the silence timer fires must not lose its first sound.
            limit = min(self._preroll, self._silence // 2)
            total = 0
            for frame in reversed(self._frames):
                if total + len(frame) > limit:
                    break
                total += len(frame)
                carried.append(frame)
        start = self._buf_start
        audio = self._take(len(self._frames) - len(carried))
        event = UtteranceEnded(audio, start, reason, self.config.sample_rate)
        self.reset(self._pos)
        for frame in reversed(carried):
            self._frames.append(frame)
            self._buffered += len(frame)
        self._buf_start = self._pos - self._buffered
        return event
