"""The conversation agent over Wyoming: ``transcript`` → ``handled``.

Home Assistant sends ``Transcript(text, context={"conversation_id": ...})`` and reads
until ``handled`` or ``not-handled``. The request is a :class:`~jarvis.voice.turn.Turn`
(source ``wyoming``) for the one responder, so it gets what every entry point gets: the
device map first (commands go out through the responder's actuator, the MQTT bridge
when there is one), then the model with the conversation's history. Home Assistant's
``conversation_id`` is the conversation, so its context cache entry keeps hitting.

The reply streams as well: ``handled-start`` with the first released text,
``handled-chunk`` for each piece as the repetition guard releases it, then the whole
reply in ``handled`` (what a client that does not stream reads) and ``handled-stop``.
A request the responder refuses (empty, too long) is ``not-handled`` with the reason;
a stage that fails is an ``error`` event whose code names the stage.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled

from jarvis.voice.events import Outcome, Source
from jarvis.voice.responder import Responder
from jarvis.voice.turn import Turn, TurnResult
from jarvis.wyoming.protocol import field

log = logging.getLogger(__name__)

MAX_ID_CHARS = 200
"""Longest conversation id kept as it is (a longer one is a new, one-off conversation)."""


@dataclass
class Handling:
    """What one ``transcript`` became."""

    result: TurnResult
    streamed: bool
    """Whether ``handled-start`` went out (the reply had text to stream)."""
    failed: bool
    """Answered with an ``error`` event (the connection closes after it)."""


async def handle(responder: Responder, event: Event, send: Callable[[Event], Awaitable[None]],
                 send_now: Callable[[Event], None], peer: str = "") -> Handling:
    """Answer one ``transcript`` event through ``responder``."""
    text = field(event, "text", str)
    context = field(event, "context", dict, required=False) or {}
    conversation_id = _conversation_id(context)
    reply_context: dict[str, Any] = (
        {"conversation_id": conversation_id} if conversation_id is not None else {})
    streamed = False

    def on_text(piece: str) -> None:
        nonlocal streamed
        if not streamed:
            send_now(HandledStart(context=reply_context).event())
            streamed = True
        send_now(HandledChunk(text=piece).event())

    turn = Turn(Source.WYOMING, conversation_id, request=text, speak=False, on_text=on_text)
    result = await responder.respond(turn, None)
    failed = False
    if result.outcome is Outcome.ANSWERED:
        if not streamed:
            send_now(HandledStart(context=reply_context).event())
            streamed = True
        await send(Handled(text=result.reply, context=reply_context).event())
    elif result.outcome is Outcome.FAILED and result.error_code != "invalid_request":
        log.warning("wyoming %s: turn %s failed in %s: %s", peer, result.turn_id,
                    result.failed_stage.value if result.failed_stage else "?", result.error)
        await send(Error(text=result.error, code=result.error_code or "failed").event())
        failed = True
    else:  # refused (empty, too long), cancelled, ignored: nothing was done
        reason = result.error or f"the request was {result.outcome.value}"
        await send(NotHandled(text=reason, context=reply_context).event())
    if streamed and not failed:
        await send(HandledStop().event())
    return Handling(result, streamed, failed)


def _conversation_id(context: dict[str, Any]) -> str | None:
    value = context.get("conversation_id")
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value)
        if text and len(text) <= MAX_ID_CHARS:
            return text
    return None
