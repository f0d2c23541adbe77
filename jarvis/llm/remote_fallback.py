"""Choosing the backend, and ``JARVIS_LLM_FALLBACK=local``: the in-process model
answers while the LLM server is unreachable.

:class:`FallbackBackend` sends each request to the server while it is reachable. A
request the server cannot take (refused, timed out, gone before the first piece of the
reply) is answered by the local model instead, and so is every request while the
server is known to be down; the remote backend probes it with backoff meanwhile and
the server answers again as soon as it is back. A reply the server breaks off midway
fails that turn (what was said cannot be unsaid). ``answered_by`` says which one
answered the last request (``jarvis ask --json`` shows it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from jarvis.config import CacheSettings, LlmSettings
from jarvis.llm.base import ChatMessage, GenerationOptions, GenerationStats, TokenStream
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.llm.remote import RemoteBackend, ServerCache
from jarvis.llm.remote_protocol import ServerUnreachableError

log = logging.getLogger(__name__)


class FallbackStream:
    """One reply: from the server, or from the local model when the server cannot."""

    def __init__(self, backend: FallbackBackend, messages: Sequence[ChatMessage],
                 options: GenerationOptions | None) -> None:
        self._backend = backend
        self._messages = list(messages)
        self._options = options
        self._current: TokenStream | None = None
        self._cancelled = False
        self.answered_by: str | None = None
        self.stats: GenerationStats | None = None

    def cancel(self) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        remote, local = self._backend.remote, self._backend.local
        if remote.available:
            stream = self._current = remote.stream_chat(self._messages, self._options)
            pieces = stream.__aiter__()
            try:
                first = await pieces.__anext__()
            except StopAsyncIteration:
                first = None
            except ServerUnreachableError as exc:
                log.warning("%s; the in-process model answers", exc)
            else:
                self._answered("remote")
                if first is not None:
                    yield first
                    async for piece in pieces:
                        yield piece
                self.stats = stream.stats
                return
        if self._cancelled:
            return
        fallback = self._current = local.stream_chat(self._messages, self._options)
        self._answered("local")
        async for piece in fallback:
            yield piece
        self.stats = fallback.stats

    def _answered(self, by: str) -> None:
        self.answered_by = self._backend.answered_by = by


class FallbackBackend:
    """The LLM server, with the in-process model standing in while it is unreachable."""

    def __init__(self, remote: RemoteBackend, local: LlamaCppBackend) -> None:
        self.remote = remote
        self.local = local
        self.answered_by: str | None = None
        """``remote`` or ``local``: who answered the last request."""

    @property
    def cache(self) -> ServerCache:
        return self.remote.cache

    async def start(self) -> None:
        """Load the local model; find the server, or note that it is away (then it is
        probed in the background and the local model answers meanwhile)."""
        await self.local.start()
        try:
            await self.remote.start()
        except ServerUnreachableError as exc:
            log.warning("%s; the in-process model answers until the server is back", exc)
            self.remote._lost(exc)

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> FallbackStream:
        return FallbackStream(self, messages, options)

    async def complete(self, messages: Sequence[ChatMessage],
                       options: GenerationOptions | None = None) -> tuple[str, GenerationStats]:
        """The whole reply and its stats (convenience for non-streaming callers)."""
        stream = self.stream_chat(messages, options)
        text = "".join([piece async for piece in stream])
        assert stream.stats is not None
        return text, stream.stats

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        """Only the local engine prepares (and only when it is the one answering: its
        work would be wasted CPU on this small machine otherwise)."""
        if self.answered_by == "local":
            self.local.prepare(history)

    def info(self) -> dict[str, Any]:
        return {**self.remote.info(), "fallback": "local", "answered_by": self.answered_by,
                "local": self.local.info()}


Backend = LlamaCppBackend | RemoteBackend | FallbackBackend
"""Every backend the assistant may be built on."""


def select_backend(llm: LlmSettings, cache: CacheSettings, *,
                   prefill_system: bool = True) -> Backend:
    """The in-process engine (``JARVIS_LLM_URL`` empty), the server, or the server with
    the in-process model as its fallback (``JARVIS_LLM_FALLBACK=local``)."""
    if not llm.url:
        return LlamaCppBackend(llm, cache, prefill_system=prefill_system)
    remote = RemoteBackend(llm, prefill_system=prefill_system)
    if llm.fallback == "local":
        return FallbackBackend(remote, LlamaCppBackend(llm, cache,
                                                       prefill_system=prefill_system))
    return remote
