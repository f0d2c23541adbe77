"""The synchronous core of the llama.cpp backend: one model, one context, one thread
at a time (llama.cpp contexts are not thread-safe; :class:`LlamaEngine` holds a lock).

Per request: format the chat with the GGUF's own template, tokenize, reuse the
longest cached prefix (the live context or a saved state from the context cache),
evaluate only the rest, stream tokens out, and stop within one token of a cancel.
After the reply has been delivered, the context is snapshotted into the cache so a
conversation that comes back later restores instead of re-evaluating.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jarvis.config import LlmSettings
from jarvis.errors import BackendClosedError, BackendError, ModelError, PromptTooLongError
from jarvis.llm.base import ChatMessage, FinishReason, GenerationOptions, GenerationStats
from jarvis.llm.cache import ContextCache, State, file_identity, fingerprint

log = logging.getLogger(__name__)

_MAX_REMEMBERED_REPLIES = 1024
_MIN_SLIDE = 16
"""Slide KV back over dropped turns only when that reuses this many more tokens than
the live prefix or the cache would."""
_KV_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # GGML_TYPE_*
_OFFLOAD_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class LlamaEngine:
    """One llama.cpp model and context. Every public method takes the engine lock."""

    def __init__(self, settings: LlmSettings, cache: ContextCache) -> None:
        self.settings = settings
        self.cache = cache
        self._lock = threading.Lock()
        self._llm: Any = None
        self._llama_cpp: Any = None
        self._formatter: Any = None
        self._system_prefix: tuple[int, ...] = ()
        self._replies: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._next_history: list[ChatMessage] | None = None
        """What the next request is expected to start with (see :meth:`prepare`)."""
        self._inexact_from: int | None = None
        """Live positions from here on hold KV slid back over dropped turns (see
        :meth:`_slide`): valid for this conversation, but not what a fresh evaluation of
        their tokens gives, so they are never saved in the cache."""
        self.offload: str = "not loaded"
        self.template_source = ""

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load the model, read its chat template, restore persisted cache entries."""
        with self._lock:
            if self._llm is not None:
                return
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._llama_cpp = llama_cpp
            s = self.settings
            captured: list[str] = []
            self._llm = self._construct(llama_cpp, captured)
            self.offload = self._describe_offload(llama_cpp, captured)
            metadata = self._llm.metadata
            template = metadata.get("tokenizer.chat_template")
            if template:
                self.template_source = "gguf"
            else:
                template = _CHATML
                self.template_source = "chatml fallback (the GGUF has no chat template)"
                log.warning("%s has no chat template; using ChatML", s.model_path.name)
            vocab = self._llm._model
            eos_id, bos_id = self._llm.token_eos(), self._llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab.token_get_text(eos_id) if eos_id >= 0 else "",
                bos_token=vocab.token_get_text(bos_id) if bos_id >= 0 else "",
            )
            self._system_prefix = self._compute_system_prefix()
            self.cache.fingerprint = fingerprint(
                model=file_identity(s.model_path),
                n_ctx=self._llm.n_ctx(),
                kv=s.kv_cache_type,
                flash_attn=s.flash_attn,
                template=hashlib.sha256(template.encode()).hexdigest(),
                llama_cpp=llama_cpp.__version__,
            )
            if self.cache.enabled:
                self.cache.load_persisted(kind="system")
                if self.cache.settings.persist_recent:
                    self.cache.load_persisted(
                        kind="conversation", limit=self.cache.settings.persist_recent
                    )

    def _construct(self, llama_cpp: Any, captured: list[str]) -> Any:
        s = self.settings

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def capture(level: int, text: bytes, user_data: Any) -> None:
            captured.append(text.decode("utf-8", "replace"))

        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            return llama_cpp.Llama(
                model_path=str(s.model_path),
                n_ctx=s.context_window,
                n_threads=s.n_threads,
                n_threads_batch=s.n_threads_batch,
                n_batch=s.n_batch,
                n_ubatch=s.n_ubatch,
                n_gpu_layers=s.n_gpu_layers,
                flash_attn=s.flash_attn,
                type_k=_KV_TYPES[s.kv_cache_type],
                type_v=_KV_TYPES[s.kv_cache_type],
                use_mmap=s.use_mmap,
                use_mlock=s.use_mlock,
                seed=s.seed if s.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            tail = " ".join(line.strip() for line in captured[-3:] if line.strip())
            raise ModelError(
                f"JARVIS_MODEL_PATH={s.model_path}: llama.cpp could not load it ({exc}"
                f"{'; ' + tail if tail else ''}). Check the file is a complete GGUF and that "
                "JARVIS_MODEL_CONTEXT_WINDOW fits in memory"
            ) from exc
        finally:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def _describe_offload(self, llama_cpp: Any, captured: list[str]) -> str:
        """Say plainly whether JARVIS_N_GPU_LAYERS did anything."""
        requested = self.settings.n_gpu_layers
        if not llama_cpp.llama_supports_gpu_offload():
            text = "CPU-only build"
            if requested != 0:
                text += f": JARVIS_N_GPU_LAYERS={requested} has no effect"
                log.info("JARVIS_N_GPU_LAYERS=%d has no effect: this llama-cpp-python build "
                         "has no GPU backend, all layers run on the CPU", requested)
            return text
        for line in captured:
            match = _OFFLOAD_RE.search(line)
            if match:
                done, total = int(match.group(1)), int(match.group(2))
                text = f"{done}/{total} layers offloaded to GPU"
                if requested != 0 and done == 0:
                    log.warning("JARVIS_N_GPU_LAYERS=%d but no layer was offloaded", requested)
                return text
        return f"GPU build; JARVIS_N_GPU_LAYERS={requested} (llama.cpp did not report offload)"

    def close(self) -> None:
        """Persist recent conversations (if configured) and free the model."""
        with self._lock:
            if self._llm is None:
                return
            try:
                self._next_history = None
                self._persist_system_prefix()
                self._persist_recent()
            finally:
                self._llm.close()
                self._llm = None
                self.cache.close()

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def n_ctx(self) -> int:
        return int(self._require().n_ctx())

    @property
    def system_prefix(self) -> tuple[int, ...]:
        """Tokens of the configured system prompt that every conversation starts with."""
        return self._system_prefix

    # ------------------------------------------------------------------ tokens

    def tokenize_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt for ``messages`` as the model's own chat template formats it,
        ending with the assistant turn's opening.

        An assistant message this engine generated is spliced in as the exact tokens it
        generated, not re-tokenized: sampled tokens are often not the canonical
        tokenization of their text, and re-tokenizing would break the prefix match with
        the KV state (and make the next turn re-evaluate most of the reply).
        """
        llm = self._require()
        result = self._formatter(messages=[{"role": m.role, "content": m.content}
                                           for m in messages])
        prompt: str = result.prompt
        segments: list[str | tuple[int, ...]] = []
        cursor = 0
        for message in messages:
            content = message.content.strip()
            generated = self._replies.get(content) if message.role == "assistant" else None
            at = prompt.find(content, cursor) if generated and content else -1
            if generated and at >= 0:
                segments += [prompt[cursor:at], generated]
                cursor = at + len(content)
        segments.append(prompt[cursor:])
        tokens: list[int] = []
        for index, segment in enumerate(segments):
            if isinstance(segment, tuple):
                tokens += segment
            elif segment:
                add_bos = index == 0 and not result.added_special
                tokens += llm.tokenize(segment.encode("utf-8"), add_bos=add_bos, special=True)
        return tokens

    def _remember_reply(self, text: str, tokens: list[int]) -> None:
        """Keep the tokens generated for ``text`` so a later prompt containing this reply
        reproduces them exactly (bounded: the most recent replies only)."""
        key = text.strip()
        if not key or not tokens:
            return
        self._replies[key] = tuple(tokens)
        self._replies.move_to_end(key)
        while len(self._replies) > _MAX_REMEMBERED_REPLIES:
            self._replies.popitem(last=False)

    def _compute_system_prefix(self) -> tuple[int, ...]:
        """Tokens shared by every prompt that starts with the configured system prompt:
        the common prefix of two prompts that differ only in the user's words."""
        system = ChatMessage("system", self.settings.system_prompt)
        a = self.tokenize_chat([system, ChatMessage("user", "a")])
        b = self.tokenize_chat([system, ChatMessage("user", "b")])
        return tuple(a[: common_prefix(a, b)])

    # ------------------------------------------------------------------ requests

    def warmup(self, prefill_system: bool) -> float:
        """Make the first request fast; returns seconds spent.

        With ``prefill_system`` the system prompt's KV state is restored from the cache
        (or evaluated, then cached and persisted); otherwise one short generation runs
        so llama.cpp's buffers are allocated before the first user request.
        """
        t0 = time.perf_counter()
        with self._lock:
            llm = self._require()
            if prefill_system and self.cache.enabled and self._system_prefix:
                prefix = self._system_prefix
                match = self.cache.lookup(prefix)
                if match is not None and match.length == len(prefix):
                    self._restore(match.entry.tokens, match.entry.payload, len(prefix))
                else:
                    llm.reset()
                    self._inexact_from = None
                    llm.eval(list(prefix))
                    state = self._snapshot()
                    self.cache.store(prefix, state, pinned=True)
                    self.cache.persist(prefix, state, kind="system")
            if self.settings.warmup:
                probe = list(self._system_prefix[:1] or [llm.token_bos()])
                n_before = llm.n_tokens
                llm.eval(probe if n_before == 0 else [int(llm.input_ids[n_before - 1])])
                llm.n_tokens = n_before
                llm._ctx.kv_cache_seq_rm(0, n_before, -1)
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
            llm = self._require()
            if cancel.is_set():
                done(GenerationStats(0, 0, 0, "cancelled", None,
                                     time.perf_counter() - t0, queue_s))
                return
            tokens = self.tokenize_chat(messages)
            n_ctx = llm.n_ctx()
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
            cached = self._prepare(tokens, stages)
            stats, reply = self._stream(llm, tokens, cached, max_tokens, temperature,
                                        options.grammar, emit, cancel, t0, t_prep, queue_s,
                                        stages)
            if stats.finish_reason == "stop":  # the conversation will go on from here
                self._next_history = [*messages, ChatMessage("assistant", reply)]
            done(stats)

    def _prepare(self, tokens: list[int], stages: dict[str, float], *, count: bool = True) -> int:
        """Bring the longest reusable prefix of ``tokens`` into the context; return its
        length. At least the last prompt token is always evaluated (it yields the logits).
        ``count=False`` keeps speculative work out of the hit-rate counters."""
        llm = self._llm
        reusable = len(tokens) - 1
        live = min(common_prefix(llm.input_ids[: llm.n_tokens], tokens), reusable)
        reused, partial = live, live < llm.n_tokens
        if self._inexact_from is not None and live <= self._inexact_from:
            self._inexact_from = None  # what is kept was evaluated normally
        match = self.cache.lookup(tokens[:reusable]) if self.cache.enabled else None
        best = max(live, match.length if match is not None else 0)
        if live < llm.n_tokens and (slid := self._slide(tokens, live, best)):
            stages["cache_slide"] = slid[1]
            if self.cache.enabled and count:
                self.cache.record_query(len(tokens), slid[0], partial=True)
            return slid[0]
        if self.cache.enabled and live < llm.n_tokens:
            # Part of the live context is about to be discarded (another conversation,
            # or an edited history): keep it restorable unless housekeeping already did.
            t = time.perf_counter()
            if self._store_live():
                stages["cache_save"] = time.perf_counter() - t
                match = self.cache.lookup(tokens[:reusable])  # the store may have evicted it
        if match is not None and match.length > live:
            t = time.perf_counter()
            with self.cache.using(match.entry):
                ok = self._restore(match.entry.tokens, match.entry.payload, match.length)
            stages["cache_restore"] = time.perf_counter() - t
            if ok and count:
                self.cache.record_restore(stages["cache_restore"])
                reused, partial = match.length, match.length < len(match.entry.tokens)
            else:
                reused, partial = 0, False
        if self.cache.enabled and count:
            self.cache.record_query(len(tokens), reused, partial=partial)
        return reused

    def _slide(self, tokens: list[int], live: int, best: int) -> tuple[int, float] | None:
        """The prompt may be the live context with a block cut out after its first
        ``live`` tokens: the same conversation with its oldest turns dropped. Then drop
        that block's KV cells and slide the rest back (llama.cpp re-rotates the keys)
        instead of evaluating the kept turns again: seconds saved on this machine.

        Returns ``(tokens reused, seconds)``, or None when nothing fits, sliding is off,
        the model cannot shift, or it would not beat ``best`` tokens by much.
        """
        llm, lib = self._llm, self._llama_cpp
        n, reusable = int(llm.n_tokens), len(tokens) - 1
        if not self.cache.settings.slide or live >= reusable:
            return None
        ids = llm.input_ids
        start, kept = 0, 0
        for candidate in np.flatnonzero(ids[live + 1:n] == tokens[live]) + live + 1:
            length = common_prefix(ids[candidate:n], tokens[live:reusable])
            if length > kept:
                start, kept = int(candidate), length
        mem = lib.llama_get_memory(llm.ctx)
        if live + kept < best + _MIN_SLIDE or not lib.llama_memory_can_shift(mem):
            return None
        t = time.perf_counter()
        gap = start - live
        lib.llama_memory_seq_rm(mem, 0, start + kept, -1)
        lib.llama_memory_seq_rm(mem, 0, live, start)
        lib.llama_memory_seq_add(mem, 0, start, start + kept, -gap)
        ids[live:live + kept] = ids[start:start + kept].copy()
        llm.n_tokens = live + kept
        self._inexact_from = live if self._inexact_from is None else min(self._inexact_from,
                                                                          live)
        log.debug("context cache: slid %d tokens back over %d dropped ones", kept, gap)
        return live + kept, time.perf_counter() - t

    def _stream(
        self, llm: Any, tokens: list[int], cached: int, max_tokens: int, temperature: float,
        grammar: Any, emit: Callable[[str], None], cancel: threading.Event, t0: float,
        t_prep: float, queue_s: float, stages: dict[str, float],
    ) -> tuple[GenerationStats, str]:
        s = self.settings
        lib = self._llama_cpp
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
            self._remember_reply("".join(pieces), generated)
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
        whose oldest turns were just dropped); :meth:`housekeeping` evaluates it."""
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
            if self._llm is None or not self.cache.enabled:
                return
            history, self._next_history = self._next_history, None
            try:
                if history:
                    self._prefetch(history)
                self._store_live()
                self._persist_system_prefix()
            except Exception:  # only speed is at stake: log and carry on
                log.exception("context cache: housekeeping after a turn failed")

    def _prefetch(self, history: list[ChatMessage]) -> None:
        a = self.tokenize_chat([*history, ChatMessage("user", "a")])
        b = self.tokenize_chat([*history, ChatMessage("user", "b")])
        upto = common_prefix(a, b)
        llm = self._llm
        if upto < 1 or upto >= llm.n_ctx():
            return
        target = a[:upto]
        reused = self._prepare([*target, 0], {}, count=False)
        if reused < upto:
            llm.n_tokens = reused
            llm._ctx.kv_cache_seq_rm(0, reused, -1)
            llm.eval(target[reused:])

    def _persist_system_prefix(self) -> None:
        """Save the system prompt's state to disk once per model configuration, cut from
        the live context (the KV of a prefix does not depend on what follows it)."""
        prefix = self._system_prefix
        llm = self._llm
        if (
            not self.cache.persistent
            or not prefix
            or self.cache.has_persisted(prefix)
            or common_prefix(llm.input_ids[: llm.n_tokens], prefix) != len(prefix)
            or (self._inexact_from is not None and self._inexact_from < len(prefix))
        ):
            return
        self._store_live()  # keep the conversation restorable before cutting it back
        llm.n_tokens = len(prefix)
        llm._ctx.kv_cache_seq_rm(0, len(prefix), -1)
        state = self._snapshot()
        self.cache.store(prefix, state, pinned=True)
        self.cache.persist(prefix, state, kind="system")

    # ------------------------------------------------------------------ KV states

    def _store_live(self) -> bool:
        """Save the live context into the cache unless an entry already covers it;
        True when a snapshot was taken."""
        llm = self._llm
        n = llm.n_tokens
        if not self.cache.enabled or n == 0:
            return False
        if self._inexact_from is not None and n > self._inexact_from:
            return False  # slid KV is fine for this conversation, wrong for a cache key
        tokens = tuple(int(t) for t in llm.input_ids[:n])
        if self.cache.covers(tokens):
            return False
        t = time.perf_counter()
        state = self._snapshot()
        self.cache.store(tokens, state, save_s=time.perf_counter() - t)
        return True

    def _snapshot(self) -> bytearray:
        """The KV state of sequence 0 (no logits: we always re-evaluate one token).

        Written straight into the bytearray that the cache keeps: fresh memory costs a
        page fault per 4 KiB, and a second copy of ~30 MB doubled the time a switch of
        conversations spends saving (measured 50 ms → 27 ms here)."""
        lib, ctx = self._llama_cpp, self._llm.ctx
        size = lib.llama_state_seq_get_size(ctx, 0)
        state = bytearray(size)
        written = lib.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(state),
                                               size, 0)
        if written == 0:
            raise BackendError("llama.cpp returned an empty state snapshot")
        del state[written:]
        return state

    def _restore(self, tokens: tuple[int, ...], state: State, keep: int) -> bool:
        """Load ``state`` (the KV of ``tokens``) and cut it back to ``keep`` tokens.
        False (and the context left empty) when llama.cpp rejects the state."""
        lib, llm = self._llama_cpp, self._llm
        mem = lib.llama_get_memory(llm.ctx)
        lib.llama_memory_clear(mem, False)  # the cells only: zeroing ~100 MB took ~12 ms
        src: Any
        if isinstance(state, bytearray):  # a snapshot taken here: no copy needed
            src = (ctypes.c_uint8 * len(state)).from_buffer(state)
        else:  # read from disk
            src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
        if lib.llama_state_seq_set_data(llm.ctx, src, len(state), 0) != len(state):
            log.warning("context cache: llama.cpp rejected a saved state of %d tokens; "
                        "evaluating the prompt instead", len(tokens))
            lib.llama_memory_clear(mem, False)
            llm.n_tokens = 0
            return False
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = keep
        self._inexact_from = None
        if keep < len(tokens):
            llm._ctx.kv_cache_seq_rm(0, keep, -1)
        llm._requires_eval = True
        return True

    def _persist_recent(self) -> None:
        limit = self.cache.settings.persist_recent
        if not (self.cache.enabled and self.cache.persistent and limit):
            return
        self._store_live()
        for entry in reversed(self.cache.recent_entries(limit)):
            if not self.cache.has_persisted(entry.tokens):
                self.cache.persist(entry.tokens, entry.payload)

    def _require(self) -> Any:
        if self._llm is None:
            raise BackendClosedError("the llama.cpp backend is not started (or already closed)")
        return self._llm


_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
