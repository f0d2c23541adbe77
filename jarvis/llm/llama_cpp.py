"""The llama.cpp backend for asyncio: :class:`LlamaCppBackend` hands requests to the
:class:`~jarvis.llm.engine.LlamaEngine`, whose worker thread answers up to
``JARVIS_PARALLEL`` of them at once in continuous batches (the rest wait in arrival
order), and streams their tokens to the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from jarvis.config import CacheSettings, LlmSettings
from jarvis.errors import BackendClosedError
from jarvis.llm.base import ChatMessage, GenerationOptions, GenerationStats
from jarvis.llm.cache import ContextCache
from jarvis.llm.engine import LlamaEngine
from jarvis.llm.serving import Request
from jarvis.llm.stream_queue import Done, Failed, PieceQueue, pieces

log = logging.getLogger(__name__)


class LlamaTokenStream:
    """Text pieces of one reply; see :class:`jarvis.llm.base.TokenStream`."""

    def __init__(
        self, backend: LlamaCppBackend, messages: Sequence[ChatMessage], options: GenerationOptions
    ) -> None:
        self._backend = backend
        self._messages = list(messages)
        self._options = options
        self._cancel = threading.Event()
        self._t0 = time.perf_counter()
        self._consumed = False
        self.stats: GenerationStats | None = None

    def _set_stats(self, stats: GenerationStats) -> None:
        self.stats = stats

    def cancel(self) -> None:
        """Stop generating; the worker notices before the next token."""
        self._cancel.set()

    def __aiter__(self) -> AsyncIterator[str]:
        if self._consumed:
            raise RuntimeError("a token stream can be iterated only once")
        self._consumed = True
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: PieceQueue = asyncio.Queue()

        def emit(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def done(stats: GenerationStats) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, Done(stats))

        self._backend._submit(self._messages, self._options, emit, done, self._cancel,
                              self._t0, queue)
        try:
            async for piece in pieces(queue, self._set_stats):
                yield piece
        finally:
            # Early exit, an exception or task cancellation: stop the worker promptly.
            self._cancel.set()


class LlamaCppBackend:
    """Local GGUF model through llama-cpp-python, with the prefix context cache.

    ``prefill_system`` evaluates (or restores) the system prompt during ``start()``:
    right for a long-running assistant, pointless for a one-shot ``jarvis ask``.
    """

    def __init__(
        self,
        settings: LlmSettings,
        cache_settings: CacheSettings,
        *,
        prefill_system: bool = True,
    ) -> None:
        self.settings = settings
        self.cache = ContextCache(cache_settings)
        self.engine = LlamaEngine(settings, self.cache)
        self.prefill_system = prefill_system
        self._closed = False
        self.load_s = 0.0
        self.warmup_s = 0.0

    async def start(self) -> None:
        t = time.perf_counter()
        await asyncio.to_thread(self.engine.load)
        self.load_s = time.perf_counter() - t
        self.warmup_s = await asyncio.to_thread(self.engine.warmup, self.prefill_system)
        log.info("model %s ready: load %.2f s, warm-up %.2f s, %s",
                 self.settings.model_path.name, self.load_s, self.warmup_s, self.engine.offload)

    async def close(self) -> None:
        """Stop: streams still running end as cancelled, queued ones fail."""
        self._closed = True
        await asyncio.to_thread(self.engine.close)

    async def __aenter__(self) -> LlamaCppBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stream_chat(
        self, messages: Sequence[ChatMessage], options: GenerationOptions | None = None
    ) -> LlamaTokenStream:
        if self._closed:
            raise BackendClosedError("the llama.cpp backend is closed")
        if not messages:
            raise ValueError("stream_chat needs at least one message")
        options = options or GenerationOptions()
        if isinstance(options.grammar, str):  # GBNF text: compile it for llama.cpp
            options = replace(options, grammar=compile_gbnf(options.grammar))
        return LlamaTokenStream(self, messages, options)

    async def complete(
        self, messages: Sequence[ChatMessage], options: GenerationOptions | None = None
    ) -> tuple[str, GenerationStats]:
        """The whole reply and its stats (convenience for non-streaming callers)."""
        stream = self.stream_chat(messages, options)
        text = "".join([piece async for piece in stream])
        assert stream.stats is not None
        return text, stream.stats

    def _submit(self, messages: list[ChatMessage], options: GenerationOptions,
                emit: Any, done: Any, cancel: threading.Event, t0: float,
                queue: asyncio.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()

        def fail(exc: BaseException) -> None:  # delivered to the consumer, who re-raises it
            loop.call_soon_threadsafe(queue.put_nowait, Failed(exc))

        self.engine.submit(Request(messages, options, emit, done, fail, cancel, t0))

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        """The next request will start with ``history``: evaluate it while idle."""
        if self._closed:
            return
        self.engine.prepare(history)

    def info(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "backend": "llama.cpp",
            "model_path": str(self.settings.model_path),
            "context_window": engine.n_ctx if engine.loaded else self.settings.context_window,
            "parallel": engine.n_seq if engine.loaded else self.settings.parallel,
            "n_threads": self.settings.n_threads,
            "n_threads_batch": self.settings.n_threads_batch,
            "gpu": engine.offload,
            "chat_template": engine.template_source,
            "system_prompt_tokens": len(engine.system_prefix),
            "context_cache": self.cache.enabled,
            "cache_persistent": self.cache.persistent,
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
        }


def compile_gbnf(gbnf: str) -> Any:
    """GBNF text -> the ``llama_cpp.LlamaGrammar`` the engine samples with (a holder of
    the text: the sampler is built per request, so one object may serve many)."""
    from llama_cpp import llama_grammar

    return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)
