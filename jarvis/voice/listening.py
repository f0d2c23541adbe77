"""What the microphone stream goes through before a turn starts, and which parts are on.

``microphone → echo cancellation → wake-word gate → Silero endpointer → utterances``

- **Echo cancellation** (``JARVIS_ECHO_CANCEL``): WebRTC AEC3 removes the speaker's own
  sound, with what was handed to the speaker as the far-end reference
  (:class:`~jarvis.audio.echo.EchoReference`); the echo path's delay is estimated from
  the two signals, not assumed.
- **Wake-word gate** (``JARVIS_WAKE_WORD`` naming a bundled model): a microWakeWord
  model hears every chunk; the endpointer (and so ASR) hears nothing until it fires,
  except while the gate is held open: the follow-up window after a reply, a reply being
  spoken with barge-in on, an utterance in progress. When it fires, the last
  ``preroll_s`` of audio go to the endpointer first, so a request said in the same
  breath as the wake word ("hey jarvis what time is it") is heard whole. Whisper
  must then read the wake phrase at the start of that utterance (:func:`confirmed_request`
  on a transcript made with ``wake_phrase``: a forced-alignment score, about 20 ms),
  and the request is the text read after it.
- Any other ``JARVIS_WAKE_WORD`` text is a phrase matched on transcripts
  (:mod:`jarvis.voice.wake`): everything the VAD hears is transcribed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np

from jarvis.audio.echo import EchoCanceller, EchoReference, echo_cancel_unavailable
from jarvis.audio.formats import ASR_RATE, FloatArray
from jarvis.config import PipelineSettings
from jarvis.errors import ConfigError
from jarvis.speech.asr import WAKE_LOGPROB_CORROBORATED, Transcript
from jarvis.speech.silero import Endpointer
from jarvis.speech.vad import VadEvent
from jarvis.speech.wakeword import (
    BUNDLED_WAKE_WORDS,
    WakeDetection,
    WakeWordDetector,
    is_bundled,
)
from jarvis.voice.wake import edit_distance

log = logging.getLogger(__name__)

PREROLL_S = 1.5
"""Audio before the wake word's detection handed to the endpointer: covers "hey jarvis"
said at a slow pace (the model fires near the end of the phrase)."""
AWAKE_S = 5.0
"""After the wake word, how long the endpointer listens for a request to start."""


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Feature:
    """One listening feature, whether it is on, and why (not)."""

    name: str
    active: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}: {'on' if self.active else 'off'} ({self.detail})"


@dataclass(frozen=True)
class ListeningPlan:
    """Wake word, echo cancellation and barge-in as the settings and the machine allow."""

    wake_model: str | None
    """The bundled wake-word model on the microphone stream, if any."""
    wake_phrase: str
    """The phrase matched on transcripts ("" with a model, or when off)."""
    echo_cancel: bool
    barge_in: bool
    features: tuple[Feature, ...] = field(default=())

    def lines(self) -> list[str]:
        return [f.line() for f in self.features]


def resolve_wake_word(value: str) -> tuple[str | None, str]:
    """(bundled model, transcript phrase) for a ``JARVIS_WAKE_WORD`` value.

    "hey_jarvis", "Hey Jarvis" and "hey jarvis" all name the bundled model; a name
    shaped like a model (one word with ``_``) that is not bundled is a ConfigError
    listing the bundled ones; any other text is a phrase matched on transcripts."""
    value = " ".join(value.split()).lower()
    if not value:
        return None, ""
    as_model = value.replace(" ", "_").replace("-", "_")
    if is_bundled(as_model):
        return as_model, ""
    if "_" in value and " " not in value:
        raise ConfigError(
            f"JARVIS_WAKE_WORD={value[:80]!r}: no such wake-word model; bundled: "
            f"{', '.join(BUNDLED_WAKE_WORDS)} (other text, e.g. \"hey computer\", is "
            "matched on transcripts; off = answer everything)")
    return None, value


def plan_listening(p: PipelineSettings, *, speaker: bool, microphone: bool) -> ListeningPlan:
    """Decide what is on. ``speaker``: replies are played on a loudspeaker;
    ``microphone``: the input is a live microphone that can hear it. ConfigError for
    a wake-word model that does not exist, or ``JARVIS_ECHO_CANCEL=on`` where it cannot
    run."""
    model, phrase = resolve_wake_word(p.wake_word)
    if model is not None:
        wake = Feature("wake word", True, f"model {model} on the microphone stream")
    elif phrase:
        wake = Feature("wake word", True, f"phrase {phrase!r} matched on transcripts")
    else:
        wake = Feature("wake word", False, "JARVIS_WAKE_WORD=off: everything heard is answered")

    unavailable = echo_cancel_unavailable() if p.echo_cancel != "off" else None
    if p.echo_cancel == "off":
        echo = Feature("echo cancellation", False, "JARVIS_ECHO_CANCEL=off")
    elif unavailable is not None:
        if p.echo_cancel == "on":
            raise ConfigError(f"JARVIS_ECHO_CANCEL=on: {unavailable}; set it to auto or off")
        echo = Feature("echo cancellation", False, unavailable)
    elif not (speaker and microphone):
        why = ("replies are not played on a speaker" if not speaker
               else "the input is a recording, not a microphone")
        if p.echo_cancel == "on":
            echo = Feature("echo cancellation", True, f"JARVIS_ECHO_CANCEL=on, although {why}")
        else:
            echo = Feature("echo cancellation", False, f"nothing to cancel: {why}")
    else:
        echo = Feature("echo cancellation", True,
                       "WebRTC AEC3, the speaker's output as reference")

    if p.barge_in is None:
        barge = Feature("barge-in", echo.active,
                        "on with echo cancellation" if echo.active else
                        "off without echo cancellation (JARVIS_BARGE_IN=auto)")
    else:
        barge = Feature("barge-in", p.barge_in, f"JARVIS_BARGE_IN={str(p.barge_in).lower()}")
    return ListeningPlan(model, phrase, echo.active, barge.active, (wake, echo, barge))


# --------------------------------------------------------------------------- wake phrase


_WORD = re.compile(r"[A-Za-z0-9']+")


def wake_request(text: str, phrase: str, *, max_edits: int = 2) -> str | None:
    """The request after the wake phrase in ``text`` (maybe ""), or None when the
    transcript does not have it: how a phrase is found in words (a follow-up that says
    it, a satellite's own wake word, the wake-word check in noise).

    Speech recognition writes "jarvis" as "jervis" or "javis" often enough, and a name
    it does not know as two words ("Mycroft" as "my craft"): the phrase's last word is
    matched within the first words, allowing one edit (two for words of six letters or
    more, never more than ``max_edits``), or as two heard words joined, allowing one
    edit. "Hey Janice" or "hey Charles" do not pass."""
    words = list(_WORD.finditer(text))
    key = _WORD.findall(phrase.lower())
    if not key:
        return text.strip()
    last = key[-1]
    first = words[:len(key) + 3]
    for match, following in zip_longest(first, first[1:]):
        heard = match.group().lower()
        if _close(heard, last, max_edits):
            return _after(text, match.end())
        if following is not None and _close(heard + following.group().lower(), last, 1):
            return _after(text, following.end())
    return None


def confirmed_request(transcript: Transcript, phrase: str) -> str | None:
    """The request after a wake-word detection, or None when the second check turns it
    down. ``transcript`` was made with ``wake_phrase=phrase``, so it has the phrase's
    forced-alignment score (:mod:`jarvis.speech.asr`):

    - at least ``WAKE_LOGPROB_MIN``: heard; the request is what was read after it;
    - at least ``WAKE_LOGPROB_CORROBORATED`` (noise makes whisper unsure of every
      word): heard if the free transcript has the phrase too, its last word within one
      edit ("Hey Jervis"), so "Hey Janice" heard as "Hey Jabbis" stays out;
    - lower: not heard, whatever the words ("Good night Jarvis" scores about -7).

    Without a score (an input over 30 s goes through long-form whisper) the words
    decide, as :func:`wake_request` reads them."""
    if transcript.wake_score is None:
        return wake_request(transcript.text, phrase)
    if transcript.wake_heard:
        return _after(transcript.text, len(transcript.wake_prefix))
    if transcript.wake_score >= WAKE_LOGPROB_CORROBORATED:
        return wake_request(transcript.text, phrase, max_edits=1)
    return None


def strip_wake_phrase(text: str, phrase: str) -> str:
    """``text`` without the wake phrase (and anything before it) if it has it, else all
    of ``text``: for requests that need no wake word (a follow-up) but may say it."""
    request = wake_request(text, phrase)
    return text.strip() if request is None else request


def _after(text: str, end: int) -> str:
    """The request: ``text`` from ``end`` on, without the punctuation after the phrase."""
    return text[end:].lstrip(" ,.!?;:-").strip()


def _close(heard: str, expected: str, max_edits: int = 2) -> bool:
    if heard == expected:
        return True
    allowed = min(max_edits, 1 if len(expected) < 6 else 2)
    if abs(len(heard) - len(expected)) > allowed or min(len(heard), len(expected)) < 4:
        return False
    return edit_distance(heard, expected) <= allowed


# --------------------------------------------------------------------------- front end


@dataclass
class Heard:
    """What one microphone chunk caused."""

    events: list[VadEvent]
    wake: WakeDetection | None = None


class FrontEnd:
    """Echo cancellation, the wake-word gate and the endpointer over the microphone
    stream. ``process`` is synchronous (the pipeline runs it in a worker thread); the
    pipeline opens the gate from the event loop through :attr:`hold_open` and
    :meth:`open_for`."""

    def __init__(
        self,
        endpointer: Endpointer,
        *,
        detector: WakeWordDetector | None = None,
        canceller: EchoCanceller | None = None,
        preroll_s: float = PREROLL_S,
        awake_s: float = AWAKE_S,
    ) -> None:
        self.endpointer = endpointer
        self.detector = detector
        self.canceller = canceller
        self._awake = int(awake_s * ASR_RATE)
        self._pos = 0
        """Samples of the stream processed: the gate's clock (a file fed faster than
        real time keeps the same windows as a microphone)."""
        self._ring: deque[FloatArray] = deque()
        self._ring_len = 0
        self._ring_max = int(preroll_s * ASR_RATE)
        self._open_until = 0
        self._listening = detector is None
        self._fed = 0
        """Samples given to the endpointer since its last reset (its clock)."""
        self._wake: WakeDetection | None = None
        self._wake_mark = 0
        """Endpointer position of the chunk the wake word fired in."""
        self.hold_open = False
        """Set by the pipeline while the endpointer must hear everything (a reply being
        spoken with barge-in on)."""
        self.detections = 0

    @property
    def gated(self) -> bool:
        """A wake-word model decides when the endpointer listens."""
        return self.detector is not None

    @property
    def listening(self) -> bool:
        """The endpointer is hearing the stream now."""
        return self._listening

    def sleep(self) -> None:
        """The wake word was not confirmed (the transcript lacks it): back to the wake
        word alone once the endpointer is idle, instead of listening on."""
        self._open_until = min(self._open_until, self._pos)
        self._wake = None

    def claim_wake(self, end_sample: int, *, consume: bool = True) -> str:
        """The wake phrase, for the utterance ending at endpointer position
        ``end_sample`` if it spans or follows the detection ("" otherwise): an utterance
        of the pre-roll that ended before the wake word does not take it."""
        wake = self._wake
        if wake is None or end_sample < self._wake_mark:
            return ""
        if consume:
            self._wake = None
        return wake.phrase

    def open_for(self, seconds: float) -> None:
        """Let the endpointer hear everything for the next ``seconds`` of the stream
        (the follow-up window)."""
        self._open_until = max(self._open_until, self._pos + int(seconds * ASR_RATE))

    def reset(self) -> None:
        self.endpointer.reset()
        if self.detector is not None:
            self.detector.reset()
        if self.canceller is not None:
            self.canceller.reset()
        self._ring.clear()
        self._ring_len = 0
        self._listening = self.detector is None
        self._fed = 0
        self._wake = None

    def process(self, chunk: FloatArray) -> Heard:
        clean = self.canceller.process(chunk) if self.canceller is not None else chunk
        self._pos += len(clean)
        if self.detector is None:
            return Heard(self.endpointer.process(clean))
        wake = self.detector.process(clean) if len(clean) else None
        if wake is not None:
            self.detections += 1
            self.detector.rearm()
            self._open_until = max(self._open_until, self._pos + self._awake)
        if self._listening:
            events = self.endpointer.process(clean)
            self._fed += len(clean)
            self._mark(wake, len(clean))
            if not self._should_listen():
                self._close()
            return Heard(events, wake)
        self._remember(clean)
        if not self._should_listen():
            return Heard([], wake)
        # The gate opens: the endpointer starts from the pre-roll, which holds the wake
        # phrase and whatever followed it in the same breath.
        self._listening = True
        audio = np.concatenate(self._ring) if self._ring else np.zeros(0, np.float32)
        self._ring.clear()
        self._ring_len = 0
        self.endpointer.reset()
        events = self.endpointer.process(audio)
        self._fed = len(audio)
        self._mark(wake, len(clean))
        return Heard(events, wake)

    def _mark(self, wake: WakeDetection | None, chunk: int) -> None:
        if wake is not None:
            self._wake = wake
            self._wake_mark = self._fed - chunk

    def flush(self) -> list[VadEvent]:
        return self.endpointer.flush() if self._listening else []

    def _should_listen(self) -> bool:
        return (self.hold_open or self._pos < self._open_until
                or self.endpointer.segmenter.state.value != "idle")

    def _close(self) -> None:
        """Back to the wake word alone; the endpointer is idle (nothing is cut)."""
        self.endpointer.flush()
        self._listening = False

    def _remember(self, chunk: FloatArray) -> None:
        self._ring.append(chunk)
        self._ring_len += len(chunk)
        while self._ring and self._ring_len - len(self._ring[0]) >= self._ring_max:
            self._ring_len -= len(self._ring.popleft())


class ReferenceWatch:
    """Says once when the echo reference stops arriving while the speaker plays (a
    stalled output device, a sink that does not feed it), and once when it is back.
    Listening goes on either way: the canceller passes the microphone through."""

    def __init__(self, reference: EchoReference, *, stale_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reference = reference
        self.stale_s = stale_s
        self._clock = clock
        self._since: float | None = None
        self.missing = False

    def check(self, playing: bool) -> str | None:
        """The message to log now, if any; call it once per microphone chunk."""
        now = self._clock()
        if not playing:
            self._since = None
            return None
        if self._since is None:
            self._since = now  # the reply just started: give the speaker time
        last = self.reference.last_push_s
        latest = max(self._since, last) if last is not None else self._since
        if now - latest > self.stale_s and not self.missing:
            self.missing = True
            return (f"echo cancellation: nothing from the speaker for {now - latest:.1f} s "
                    "while a reply plays; the microphone goes on uncleaned (Jarvis may hear "
                    "itself) until the speaker's output comes back")
        if self.missing and now - latest <= self.stale_s:
            self.missing = False
            return "echo cancellation: the speaker's output is back"
        return None


def make_front_end(plan: ListeningPlan, endpointer: Endpointer,
                   reference: EchoReference | None, *, threshold: float | None = None
                   ) -> FrontEnd:
    """The front end the plan asks for; the wake-word model loads here."""
    detector = (WakeWordDetector(plan.wake_model, cutoff=threshold) if plan.wake_model
                else None)
    canceller = (EchoCanceller(reference) if plan.echo_cancel and reference is not None
                 else None)
    return FrontEnd(endpointer, detector=detector, canceller=canceller)
