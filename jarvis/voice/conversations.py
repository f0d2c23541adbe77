"""Conversations with a lifecycle: keyed by id (the microphone's, each MQTT
``conversation_id``, later each room), expired after ``JARVIS_CONVERSATION_IDLE_S`` of
silence, started afresh at once by "start over" / "new conversation", and at most
``max_conversations`` kept (least recently used go first).

A fresh conversation is just the system prompt, whose evaluated state the context
cache always holds, so expiry and "start over" cost no cold prompt.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from jarvis.llm.dialogue import Conversation

log = logging.getLogger(__name__)

_RESET = re.compile(
    r"^\W*(?:(?:ok(?:ay)?|hey|jarvis|please)\W+)*"
    r"(?:let'?s\s+)?(?:start\s+(?:over|again|afresh)|(?:a\s+)?new\s+conversation"
    r"|reset\s+(?:the\s+)?conversation|forget\s+(?:that|everything))\b\W*",
    re.IGNORECASE)
RESET_REPLY = "Okay, let's start over."


def split_reset(text: str) -> tuple[bool, str]:
    """Whether ``text`` asks for a new conversation, and what follows the request
    ("start over. what's the time?" -> (True, "what's the time?"))."""
    match = _RESET.match(text)
    if match is None:
        return False, text
    return True, text[match.end():].strip()


@dataclass
class Entry:
    conversation: Conversation
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Turns of one conversation are answered one after another."""
    last_used: float = 0.0


class Conversations:
    """The conversations the assistant is having, by id."""

    def __init__(self, system_prompt: str, *, history_turns: int, idle_s: float,
                 max_conversations: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.system_prompt = system_prompt
        self.history_turns = history_turns
        self.idle_s = idle_s
        self.max_conversations = max_conversations
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.expired = 0
        """Conversations ended by ``idle_s`` of silence so far."""

    def new(self) -> Conversation:
        return Conversation(self.system_prompt, max_turns=self.history_turns)

    def get(self, conversation_id: str | None) -> Entry:
        """The conversation ``conversation_id``: a new one if unknown or expired; a
        throwaway one for None (no history kept)."""
        now = self._clock()
        if conversation_id is None:
            return Entry(self.new(), last_used=now)
        entry = self._entries.get(conversation_id)
        if entry is not None and self.idle_s and now - entry.last_used > self.idle_s \
                and not entry.lock.locked():
            log.info("conversation %r expired after %.0f s of silence", conversation_id,
                     now - entry.last_used)
            self.expired += 1
            entry.conversation = self.new()
        if entry is None:
            entry = Entry(self.new())
            self._entries[conversation_id] = entry
            self._evict(keep=conversation_id)
        entry.last_used = now
        self._entries.move_to_end(conversation_id)
        return entry

    def reset(self, conversation_id: str | None) -> None:
        """Start ``conversation_id`` afresh now."""
        if conversation_id is not None and conversation_id in self._entries:
            self._entries[conversation_id].conversation = self.new()

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, keep: str) -> None:
        """Drop the least recently used conversations over the cap; never ``keep`` (just
        created) nor one in use (the cap may then be exceeded until they finish)."""
        for conversation_id in list(self._entries):
            if len(self._entries) <= self.max_conversations:
                return
            if conversation_id != keep and not self._entries[conversation_id].lock.locked():
                del self._entries[conversation_id]
