"""What a turn tells the rest of the world (latency tracker, MQTT, the CLI, logs,
benchmarks): small frozen events, each stamped with the turn it belongs to, and one
``TURN_END`` per turn that says how it ended. Nobody has to infer the end of a turn.

Events of the listening loop itself (``LISTENING``, ``SPEECH_STARTED``, ``BARGE_IN``)
carry no turn id; everything else does.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class Source(str, enum.Enum):
    """Where a turn came from."""

    MICROPHONE = "microphone"
    MQTT = "mqtt"
    CLI = "cli"
    WYOMING = "wyoming"
    SATELLITE = "satellite"


class Stage(str, enum.Enum):
    """The stages of a turn, in order; a failed turn names the one that failed."""

    RECEIVED = "received"
    ASR = "asr"
    WAKE = "wake"
    DEVICES = "devices"
    LLM = "llm"
    TTS = "tts"
    AUDIO = "audio"
    DONE = "done"


class Outcome(str, enum.Enum):
    """How a turn ended."""

    ANSWERED = "answered"
    IGNORED = "ignored"
    """Not for Jarvis: no wake phrase, nothing heard."""
    CANCELLED = "cancelled"
    """Barge-in, a cancel command, shutdown, or a speculation that speech overtook."""
    FAILED = "failed"
    """A stage failed; :attr:`TurnEvent.stage` says which. The loop keeps going."""


class EventType(str, enum.Enum):
    """The kinds of event, in the order a turn usually produces them."""

    LISTENING = "listening"
    """Waiting for speech (also after a reply)."""
    WAKE_WORD = "wake_word"
    """The wake-word model fired (``data['phrase']``, ``data['probability']``): the
    endpointer listens for the request."""
    SPEECH_STARTED = "speech_started"
    SPEECH_ENDED = "speech_ended"
    """Endpoint: the utterance is complete (``data['duration_s']``)."""
    TRANSCRIPT = "transcript"
    WAKE = "wake"
    """The wake phrase was heard (``text`` is what followed it, maybe empty)."""
    THINKING = "thinking"
    """The request (``text``) is being answered."""
    FIRST_TOKEN = "first_token"
    FIRST_AUDIO = "first_audio"
    """The reply's first sample went to the sink (``data['voice_to_voice_s']``)."""
    BARGE_IN = "barge_in"
    """The user spoke over the reply; ``data['stop_s']`` is how long stopping took once
    speech was confirmed (0 when the speaker was already paused at its first frame,
    ``data['paused_s']`` before)."""
    ERROR = "error"
    """A stage failed (``stage``, ``text`` = message); a ``TURN_END`` follows."""
    ROOM = "room"
    """A room's satellite came or went (``data['available']``, ``data['reason']``)."""
    TURN_END = "turn_end"
    """The last event of every turn: ``outcome``, ``text`` = the reply as heard,
    ``data`` = transcript, request, latency (seconds per stage), interrupted, actions."""


@dataclass(frozen=True)
class TurnEvent:
    """One thing that happened, stamped with ``time.monotonic()``."""

    type: EventType
    turn_id: str = ""
    """Empty for events of the listening loop itself."""
    source: Source | None = None
    conversation_id: str = ""
    text: str = ""
    stage: Stage | None = None
    """For ``ERROR`` and a failed ``TURN_END``: the stage that failed."""
    outcome: Outcome | None = None
    """Set on ``TURN_END`` only."""
    data: Mapping[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    room: str = ""
    """The room (satellite) the turn or the listening loop belongs to; "" for the
    assistant's own microphone and for turns that came as text."""


Listener = Callable[[TurnEvent], None]


class EventBus:
    """Delivers events to listeners, in order, on the event loop. A listener that
    raises is logged and skipped: a broken observer never stops the assistant."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every event (keep it quick); returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def publish(self, event: TurnEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", event.type.value)
