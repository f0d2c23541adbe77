"""The synchronous core of the llama.cpp backend: one model, one context with
``JARVIS_PARALLEL`` sequences, and one worker thread that serves every request in
continuous batches (llama.cpp contexts are not thread-safe: only the worker touches it).

Per request: format the chat with the GGUF's own template, tokenize, take a free
sequence (the one already holding the longest part of this prompt), reuse the longest
cached prefix there (what it holds, or a saved state from the context cache), then
evaluate the rest. Each step puts the prompt tokens and the next token of *every*
active request into one ``llama_decode``; a request that arrives mid-generation joins
at the next step; each samples with its own settings and grammar; a finished or
cancelled request frees its sequence at once. More requests than sequences wait in
arrival order, their wait reported as ``queue``.

When no request is active or waiting, the worker does the idle work that makes the
*next* request faster, in small pieces so that a request never waits for more than one
of them: evaluate the expected start of the next prompt (16 tokens a step), snapshot
sequences into the context cache, persist the system prompt's state.

The parts: :mod:`~jarvis.llm.loader` builds the model and context,
:mod:`~jarvis.llm.prompt` turns chats into tokens, :mod:`~jarvis.llm.kv_state` manages
the sequences and the cache, :mod:`~jarvis.llm.sampling` the per-request samplers,
:mod:`~jarvis.llm.serving` a request's progress; this module schedules them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from jarvis.config import LlmSettings
from jarvis.errors import BackendClosedError, BackendError, PromptTooLongError
from jarvis.llm.base import ChatMessage, FinishReason
from jarvis.llm.batch import Batch
from jarvis.llm.cache import ContextCache
from jarvis.llm.kv_state import KvStates, SeqKv
from jarvis.llm.loader import Context, cache_fingerprint, create_context, load_model
from jarvis.llm.prompt import ChatPrompt
from jarvis.llm.sampling import Sampler, SamplingParams
from jarvis.llm.serving import Active, Request, cancelled_at_start, deliver

log = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_CHUNK = 16
"""Tokens of idle pre-evaluation per step: a request arriving meanwhile waits for at
most this many (≈0.1 s on 2 cores with the starter model)."""
PROMPT_SLICE = 64
"""Prompt tokens per step while other requests are generating, so their streams keep
flowing while a long new prompt is evaluated."""


@dataclass(frozen=True)
class _Loaded:
    """What exists only while the model is loaded."""

    llm: Any
    lib: Any
    context: Context
    prompt: ChatPrompt
    kv: KvStates
    batch: Batch


class LlamaEngine:
    """One llama.cpp model and context, served by one worker thread.

    :meth:`submit` and :meth:`prepare` only queue work and return at once (they are
    called on the event loop); everything that touches the model runs on the worker.
    """

    def __init__(self, settings: LlmSettings, cache: ContextCache) -> None:
        self.settings = settings
        self.cache = cache
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._hint: list[ChatMessage] | None = None
        """What the next request is expected to start with (see :meth:`prepare`)."""
        self._idle_done = True
        """No idle work is left until a request ends or a hint arrives."""
        self._closing = False
        self._thread: threading.Thread | None = None
        # Touched by the worker thread only:
        self._loaded: _Loaded | None = None
        self._active: list[Active] = []
        self._background: tuple[SeqKv, list[int]] | None = None
        self._system_prefix: tuple[int, ...] = ()
        self.offload: str = "not loaded"
        self.template_source = ""
        self.window = settings.context_window
        """Tokens each sequence (each conversation) can hold."""
        self.idle_tokens = 0
        """Tokens evaluated ahead of requests by the idle work since load."""

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load the model and its context, restore persisted cache entries, start the
        worker."""
        if self._loaded is not None:
            return
        model = load_model(self.settings)
        try:
            context = create_context(model, self.settings)
        except BaseException:
            model.llm.close()
            raise
        self.offload, self.template_source = model.offload, model.template_source
        self.window = context.window
        prompt = ChatPrompt(model.llm, model.template)
        self._system_prefix = prompt.system_prefix(self.settings.system_prompt)
        self.cache.fingerprint = cache_fingerprint(self.settings, model, context.window)
        kv = KvStates(context.ctx, model.lib, self.cache, context.n_seq)
        batch = Batch(model.lib, max(self.settings.n_batch, context.n_seq))
        self._loaded = _Loaded(model.llm, model.lib, context, prompt, kv, batch)
        if self.cache.enabled:
            self.cache.load_persisted(kind="system")
            if self.cache.settings.persist_recent:
                self.cache.load_persisted(kind="conversation",
                                          limit=self.cache.settings.persist_recent)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker (waiting and active requests end: failed or cancelled),
        persist the system prompt and recent conversations (if configured), free the
        model."""
        loaded = self._loaded
        if loaded is None:
            return
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            seq = loaded.kv.system_to_persist(self._system_prefix, loaded.kv.seqs)
            if seq is not None:
                loaded.kv.persist_system_prefix(seq, self._system_prefix)
            loaded.kv.persist_recent()
        finally:
            loaded.batch.close()
            loaded.context.close()
            loaded.llm.close()
            self._loaded = None
            self.cache.close()

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def n_ctx(self) -> int:
        """Tokens one conversation can hold (the context of one sequence)."""
        self._require()
        return self.window

    @property
    def n_seq(self) -> int:
        """Sequences decoded together (``JARVIS_PARALLEL``)."""
        return self._require().context.n_seq

    @property
    def system_prefix(self) -> tuple[int, ...]:
        """Tokens of the configured system prompt that every conversation starts with."""
        return self._system_prefix

    @property
    def kv(self) -> KvStates:
        """The sequences of the loaded context; use them only inside :meth:`call`."""
        return self._require().kv

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the worker thread between steps and return its result (for
        warm-up, tests and benchmarks that need the model to themselves)."""
        self._require()
        future: Future[T] = Future()
        with self._cv:
            if self._closing:
                raise BackendClosedError("the llama.cpp backend is closing")
            self._calls.append((fn, future))
            self._cv.notify_all()
        return future.result(timeout)

    # ------------------------------------------------------------------ requests

    def warmup(self, prefill_system: bool) -> float:
        """Make the first request fast; returns seconds spent.

        With ``prefill_system`` the system prompt's KV state is restored from the cache
        (or evaluated, then cached and persisted) into the first sequence; otherwise (and
        also then) one token is decoded so llama.cpp's buffers are allocated before the
        first user request.
        """
        t0 = time.perf_counter()
        self.call(lambda: self._warmup(prefill_system))
        return time.perf_counter() - t0

    def submit(self, request: Request) -> None:
        """Queue ``request``; it is answered through its callbacks. Never blocks."""
        with self._cv:
            if self._closing or self._loaded is None:
                raise BackendClosedError(
                    "the llama.cpp backend is not started (or already closed)")
            self._waiting.append(request)
            self._cv.notify_all()

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        """Hint that the next request will start with ``history`` (e.g. a conversation
        whose oldest turns were just dropped); the idle work evaluates it."""
        with self._cv:
            self._hint = list(history)
            self._idle_done = False
            self._cv.notify_all()

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        loaded = self._require()
        while True:
            with self._cv:
                while not (self._closing or self._calls or self._waiting or self._active
                           or not self._idle_done):
                    self._cv.wait()
                if self._closing:
                    break
                cancelled = [r for r in self._waiting if r.cancel.is_set()]
                for request in cancelled:
                    self._waiting.remove(request)
                calls = list(self._calls)
                self._calls.clear()
                n_free = loaded.context.n_seq - len(self._active)
                admitted = [self._waiting.popleft()
                            for _ in range(min(n_free, len(self._waiting)))]
                waiting = bool(self._waiting)
            for request in cancelled:
                deliver(request, cancelled_at_start(time.perf_counter() - request.t0))
            for fn, future in calls:
                self._run_call(fn, future)
            try:
                for request in admitted:
                    self._admit(loaded, request)
                if self._active:
                    self._step(loaded)
                elif not waiting and not calls and not self._idle_step(loaded):
                    with self._cv:
                        self._idle_done = self._hint is None
            except Exception as exc:  # a bug must not stop the engine: fail what it hit
                log.exception("llama.cpp engine: a step failed; failing its %d requests",
                              len(self._active))
                for active in list(self._active):
                    active.seq.clear()
                    self._fail(active, BackendError(f"the engine failed: {exc}"))
                self._background = None
        self._shut_down()

    @staticmethod
    def _run_call(fn: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def _shut_down(self) -> None:
        """End what is still queued or running (the worker is about to exit)."""
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
            calls, self._calls = list(self._calls), deque()
        closed = BackendClosedError("the llama.cpp backend closed")
        for request in waiting:
            deliver(request, error=closed)
        for _, future in calls:
            future.set_exception(closed)
        for active in list(self._active):
            self._finish(active, "cancelled")

    def _admit(self, loaded: _Loaded, request: Request) -> None:
        """Give ``request`` a sequence, reuse what it can of its prompt there."""
        t_admit = time.perf_counter()
        queue_s = t_admit - request.t0
        try:
            if request.cancel.is_set():
                deliver(request, cancelled_at_start(queue_s))
                return
            tokens = loaded.prompt.tokenize(request.messages)
            if len(tokens) >= self.window:
                raise PromptTooLongError(
                    f"the prompt is {len(tokens)} tokens but the context window holds "
                    f"{self.window} (JARVIS_MODEL_CONTEXT_WINDOW="
                    f"{self.settings.context_window}): shorten the system prompt or the "
                    "history, or raise the window")
            seq = self._choose_seq(loaded, tokens)
            if self._background is not None and self._background[0] is seq:
                done, target = len(seq), len(self._background[1])
                log.debug("a request takes the sequence of the idle pre-evaluation "
                          "(%d of %d tokens done)", done, target)
                self._background = None
            stages: dict[str, float] = {}
            cached = seq.reuse_prefix(tokens, stages)
            seq.used_at = time.monotonic()
            options, s = request.options, self.settings
            params = SamplingParams(
                temperature=s.temperature if options.temperature is None
                else options.temperature,
                top_k=s.top_k, top_p=s.top_p, repeat_penalty=s.repeat_penalty,
                seed=s.seed if s.seed >= 0 else loaded.lib.LLAMA_DEFAULT_SEED)
            sampler = Sampler(loaded.lib, loaded.llm._model, loaded.llm.n_vocab(), params,
                              options.grammar)
        except Exception as exc:  # this request fails; the others go on
            deliver(request, error=exc)
            return
        vocab = loaded.llm._model.vocab
        lib = loaded.lib
        max_tokens = min(request.options.max_tokens or self.settings.max_tokens,
                         self.window - len(tokens))
        self._active.append(Active(
            request, seq, len(tokens), cached, tokens[cached:], max_tokens, sampler,
            detokenize=lambda token: loaded.llm.detokenize([token]),
            is_end=lambda token: bool(lib.llama_vocab_is_eog(vocab, token)
                                      or lib.llama_vocab_is_control(vocab, token)),
            queue_s=queue_s, stages=stages, t_admit=t_admit))

    def _choose_seq(self, loaded: _Loaded, tokens: list[int]) -> SeqKv:
        """The free sequence holding most of ``tokens``; among equals, the one used
        longest ago (its conversation is the least likely to come back first)."""
        busy = {id(a.seq) for a in self._active}
        free = [seq for seq in loaded.kv.seqs if id(seq) not in busy]
        return max(free, key=lambda seq: (seq.shared_with(tokens), -seq.used_at))

    def _step(self, loaded: _Loaded) -> None:
        """One ``llama_decode`` for every active request: the next token of those
        generating, and prompt tokens of those still evaluating (first come first)."""
        generating = any(a.next_token is not None for a in self._active)
        budget = loaded.batch.capacity - len(self._active)
        budget = min(budget, PROMPT_SLICE) if generating else budget
        plan: list[tuple[Active, list[int], bool]] = []
        for active in self._active:
            if active.next_token is not None:
                plan.append((active, [active.next_token], True))
            elif budget > 0:
                chunk = active.pending[:budget]
                plan.append((active, chunk, len(chunk) == len(active.pending)))
                budget -= len(chunk)
        # In sequence order: llama.cpp splits a batch over separate KV streams into
        # micro-batches of consecutive sequence ids, so any other order costs one
        # graph evaluation per sequence instead of one for all.
        plan.sort(key=lambda part: part[0].seq.seq)
        batch = loaded.batch
        batch.clear()
        parts: list[tuple[Active, list[int], int | None]] = []
        for active, chunk, wants_logits in plan:
            at = 0
            for j, token in enumerate(chunk):
                at = batch.add(token, len(active.seq) + j, active.seq.seq,
                               wants_logits and j == len(chunk) - 1)
            parts.append((active, chunk, at if wants_logits else None))
        try:
            batch.decode(loaded.context.ctx)
        except BackendError as exc:
            log.error("%s; failing the %d requests in it", exc, len(parts))
            for active, _, _ in parts:
                active.seq.clear()
                self._fail(active, exc)
            return
        for active, chunk, logits_at in parts:
            active.seq.appended(chunk)
            if active.next_token is not None:
                active.next_token = None
            else:
                del active.pending[:len(chunk)]
            if logits_at is None:
                continue
            try:
                reason = active.take(active.sampler.sample(loaded.context.ctx, logits_at))
            except Exception as exc:  # only this request fails
                log.warning("a request failed while sampling: %s", exc)
                self._fail(active, exc)
                continue
            if reason is not None:
                self._finish(active, reason)
        for active in list(self._active):
            if active.request.cancel.is_set():
                self._finish(active, "cancelled")

    def _finish(self, active: Active, reason: FinishReason) -> None:
        """End ``active``: deliver its stats, free its sequence (which keeps its KV for
        the conversation's next turn)."""
        loaded = self._require()
        self._active.remove(active)
        active.sampler.close()
        active.seq.used_at = time.monotonic()
        try:
            stats = active.finish(reason, self.cache.enabled)
        except Exception as exc:  # emitting the last piece failed: the consumer is gone
            deliver(active.request, error=exc)
            return
        if reason != "cancelled":
            loaded.prompt.remember_reply(active.reply, active.generated)
        with self._cv:
            if reason == "stop":  # the conversation will go on from here
                self._hint = [*active.request.messages, ChatMessage("assistant", active.reply)]
            self._idle_done = False
        deliver(active.request, stats)

    def _fail(self, active: Active, error: BaseException) -> None:
        self._active.remove(active)
        active.sampler.close()
        deliver(active.request, error=error)

    # ------------------------------------------------------------------ idle work

    def _idle_step(self, loaded: _Loaded) -> bool:
        """Do one small piece of idle work; False when there is none left.

        1. a hint (the last reply's conversation, or :meth:`prepare`'s history): put the
           start of the next prompt in a sequence, restoring the best cached prefix;
        2. evaluate that start, :data:`IDLE_CHUNK` tokens at a time;
        3. snapshot one sequence the cache does not cover yet;
        4. make sure the system prompt's state is on disk for the next start.
        """
        if not self.cache.enabled:
            with self._cv:
                self._hint = None
            return False
        try:
            with self._cv:
                history, self._hint = self._hint, None
            if history:
                self._plan_background(loaded, history)
                return True
            if self._background is not None:
                self._continue_background(loaded)
                return True
            for seq in sorted(loaded.kv.seqs, key=lambda s: -s.used_at):
                if not seq.saved and seq.store_live():
                    return True
            holder = loaded.kv.system_to_persist(self._system_prefix, loaded.kv.seqs)
            if holder is not None:
                loaded.kv.persist_system_prefix(holder, self._system_prefix)
                return True
        except Exception:  # only speed is at stake: log and carry on
            log.exception("context cache: idle work after a turn failed")
            self._background = None
            return False
        self.cache.release_memory()
        return False

    def _plan_background(self, loaded: _Loaded, history: list[ChatMessage]) -> None:
        target = loaded.prompt.shared_start(history)
        if not 0 < len(target) < self.window:
            return
        seq = self._choose_seq(loaded, target)
        seq.reuse_prefix([*target, 0], {}, count=False)
        self._background = (seq, target)

    def _continue_background(self, loaded: _Loaded) -> None:
        assert self._background is not None
        seq, target = self._background
        if seq.shared_with(target) != len(seq) or len(seq) >= len(target):
            self._background = None  # done, or the sequence went to something else
            return
        chunk = target[len(seq):len(seq) + IDLE_CHUNK]
        self._decode_into(loaded, seq, chunk)
        self.idle_tokens += len(chunk)

    # ------------------------------------------------------------------ warm-up

    def _warmup(self, prefill_system: bool) -> None:
        loaded = self._require()
        seq = loaded.kv.seqs[0]
        prefix = self._system_prefix
        if prefill_system and self.cache.enabled and prefix:
            match = self.cache.lookup(prefix)
            if match is None or match.length != len(prefix) or not seq.restore(
                    match.entry.tokens, match.entry.payload, len(prefix)):
                seq.clear()
                self._decode_into(loaded, seq, list(prefix))
                loaded.kv.save_system(seq, prefix)
            seq.used_at = time.monotonic()
        if self.settings.warmup:
            n_before = len(seq)
            probe = [seq.tokens[-1] if n_before else loaded.llm.token_bos()]
            self._decode_into(loaded, seq, probe, logits=True)
            seq.truncate(n_before)

    def _decode_into(self, loaded: _Loaded, seq: SeqKv, tokens: list[int], *,
                     logits: bool = False) -> None:
        """Evaluate ``tokens`` after what ``seq`` holds, a batch at a time (nothing else
        in the batch: for warm-up and idle work)."""
        batch = loaded.batch
        for start in range(0, len(tokens), batch.capacity):
            chunk = tokens[start:start + batch.capacity]
            batch.clear()
            for j, token in enumerate(chunk):
                batch.add(token, len(seq) + j, seq.seq, logits and j == len(chunk) - 1)
            try:
                batch.decode(loaded.context.ctx)
            except BackendError:
                seq.clear()
                raise
            seq.appended(chunk)

    def _require(self) -> _Loaded:
        if self._loaded is None:
            raise BackendClosedError("the llama.cpp backend is not started (or already closed)")
        return self._loaded
