"""Every delivery of a command, from its arrival until it is answered and acknowledged.

The broker may deliver one command several times: again after a reconnect (the
``dup`` flag), to the next process after a crash, or twice because its publisher sent
it twice. :class:`Inbox` gives each command one :class:`Work`, however many times it
arrives, and the bridge answers the work once:

1. :meth:`Inbox.receive` names the delivery (:func:`~jarvis.home.ledger.delivery_key`).
   A delivery of a command being answered joins its work; a redelivery of a command
   already answered (found in the :class:`~jarvis.home.ledger.Ledger`) is acknowledged
   at once and not answered again, and so is one this process has answered (its answer
   is in the outbox, sent once reconnected); anything else is new work.
2. :meth:`Inbox.finish` returns the receipt for the work's answer: once the broker has
   the answer, the work is recorded as answered in the ledger and every delivery of the
   command is acknowledged; an answer given up (Jarvis stopped first) is forgotten again, so the
   command is answered when the broker delivers it again.

Nothing is acknowledged before it is answered; so work that never finishes (Jarvis
stops or dies first) is delivered again to whoever holds the session next.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jarvis.home.ledger import Entry, Ledger, delivery_key
from jarvis.home.schema import Command
from jarvis.home.transport import Connection, Received

log = logging.getLogger(__name__)

_ANSWERED_HERE = 10_000
"""Keys of answered commands remembered in memory (a redelivery comes within seconds)."""


@dataclass(frozen=True)
class Delivery:
    """One arrival of a message, on the connection that must acknowledge it."""

    conn: Connection
    message: Received

    def ack(self) -> None:
        try:
            self.conn.ack(self.message)
        except Exception as exc:  # the connection is gone: the broker delivers it again
            log.debug("MQTT: acknowledging %s failed: %s", self.message.topic, exc)


@dataclass(eq=False)
class Work:
    """One command being answered, with every delivery of it."""

    topic: str
    qos: int
    received_at: float
    """``time.perf_counter()`` at its first arrival."""
    deliveries: list[Delivery] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    """The ledger keys of its deliveries (a duplicate published anew has its own)."""
    entry: Entry | None = None
    """What the ledger knew of it when it was delivered again (acted, not answered)."""
    command: Command | None = None
    task: asyncio.Task[None] | None = None
    acted: bool = False
    """Device commands were published for it: it is never abandoned half done."""
    cancel_requested: bool = False
    finished: bool = False
    """Answered (or deliberately left unanswered): it takes no other answer."""

    def ack(self) -> None:
        for delivery in self.deliveries:
            delivery.ack()


class Inbox:
    """The commands being answered, by delivery key, and the ledger of answered ones."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger or Ledger()
        self._answered_here: OrderedDict[str, None] = OrderedDict()
        """Keys this process answered (most recent last): their answers are in its
        outbox, so a redelivery after a reconnect is only acknowledged."""
        self._open: dict[str, Work] = {}
        self._qos0 = 0
        self.redelivered = 0
        """Deliveries flagged ``dup`` by the broker."""
        self.duplicates = 0
        """Deliveries of a command already being answered or already answered."""

    def receive(self, conn: Connection, message: Received, received_at: float) -> Work | None:
        delivery = Delivery(conn, message)
        if message.qos:
            key = delivery_key(message.topic, message.payload, message.mid)
        else:  # never delivered again, and every one has packet id 0: each is new
            self._qos0 += 1
            key = f"qos0:{self._qos0}"
        if message.dup:
            self.redelivered += 1
        work = self._open.get(key)
        if work is not None:
            work.deliveries.append(delivery)
            self.duplicates += 1
            return None
        entry = self.ledger.get(key) if message.dup and message.qos else None
        if (entry is not None and entry.answered) or key in self._answered_here:
            # The broker has its answer (the ledger says so), or this process's outbox
            # does and sends it once reconnected: acknowledged, not answered again.
            self.duplicates += 1
            log.debug("MQTT: %s was answered before; acknowledged again", message.topic)
            delivery.ack()
            return None
        work = Work(message.topic, message.qos, received_at, [delivery], {key}, entry)
        self._open[key] = work
        return work

    def merge(self, work: Work, into: Work) -> None:
        """``work`` is the same command as ``into`` (an ask with the same id, still
        being answered): one answer acknowledges both."""
        self.duplicates += 1
        into.deliveries.extend(work.deliveries)
        into.keys |= work.keys
        for key in work.keys:
            self._open[key] = into
        work.finished = True

    def acted(self, work: Work, actions: Sequence[Mapping[str, Any]], text: str) -> None:
        """Device commands are about to be published for ``work``: recorded first, so
        that they are never published twice for it."""
        work.acted = True
        if work.qos:
            self.ledger.acted(work.keys, actions, text)

    def finish(self, work: Work) -> Callable[[bool], None] | None:
        """``work`` is answered now: the receipt to attach to its answer (None when it
        was already finished: a second answer must not go out)."""
        if work.finished:
            return None
        work.finished = True
        self._close(work)
        for key in work.keys:
            self._answered_here[key] = None
            if len(self._answered_here) > _ANSWERED_HERE:
                self._answered_here.popitem(last=False)

        def receipt(delivered: bool) -> None:
            # Recorded once the broker has the answer, not before: a process killed in
            # between (several answers finish at once when the model batches them)
            # leaves the command to be answered again by the next one, not lost.
            if delivered:
                if work.qos:
                    self.ledger.answered(work.keys)
                work.ack()
            else:
                for key in work.keys:
                    self._answered_here.pop(key, None)
                self.ledger.forget(work.keys)

        return receipt

    def ignore(self, work: Work) -> None:
        """``work`` needs no answer (not for this Jarvis): acknowledged now."""
        if not work.finished:
            work.finished = True
            self._close(work)
            work.ack()

    def abandon(self, work: Work) -> None:
        """``work`` stops unanswered (Jarvis is stopping): it stays unacknowledged, so
        the broker delivers it again to the next process."""
        work.finished = True
        self._close(work)

    def open_work(self) -> list[Work]:
        """The commands being answered, each once, in order of arrival."""
        seen: dict[int, Work] = {}
        for work in self._open.values():
            seen.setdefault(id(work), work)
        return sorted(seen.values(), key=lambda w: w.received_at)

    def _close(self, work: Work) -> None:
        for key in work.keys:
            if self._open.get(key) is work:
                del self._open[key]
