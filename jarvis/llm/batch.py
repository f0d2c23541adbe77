"""A ``llama_batch``: tokens of several sequences evaluated in one ``llama_decode``."""

from __future__ import annotations

from typing import Any

from jarvis.errors import BackendError

_DECODE_ERRORS = {
    1: "no room in the KV cache for the batch",
    2: "the decode was aborted",
    -1: "the batch was invalid",
}


class Batch:
    """Up to ``capacity`` tokens, each with its position, sequence and whether its
    logits are wanted; reused from step to step (:meth:`clear`)."""

    def __init__(self, lib: Any, capacity: int) -> None:
        self._lib = lib
        self.capacity = capacity
        self._batch = lib.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index (where its logits will be)."""
        if self.n >= self.capacity:
            raise BackendError("internal: the batch is full")
        b, i = self._batch, self.n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n += 1
        return i

    def decode(self, ctx: Any) -> None:
        """Evaluate the batch; :class:`~jarvis.errors.BackendError` when llama.cpp fails."""
        self._batch.n_tokens = self.n
        rc = int(self._lib.llama_decode(ctx, self._batch))
        if rc != 0:
            why = _DECODE_ERRORS.get(rc, "an internal error")
            raise BackendError(f"llama_decode failed ({rc}: {why}) for {self.n} tokens")

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
