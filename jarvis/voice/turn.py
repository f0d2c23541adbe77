"""A turn: one request and its answer, whichever way it came in (microphone, MQTT,
the CLI, later Wyoming and satellites). Every entry point builds a :class:`Turn` and
hands it to the one :class:`~jarvis.voice.responder.Responder`.

A turn started speculatively (at a likely end of an utterance, before the endpoint)
carries a :class:`SpeculationGate`: until the gate opens, everything anyone could
observe is held back (events, device commands, audio, the history). The gate opens
when the endpoint commits the turn; if it is not committed within its timeout the turn
gives up, as it does when speech resumes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jarvis.errors import JarvisError
from jarvis.voice.events import Outcome, Source, Stage, TurnEvent

MAX_REQUEST_CHARS = 4000
"""Longest request text any entry point accepts."""

_ids = itertools.count(1)


class RequestError(JarvisError):
    """A request no entry point accepts (empty, too long); the same words everywhere."""

    code = "invalid_request"


def validate_request(text: str) -> str:
    """``text`` stripped, or :class:`RequestError` naming the problem."""
    stripped = text.strip()
    if not stripped:
        raise RequestError("nothing to ask: the request text is empty")
    if len(stripped) > MAX_REQUEST_CHARS:
        raise RequestError(f"the request is {len(stripped):,} characters long; the limit is "
                           f"{MAX_REQUEST_CHARS:,}: shorten it")
    return stripped


class SpeculationTimeout(asyncio.CancelledError):
    """The endpoint never committed a speculative turn in time (raised in the turn)."""


class SpeculationGate:
    """Holds a speculative turn's observable effects until it is committed."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        """How long the turn may wait for its commit before it gives up."""
        self.held: list[TurnEvent] = []
        self._open = asyncio.Event()
        self._publish: Callable[[TurnEvent], None] | None = None

    @property
    def committed(self) -> bool:
        return self._open.is_set()

    def hold(self, event: TurnEvent) -> bool:
        """Keep ``event`` back if the turn is not committed yet; False when it may go out."""
        if self._open.is_set():
            return False
        self.held.append(event)
        return True

    def commit(self, publish: Callable[[TurnEvent], None]) -> None:
        """Open the gate: the held events go out in order, waiting effects proceed."""
        held, self.held = self.held, []
        for event in held:
            publish(event)
        self._open.set()

    async def wait(self) -> None:
        """Return once committed; :class:`SpeculationTimeout` after ``timeout_s``."""
        if self._open.is_set():
            return
        try:
            await asyncio.wait_for(self._open.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            raise SpeculationTimeout(
                f"speculative turn not committed within {self.timeout_s:.1f} s") from None


@dataclass
class Turn:
    """One request on its way through the responder."""

    source: Source
    conversation_id: str | None = None
    """None: a one-off turn with no history (an ask without a conversation id)."""
    request: str = ""
    """What to answer (the transcript without the wake phrase, or the typed text)."""
    transcript: str = ""
    """What was heard, for voice turns."""
    id: str = field(default_factory=lambda: f"t{next(_ids)}")
    stage: Stage = Stage.RECEIVED
    gate: SpeculationGate | None = None
    """Set for a turn started before the endpoint; see the module docstring."""
    since: float = field(default_factory=time.monotonic)
    """The moment the user finished (the last voiced sample, or the text's arrival):
    ``voice_to_voice`` and ``total`` latencies count from here."""
    speak: bool = True
    """Play the reply through the sink (when there is one)."""
    max_tokens: int | None = None
    on_text: Callable[[str], None] | None = None
    """Called with each piece of the reply's text as it is released (after the
    repetition guard), e.g. to print it as it arrives."""
    room: str = ""
    """The room (satellite) it was heard in; "" for the assistant's own microphone and
    for text."""
    latency: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: endpoint, asr, devices, llm_ttft, tts_first, voice_to_voice,
    total."""

    @property
    def uncommitted(self) -> bool:
        return self.gate is not None and not self.gate.committed

    async def committed(self) -> None:
        """Wait until this turn may act (at once unless it is an open speculation)."""
        if self.gate is not None:
            await self.gate.wait()


@dataclass
class TurnResult:
    """How a turn ended, for whoever started it."""

    turn_id: str
    outcome: Outcome
    transcript: str = ""
    request: str = ""
    reply: str = ""
    """What was actually said (cut short on barge-in)."""
    failed_stage: Stage | None = None
    error: str = ""
    error_code: str = ""
    interrupted: bool = False
    actions: list[dict[str, str]] = field(default_factory=list)
    """Device commands sent for this turn (``DeviceCommand.describe()``)."""
    intent: str = "chat"
    """chat, local (device matcher), ambiguous, llm (grammar fallback), control."""
    latency: dict[str, float] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)
    """The model request's counts (prompt/cached/completion tokens, cache hit, finish
    reason), when the model answered."""
    regenerated: bool = False
    """The repetition guard threw away a first reply and answered without history."""

    @property
    def ignored(self) -> bool:
        return self.outcome is Outcome.IGNORED

    @property
    def cancelled(self) -> bool:
        return self.outcome is Outcome.CANCELLED
