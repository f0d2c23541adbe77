"""The KV state of the one live llama.cpp context and its exchange with the context
cache: reuse the longest prefix (live, slid back over dropped turns, or restored from
the cache), snapshot and restore states, and persist the ones worth keeping on disk.

Not thread-safe: the engine calls it with its lock held.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any

import numpy as np

from jarvis.errors import BackendError
from jarvis.llm.cache import ContextCache
from jarvis.llm.prompt import common_prefix
from jarvis.llm.records import State, new_state_buffer

log = logging.getLogger(__name__)

_MIN_SLIDE = 16
"""Slide KV back over dropped turns only when that reuses this many more tokens than
the live prefix or the cache would."""


class KvState:
    """The live context of ``llm`` (a ``llama_cpp.Llama``; ``lib`` is the ``llama_cpp``
    module) and the ``cache`` of saved states."""

    def __init__(self, llm: Any, lib: Any, cache: ContextCache) -> None:
        self._llm = llm
        self._lib = lib
        self.cache = cache
        self._system_unfit = False
        """The system prompt's state is larger than the byte cap: not cached, not saved."""
        self._inexact_from: int | None = None
        """Live positions from here on hold KV slid back over dropped turns (see
        :meth:`_slide`): valid for this conversation, but not what a fresh evaluation of
        their tokens gives, so they are never saved in the cache."""

    # ------------------------------------------------------------------ reuse

    def reuse_prefix(self, tokens: list[int], stages: dict[str, float], *,
                     count: bool = True) -> int:
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
            if self.store_live():
                stages["cache_save"] = time.perf_counter() - t
                match = self.cache.lookup(tokens[:reusable])  # the store may have evicted it
        if match is not None and match.length > live:
            t = time.perf_counter()
            with self.cache.using(match.entry):
                ok = self.restore(match.entry.tokens, match.entry.payload, match.length)
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
        llm, lib = self._llm, self._lib
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

    def evaluate(self, target: list[int]) -> None:
        """Make the context hold exactly ``target`` (reusing what it can, uncounted), so
        a later prompt that starts with it only evaluates its own new tokens."""
        reused = self.reuse_prefix([*target, 0], {}, count=False)
        if reused < len(target):
            self.truncate(reused)
            self._llm.eval(target[reused:])

    def prefill(self, prefix: tuple[int, ...]) -> None:
        """Restore the state of ``prefix`` (the system prompt) from the cache, or
        evaluate it and keep it: pinned in memory and persisted on disk."""
        llm = self._llm
        match = self.cache.lookup(prefix)
        if match is not None and match.length == len(prefix):
            self.restore(match.entry.tokens, match.entry.payload, len(prefix))
        else:
            llm.reset()
            self._inexact_from = None
            llm.eval(list(prefix))
            self._save_system(prefix)

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens of the live context."""
        self._llm.n_tokens = n
        self._llm._ctx.kv_cache_seq_rm(0, n, -1)

    # ------------------------------------------------------------------ save, restore

    def store_live(self) -> bool:
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
        if not self.cache.make_room(tokens, self.state_size()):
            return False  # it could not be kept: do not take it
        state = self.snapshot()
        self.cache.store(tokens, state, save_s=time.perf_counter() - t)
        return True

    def state_size(self) -> int:
        """Bytes a snapshot of the live context takes."""
        return int(self._lib.llama_state_seq_get_size(self._llm.ctx, 0))

    def snapshot(self) -> memoryview:
        """The KV state of sequence 0 (no logits: we always re-evaluate one token).

        Written straight into the memory the cache keeps, a memory map of its own (see
        :func:`~jarvis.llm.records.new_state_buffer`): fresh pages cost a fault per
        4 KiB, but no zeroing and no second copy (a copy of ~30 MB doubled the time a
        switch of conversations spends saving, 27 ms → 50 ms here), and the pages go
        back to the OS when the entry is evicted."""
        lib, ctx = self._lib, self._llm.ctx
        size = self.state_size()
        state = new_state_buffer(size)
        written = lib.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(state),
                                               size, 0)
        if written == 0:
            raise BackendError("llama.cpp returned an empty state snapshot")
        return state[:written]

    def restore(self, tokens: tuple[int, ...], state: State, keep: int) -> bool:
        """Load ``state`` (the KV of ``tokens``) and cut it back to ``keep`` tokens.
        False (and the context left empty) when llama.cpp rejects the state."""
        lib, llm = self._lib, self._llm
        mem = lib.llama_get_memory(llm.ctx)
        lib.llama_memory_clear(mem, False)  # the cells only: zeroing ~100 MB took ~12 ms
        src: Any
        view = memoryview(state)
        if not view.readonly:  # a snapshot or a record read from disk: no copy
            src = (ctypes.c_uint8 * len(view)).from_buffer(view)
        else:
            src = ctypes.cast(ctypes.c_char_p(bytes(view)), ctypes.POINTER(ctypes.c_uint8))
        if lib.llama_state_seq_set_data(llm.ctx, src, len(view), 0) != len(view):
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

    # ------------------------------------------------------------------ persistence

    def persist_system_prefix(self, prefix: tuple[int, ...]) -> None:
        """Save the system prompt's state (``prefix``) to disk once per model
        configuration, cut from the live context (the KV of a prefix does not depend on
        what follows it)."""
        llm = self._llm
        if (
            not self.cache.persistent
            or not prefix
            or self._system_unfit
            or self.cache.has_persisted(prefix)
            or common_prefix(llm.input_ids[: llm.n_tokens], prefix) != len(prefix)
            or (self._inexact_from is not None and self._inexact_from < len(prefix))
        ):
            return
        self.store_live()  # keep the conversation restorable before cutting it back
        self.truncate(len(prefix))
        self._save_system(prefix)

    def _save_system(self, prefix: tuple[int, ...]) -> None:
        """Snapshot the live context (exactly ``prefix``, the system prompt): pinned in
        memory and persisted on disk. A state larger than the byte cap is neither (it
        could never be loaded), once said."""
        if not self.cache.make_room(prefix, self.state_size()):
            if not self._system_unfit:
                log.info("context cache: the system prompt's state (%.0f MiB) does not fit "
                         "JARVIS_MAX_CACHE_BYTES; it is evaluated at each start",
                         self.state_size() / (1 << 20))
            self._system_unfit = True
            return
        state = self.snapshot()
        self.cache.store(prefix, state, pinned=True)
        self.cache.persist(prefix, state, kind="system")

    def persist_recent(self) -> None:
        """Write the most recent conversations to disk (``JARVIS_CACHE_PERSIST_RECENT``),
        the live one included, so they restore after a restart."""
        limit = self.cache.settings.persist_recent
        if not (self.cache.enabled and self.cache.persistent and limit):
            return
        self.store_live()
        for entry in reversed(self.cache.recent_entries(limit)):
            if not self.cache.has_persisted(entry.tokens):
                self.cache.persist(entry.tokens, entry.payload)
