"""The KV cells of the sequences of the one llama.cpp context, and their exchange with
the context cache.

The context holds ``JARVIS_PARALLEL`` sequences, each in its own KV stream (a
sequence attends only to its own cells). :class:`SeqKv` is one of them: the tokens its
cells hold, reuse of the longest prefix for a new prompt (what it holds, slid back over
dropped turns, or a state restored from the cache), snapshots into the cache. A saved
state does not depend on the sequence it came from: a conversation snapshotted in one
sequence restores into any other. :class:`KvStates` holds them all and what concerns
the whole cache (the system prompt's pinned state, persistence at shutdown).

Evaluation is not done here: the engine decodes tokens into a sequence (batched with
the other sequences) and calls :meth:`SeqKv.appended`.

Not thread-safe: only the engine's worker thread calls it.
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
the held prefix or the cache would."""


class SeqKv:
    """Sequence ``seq`` of the context ``ctx`` (``lib`` is the ``llama_cpp`` module)."""

    def __init__(self, ctx: Any, lib: Any, cache: ContextCache, seq: int) -> None:
        self._ctx = ctx
        self._lib = lib
        self._mem = lib.llama_get_memory(ctx)
        self.cache = cache
        self.seq = seq
        self.tokens: list[int] = []
        """The tokens whose KV the sequence's cells hold, in position order."""
        self.used_at = 0.0
        """When a request last used this sequence (``time.monotonic``)."""
        self._inexact_from: int | None = None
        """Positions from here on hold KV slid back over dropped turns (see
        :meth:`_slide`): valid for this conversation, but not what a fresh evaluation of
        their tokens gives, so they are never saved in the cache."""

    def __len__(self) -> int:
        return len(self.tokens)

    def shared_with(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` this sequence already holds."""
        return common_prefix(self.tokens, tokens)

    # ------------------------------------------------------------------ reuse

    def reuse_prefix(self, tokens: list[int], stages: dict[str, float], *,
                     count: bool = True) -> int:
        """Bring the longest reusable prefix of ``tokens`` into this sequence, drop what
        follows it, and return its length. At least the last prompt token is always left
        to evaluate (it yields the logits). ``count=False`` keeps speculative work out of
        the hit-rate counters."""
        reusable = len(tokens) - 1
        live = min(self.shared_with(tokens), reusable)
        reused, partial = live, live < len(self.tokens)
        if self._inexact_from is not None and live <= self._inexact_from:
            self._inexact_from = None  # what is kept was evaluated normally
        match = self.cache.lookup(tokens[:reusable]) if self.cache.enabled else None
        best = max(live, match.length if match is not None else 0)
        if live < len(self.tokens) and (slid := self._slide(tokens, live, best)):
            stages["cache_slide"] = slid[1]
            if self.cache.enabled and count:
                self.cache.record_query(len(tokens), slid[0], partial=True)
            self.truncate(slid[0])
            return slid[0]
        if self.cache.enabled and live < len(self.tokens):
            # Part of what this sequence holds is about to be discarded (another
            # conversation, or an edited history): keep it restorable unless the idle
            # work already did.
            t = time.perf_counter()
            if self.store_live():
                stages["cache_save"] = time.perf_counter() - t
                match = self.cache.lookup(tokens[:reusable])  # the store may have evicted it
        if match is not None and match.length > live:
            t = time.perf_counter()
            with self.cache.using(match.entry):
                ok = self.restore(match.entry.tokens, match.entry.payload, match.length)
            stages["cache_restore"] = time.perf_counter() - t
            if ok:  # counted for idle work too, as its snapshots are
                self.cache.record_restore(stages["cache_restore"])
                reused, partial = match.length, match.length < len(match.entry.tokens)
            else:
                reused, partial = 0, False
        if self.cache.enabled and count:
            self.cache.record_query(len(tokens), reused, partial=partial)
        self.truncate(reused)
        return reused

    def _slide(self, tokens: list[int], live: int, best: int) -> tuple[int, float] | None:
        """The prompt may be what this sequence holds with a block cut out after its
        first ``live`` tokens: the same conversation with its oldest turns dropped. Then
        drop that block's KV cells and slide the rest back (llama.cpp re-rotates the
        keys) instead of evaluating the kept turns again: seconds saved on a small CPU.

        Returns ``(tokens reused, seconds)``, or None when nothing fits, sliding is off,
        the model cannot shift, or it would not beat ``best`` tokens by much.
        """
        lib, mem, seq = self._lib, self._mem, self.seq
        n, reusable = len(self.tokens), len(tokens) - 1
        if not self.cache.settings.slide or live >= reusable:
            return None
        ids = np.asarray(self.tokens)
        start, kept = 0, 0
        for candidate in np.flatnonzero(ids[live + 1:n] == tokens[live]) + live + 1:
            length = common_prefix(ids[candidate:n], tokens[live:reusable])
            if length > kept:
                start, kept = int(candidate), length
        if live + kept < best + _MIN_SLIDE or not lib.llama_memory_can_shift(mem):
            return None
        t = time.perf_counter()
        gap = start - live
        lib.llama_memory_seq_rm(mem, seq, start + kept, -1)
        lib.llama_memory_seq_rm(mem, seq, live, start)
        lib.llama_memory_seq_add(mem, seq, start, start + kept, -gap)
        self.tokens = [*self.tokens[:live], *self.tokens[start:start + kept]]
        self._inexact_from = live if self._inexact_from is None else min(self._inexact_from,
                                                                          live)
        log.debug("context cache: slid %d tokens back over %d dropped ones", kept, gap)
        return live + kept, time.perf_counter() - t

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens of this sequence."""
        if n < len(self.tokens):
            self._lib.llama_memory_seq_rm(self._mem, self.seq, n, -1)
            del self.tokens[n:]

    def clear(self) -> None:
        """Empty this sequence (after a failed decode its cells are not trusted)."""
        self._lib.llama_memory_seq_rm(self._mem, self.seq, -1, -1)
        self.tokens = []
        self._inexact_from = None

    def appended(self, tokens: list[int]) -> None:
        """``tokens`` were just decoded into this sequence, after what it held."""
        self.tokens.extend(tokens)

    # ------------------------------------------------------------------ save, restore

    def store_live(self) -> bool:
        """Save what this sequence holds into the cache unless an entry already covers
        it; True when a snapshot was taken."""
        if self.saved:
            return False
        tokens = tuple(self.tokens)
        t = time.perf_counter()
        if not self.cache.make_room(tokens, self.state_size()):
            return False  # it could not be kept: do not take it
        state = self.snapshot()
        self.cache.store(tokens, state, save_s=time.perf_counter() - t)
        return True

    def inexact_before(self, n: int) -> bool:
        """True when any of the first ``n`` positions hold slid (inexact) KV."""
        return self._inexact_from is not None and self._inexact_from < n

    @property
    def saved(self) -> bool:
        """True when the cache holds (or must never hold) what this sequence holds:
        nothing, slid KV (fine for this conversation, wrong for a cache key), or
        tokens an entry already covers."""
        if not self.cache.enabled or not self.tokens:
            return True
        if self._inexact_from is not None and len(self.tokens) > self._inexact_from:
            return True
        return self.cache.covers(self.tokens)

    def state_size(self) -> int:
        """Bytes a snapshot of this sequence takes."""
        return int(self._lib.llama_state_seq_get_size(self._ctx, self.seq))

    def snapshot(self) -> memoryview:
        """The KV state of this sequence (no logits: we always re-evaluate one token).

        Written straight into the memory the cache keeps, a memory map of its own (see
        :func:`~jarvis.llm.records.new_state_buffer`): fresh pages cost a fault per
        4 KiB, but no zeroing and no second copy (a copy of ~30 MB doubled the time a
        switch of conversations spends saving, 27 ms → 50 ms here), and the pages go
        back to the OS when the entry is evicted."""
        size = self.state_size()
        state = new_state_buffer(size)
        written = self._lib.llama_state_seq_get_data(
            self._ctx, (ctypes.c_uint8 * size).from_buffer(state), size, self.seq)
        if written == 0:
            raise BackendError("llama.cpp returned an empty state snapshot")
        return state[:written]

    def restore(self, tokens: tuple[int, ...], state: State, keep: int) -> bool:
        """Load ``state`` (the KV of ``tokens``) into this sequence and cut it back to
        ``keep`` tokens. False (and the sequence left empty) when llama.cpp rejects it."""
        lib = self._lib
        self.clear()
        src: Any
        view = memoryview(state)
        if not view.readonly:  # a snapshot or a record read from disk: no copy
            src = (ctypes.c_uint8 * len(view)).from_buffer(view)
        else:
            src = ctypes.cast(ctypes.c_char_p(bytes(view)), ctypes.POINTER(ctypes.c_uint8))
        if lib.llama_state_seq_set_data(self._ctx, src, len(view), self.seq) != len(view):
            log.warning("context cache: llama.cpp rejected a saved state of %d tokens; "
                        "evaluating the prompt instead", len(tokens))
            self.clear()
            return False
        self.tokens = list(tokens)
        self.truncate(keep)
        return True


class KvStates:
    """All sequences of the context, and the cache work that concerns them together."""

    def __init__(self, ctx: Any, lib: Any, cache: ContextCache, n_seq: int) -> None:
        self.cache = cache
        self.seqs = [SeqKv(ctx, lib, cache, seq) for seq in range(n_seq)]
        self._system_unfit = False
        """The system prompt's state is larger than the byte cap: not cached, not saved."""

    def save_system(self, seq: SeqKv, prefix: tuple[int, ...]) -> None:
        """Snapshot ``seq`` (holding exactly ``prefix``, the system prompt): pinned in
        memory and persisted on disk. A state larger than the byte cap is neither (it
        could never be loaded), once said."""
        if not self.cache.make_room(prefix, seq.state_size()):
            if not self._system_unfit:
                log.info("context cache: the system prompt's state (%.0f MiB) does not fit "
                         "JARVIS_MAX_CACHE_BYTES; it is evaluated at each start",
                         seq.state_size() / (1 << 20))
            self._system_unfit = True
            return
        state = seq.snapshot()
        self.cache.store(prefix, state, pinned=True)
        self.cache.persist(prefix, state, kind="system")

    def system_to_persist(self, prefix: tuple[int, ...], free: list[SeqKv]) -> SeqKv | None:
        """A sequence among ``free`` from which the system prompt's state can be cut and
        persisted, when that is still to be done (once per model configuration)."""
        if (not self.cache.persistent or not prefix or self._system_unfit
                or self.cache.has_persisted(prefix)):
            return None
        for seq in free:
            if seq.shared_with(list(prefix)) == len(prefix) and not seq.inexact_before(
                    len(prefix)):
                return seq
        return None

    def persist_system_prefix(self, seq: SeqKv, prefix: tuple[int, ...]) -> None:
        """Cut ``seq`` back to ``prefix`` (the KV of a prefix does not depend on what
        follows it) and save that as the system prompt's state."""
        seq.store_live()  # keep the conversation restorable before cutting it back
        seq.truncate(len(prefix))
        self.save_system(seq, prefix)

    def persist_recent(self) -> None:
        """Write the most recent conversations to disk (``JARVIS_CACHE_PERSIST_RECENT``),
        those the sequences hold included, so they restore after a restart."""
        limit = self.cache.settings.persist_recent
        if not (self.cache.enabled and self.cache.persistent and limit):
            return
        for seq in sorted(self.seqs, key=lambda s: s.used_at):
            seq.store_live()
        for entry in reversed(self.cache.recent_entries(limit)):
            if not self.cache.has_persisted(entry.tokens):
                self.cache.persist(entry.tokens, entry.payload)
