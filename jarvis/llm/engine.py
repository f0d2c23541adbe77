"""The synchronous core of the llama.cpp backend: one model, one context, one thread
at a time (llama.cpp contexts are not thread-safe; :class:`LlamaEngine` holds a lock).

Per request: format the chat with the GGUF's own template, tokenize, reuse the
longest cached prefix (the live context or a saved state from the context cache),
evaluate only the rest, stream tokens out, and stop within one token of a cancel.
After the reply has been delivered, the context is snapshotted into the cache so a
conversation that comes back later restores instead of re-evaluating.

The parts: :mod:`~jarvis.llm.loader` builds the model, :mod:`~jarvis.llm.prompt`
turns chats into tokens, :mod:`~jarvis.llm.kv_state` manages the KV state and the
cache; this module orchestrates them and runs the sampling loop.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jarvis.config import LlmSettings
from jarvis.errors import BackendClosedError, PromptTooLongError
from jarvis.llm.base import ChatMessage, FinishReason, GenerationOptions, GenerationStats
from jarvis.llm.cache import ContextCache
from jarvis.llm.kv_state import KvState
from jarvis.llm.loader import cache_fingerprint, load_model
from jarvis.llm.prompt import ChatPrompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Loaded:
    """What exists only while the model is loaded."""

    llm: Any
    lib: Any
    prompt: ChatPrompt
    kv: KvState


class LlamaEngine:
    """One llama.cpp model and context.

    Every public method that touches the model takes the engine lock, held for a whole
    generation. :meth:`prepare` only records a hint under a separate short lock: it is
    called on the event loop, which must never wait for a generation to finish.
    """

    def __init__(self, settings: LlmSettings, cache: ContextCache) -> None:
        self.settings = settings
        self.cache = cache
        self._lock = threading.Lock()
        self._hint_lock = threading.Lock()
        """Guards :attr:`_next_history` alone; never held while waiting for ``_lock``."""
        self._loaded: _Loaded | None = None
        self._system_prefix: tuple[int, ...] = ()
        self._next_history: list[ChatMessage] | None = None
        """What the next request is expected to start with (see :meth:`prepare`)."""
        self.offload: str = "not loaded"
        self.template_source = ""

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load the model, read its chat template, restore persisted cache entries."""
        with self._lock:
            if self._loaded is not None:
                return
            model = load_model(self.settings)
            self.offload, self.template_source = model.offload, model.template_source
            prompt = ChatPrompt(model.llm, model.template)
            self._system_prefix = prompt.system_prefix(self.settings.system_prompt)
            self.cache.fingerprint = cache_fingerprint(self.settings, model)
            self._loaded = _Loaded(model.llm, model.lib, prompt,
                                   KvState(model.llm, model.lib, self.cache))
            if self.cache.enabled:
                self.cache.load_persisted(kind="system")
                if self.cache.settings.persist_recent:
                    self.cache.load_persisted(
                        kind="conversation", limit=self.cache.settings.persist_recent
                    )

    def close(self) -> None:
        """Persist recent conversations (if configured) and free the model."""
        with self._lock:
            loaded = self._loaded
            if loaded is None:
                return
            try:
                with self._hint_lock:
                    self._next_history = None
                loaded.kv.persist_system_prefix(self._system_prefix)
                loaded.kv.persist_recent()
            finally:
                loaded.llm.close()
                self._loaded = None
                self.cache.close()

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def n_ctx(self) -> int:
        return int(self._require().llm.n_ctx())

    @property
    def system_prefix(self) -> tuple[int, ...]:
        """Tokens of the configured system prompt that every conversation starts with."""
        return self._system_prefix

    @property
    def kv(self) -> KvState:
        """The KV-state manager of the loaded model (for tests and benchmarks; it is
        not thread-safe, so use it only while no request runs)."""
        return self._require().kv

    # ------------------------------------------------------------------ requests

    def warmup(self, prefill_system: bool) -> float:
        """Make the first request fast; returns seconds spent.

        With ``prefill_system`` the system prompt's KV state is restored from the cache
        (or evaluated, then cached and persisted); otherwise one short generation runs
        so llama.cpp's buffers are allocated before the first user request.
        """
        t0 = time.perf_counter()
        with self._lock:
            loaded = self._require()
            llm = loaded.llm
            if prefill_system and self.cache.enabled and self._system_prefix:
                loaded.kv.prefill(self._system_prefix)
            if self.settings.warmup:
                probe = list(self._system_prefix[:1] or [llm.token_bos()])
                n_before = llm.n_tokens
                llm.eval(probe if n_before == 0 else [int(llm.input_ids[n_before - 1])])
                loaded.kv.truncate(n_before)
        return time.perf_counter() - t0

    def generate(
        self,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        emit: Callable[[str], None],
        done: Callable[[GenerationStats], None],
        cancel: threading.Event,
        t0: float,
    ) -> None:
        """Answer ``messages``: ``emit`` each text piece, then ``done`` with the stats.
        ``t0`` is the ``perf_counter`` time the request was made. Runs in a worker
        thread; housekeeping after ``done`` (cache snapshots) is off the critical path."""
        with self._lock:
            queue_s = time.perf_counter() - t0
            loaded = self._require()
            if cancel.is_set():
                done(GenerationStats(0, 0, 0, "cancelled", None,
                                     time.perf_counter() - t0, queue_s))
                return
            tokens = loaded.prompt.tokenize(messages)
            n_ctx = loaded.llm.n_ctx()
            if len(tokens) >= n_ctx:
                raise PromptTooLongError(
                    f"the prompt is {len(tokens)} tokens but the context window holds {n_ctx} "
                    f"(JARVIS_MODEL_CONTEXT_WINDOW={self.settings.context_window}): shorten the "
                    "system prompt or the history, or raise the window"
                )
            max_tokens = min(options.max_tokens or self.settings.max_tokens, n_ctx - len(tokens))
            temperature = (self.settings.temperature if options.temperature is None
                           else options.temperature)
            stages: dict[str, float] = {}
            t_prep = time.perf_counter()
            cached = loaded.kv.reuse_prefix(tokens, stages)
            stats, reply = self._stream(loaded, tokens, cached, max_tokens, temperature,
                                        options.grammar, emit, cancel, t0, t_prep, queue_s,
                                        stages)
            if stats.finish_reason == "stop":  # the conversation will go on from here
                with self._hint_lock:
                    self._next_history = [*messages, ChatMessage("assistant", reply)]
            done(stats)

    def _stream(
        self, loaded: _Loaded, tokens: list[int], cached: int, max_tokens: int,
        temperature: float, grammar: Any, emit: Callable[[str], None], cancel: threading.Event,
        t0: float, t_prep: float, queue_s: float, stages: dict[str, float],
    ) -> tuple[GenerationStats, str]:
        """Sample the reply to ``tokens`` (the first ``cached`` already in the context)
        and stream its text; returns the stats and the whole reply."""
        s = self.settings
        llm, lib = loaded.llm, loaded.lib
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish: FinishReason = "length"
        ttft: float | None = None
        t_first = None
        generated: list[int] = []
        pieces: list[str] = []
        t_eval = time.perf_counter()
        gen = llm.generate(tokens, top_k=s.top_k, top_p=s.top_p, temp=temperature,
                           repeat_penalty=s.repeat_penalty, min_p=0.05, reset=True,
                           grammar=grammar)
        try:
            for token in gen:
                if t_first is None:
                    t_first = time.perf_counter()
                    stages["prompt_eval"] = t_first - t_eval
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if lib.llama_vocab_is_eog(vocab, token) or lib.llama_vocab_is_control(vocab, token):
                    finish = "stop"
                    break
                generated.append(token)
                piece = decoder.decode(llm.detokenize([token]))
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces.append(piece)
                    emit(piece)
                if len(generated) >= max_tokens:
                    break
        finally:
            gen.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            emit(tail)
        if finish != "cancelled":
            loaded.prompt.remember_reply("".join(pieces), generated)
        now = time.perf_counter()
        stages["prepare"] = t_eval - t_prep
        if t_first is not None:
            stages["generation"] = now - t_first
        stats = GenerationStats(
            prompt_tokens=len(tokens),
            cached_tokens=cached,
            completion_tokens=len(generated),
            finish_reason=finish,
            ttft_s=ttft,
            total_s=now - t0,
            queue_s=queue_s,
            stages=stages,
            cache_hit=(cached > 0) if self.cache.enabled else None,
        )
        return stats, "".join(pieces)

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        """Hint that the next request will start with ``history`` (e.g. a conversation
        whose oldest turns were just dropped); :meth:`housekeeping` evaluates it.

        Safe from any thread and never blocks on a running generation: it takes only
        the short hint lock, not the engine lock (the backend calls it on the event loop).
        """
        with self._hint_lock:
            self._next_history = list(history)

    def housekeeping(self) -> None:
        """Work that makes the *next* request faster, done while the model is idle
        (the caller runs it only when no request is waiting):

        1. evaluate the expected start of the next prompt: the last reply's
           conversation up to where the next user turn's words begin (or the history
           given to :meth:`prepare`), restoring the best cached prefix first;
        2. snapshot the conversation into the cache, so switching back restores it;
        3. make sure the system prompt's state is on disk for the next start.
        """
        with self._lock:
            loaded = self._loaded
            if loaded is None or not self.cache.enabled:
                return
            with self._hint_lock:
                history, self._next_history = self._next_history, None
            try:
                if history:
                    target = loaded.prompt.shared_start(history)
                    if 0 < len(target) < loaded.llm.n_ctx():
                        loaded.kv.evaluate(target)
                loaded.kv.store_live()
                loaded.kv.persist_system_prefix(self._system_prefix)
            except Exception:  # only speed is at stake: log and carry on
                log.exception("context cache: housekeeping after a turn failed")

    def _require(self) -> _Loaded:
        if self._loaded is None:
            raise BackendClosedError("the llama.cpp backend is not started (or already closed)")
        return self._loaded
