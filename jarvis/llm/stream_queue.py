"""The hand-over between a backend's producer (a worker thread, an HTTP reader task)
and the consumer of a token stream: text pieces, then :class:`Done` with the stats or
:class:`Failed` with the error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from jarvis.llm.base import GenerationStats


@dataclass(frozen=True)
class Done:
    stats: GenerationStats


@dataclass(frozen=True)
class Failed:
    error: BaseException


PieceQueue = asyncio.Queue["str | Done | Failed"]


async def pieces(queue: PieceQueue, on_done: Callable[[GenerationStats], None]
                 ) -> AsyncIterator[str]:
    """Yield the pieces in ``queue`` until :class:`Done` (``on_done`` gets its stats)
    or :class:`Failed` (its error is raised)."""
    while True:
        item = await queue.get()
        if isinstance(item, Done):
            on_done(item.stats)
            return
        if isinstance(item, Failed):
            raise item.error
        yield item
