"""Which llama.cpp server slot answers which request, so each conversation keeps
hitting the KV cache its earlier turns left in "its" slot.

The backend protocol carries messages, not conversation ids, and it needs none: a
conversation's next prompt is its last prompt plus the reply plus the new request, so
the slot whose last prompt (and reply) is the longest leading run of the new messages
is that conversation's slot. A request that continues nothing (a new conversation, or
one asked afresh without its history) goes to a free slot that holds no conversation
(only the warmed system prompt), else to the least recently used free slot, else to
the least recently used slot (the server queues it there).

The table is the client's view: the server may evict or restart; then a request
simply costs a re-evaluation once, and :meth:`SlotTable.reset` starts over.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from jarvis.llm.base import ChatMessage


@dataclass
class Slot:
    """What the client knows of one server slot."""

    id: int
    held: tuple[ChatMessage, ...] = ()
    """The messages the slot's KV cache was last computed for (reply included)."""
    busy: int = 0
    """Requests sent to it and not finished."""
    used: int = 0
    """Order of last use (a counter, so ties cannot happen)."""
    conversation: bool = False
    """It holds a conversation (more than the warmed system prompt)."""


def shared_messages(held: Sequence[ChatMessage], messages: Sequence[ChatMessage]) -> int:
    """How many leading messages the two lists have in common."""
    n = 0
    for a, b in zip(held, messages, strict=False):
        if a != b:
            break
        n += 1
    return n


class SlotTable:
    """Conversation → slot pinning for a server with ``ids`` slots."""

    def __init__(self, ids: Sequence[int]) -> None:
        self._clock = itertools.count(1)
        self.slots = {i: Slot(i) for i in ids}

    def __len__(self) -> int:
        return len(self.slots)

    def reset(self, ids: Sequence[int] | None = None) -> None:
        """Forget what the slots held (the server restarted)."""
        self.slots = {i: Slot(i) for i in (self.slots if ids is None else ids)}

    def warmed(self, slot: int, messages: Sequence[ChatMessage]) -> None:
        """``slot`` holds ``messages`` (the system prompt) but no conversation."""
        if slot in self.slots:
            s = self.slots[slot]
            s.held, s.conversation = tuple(messages), False

    def acquire(self, messages: Sequence[ChatMessage]) -> tuple[int, int]:
        """The slot for ``messages`` and how many of them it already holds; the caller
        must :meth:`release` it."""
        best = max(self.slots.values(),
                   key=lambda s: (shared_messages(s.held, messages), -s.busy, s.used))
        shared = shared_messages(best.held, messages)
        if not (best.conversation and shared >= 2):  # continues nothing: a new one
            best = min(self.slots.values(), key=lambda s: (s.busy > 0, s.conversation, s.used))
            shared = shared_messages(best.held, messages)
        best.busy += 1
        best.used = next(self._clock)
        return best.id, shared

    def release(self, slot: int, messages: Sequence[ChatMessage], reply: str | None) -> None:
        """The request on ``slot`` ended: the slot now holds ``messages`` and, when the
        reply finished, ``reply`` (a cut-off reply is only partly in the cache)."""
        s = self.slots.get(slot)
        if s is None:
            return
        s.busy = max(0, s.busy - 1)
        held = list(messages)
        if reply is not None:
            held.append(ChatMessage("assistant", reply.strip()))
        s.held = tuple(held)
        s.conversation = True
        s.used = next(self._clock)

    def describe(self) -> list[dict[str, object]]:
        """For ``info()``: each slot's id, messages held, whether busy."""
        return [{"id": s.id, "messages": len(s.held), "busy": s.busy > 0,
                 "conversation": s.conversation} for s in self.slots.values()]
