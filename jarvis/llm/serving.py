"""One request through the batched engine: what the caller asked and how to answer it
(:class:`Request`), and its progress while it holds a sequence (:class:`Active`): the
prompt tokens still to evaluate, the token sampled last step, the text streamed so far
and the timings its stats report."""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jarvis.llm.base import ChatMessage, FinishReason, GenerationOptions, GenerationStats
from jarvis.llm.kv_state import SeqKv
from jarvis.llm.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Request:
    """A chat to answer and the callbacks that carry the answer out of the worker
    thread. Exactly one of ``done`` (after the pieces) or ``fail`` is called."""

    messages: list[ChatMessage]
    options: GenerationOptions
    emit: Callable[[str], None]
    done: Callable[[GenerationStats], None]
    fail: Callable[[BaseException], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.perf_counter)
    """``perf_counter`` time the request was made (its stats count from here)."""


class Active:
    """A request being answered in sequence ``seq``.

    ``pending`` holds the prompt tokens not yet evaluated; once they are, each step
    decodes ``next_token`` (the one sampled last step) and samples the next.
    """

    def __init__(self, request: Request, seq: SeqKv, prompt_tokens: int, cached: int,
                 pending: list[int], max_tokens: int, sampler: Sampler,
                 detokenize: Callable[[int], bytes], is_end: Callable[[int], bool],
                 queue_s: float, stages: dict[str, float], t_admit: float) -> None:
        self.request = request
        self.seq = seq
        self.pending = pending
        self.next_token: int | None = None
        self.sampler = sampler
        self.max_tokens = max_tokens
        self._prompt_tokens = prompt_tokens
        self._cached = cached
        self._detokenize = detokenize
        self._is_end = is_end
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.queue_s = queue_s
        self.stages = stages
        self._t_eval = time.perf_counter()
        self._t_admit = t_admit
        self._t_first: float | None = None
        self._ttft: float | None = None

    @property
    def reply(self) -> str:
        return "".join(self.pieces)

    def take(self, token: int) -> FinishReason | None:
        """Handle a sampled token: stream its text; the reason to stop, if any."""
        if self._t_first is None:
            self._t_first = time.perf_counter()
            self.stages["prompt_eval"] = self._t_first - self._t_eval
        if self._is_end(token):
            return "stop"
        self.generated.append(token)
        piece = self._decoder.decode(self._detokenize(token))
        if piece:
            if self._ttft is None:
                self._ttft = time.perf_counter() - self.request.t0
            self.pieces.append(piece)
            self.request.emit(piece)
        if len(self.generated) >= self.max_tokens:
            return "length"
        self.next_token = token
        return None

    def finish(self, reason: FinishReason, cache_enabled: bool) -> GenerationStats:
        """Flush the text and return the stats (the caller delivers them)."""
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self.pieces.append(tail)
            self.request.emit(tail)
        now = time.perf_counter()
        self.stages["prepare"] = self._t_eval - self._t_admit
        if self._t_first is not None:
            self.stages["generation"] = now - self._t_first
        return GenerationStats(
            prompt_tokens=self._prompt_tokens,
            cached_tokens=self._cached,
            completion_tokens=len(self.generated),
            finish_reason=reason,
            ttft_s=self._ttft,
            total_s=now - self.request.t0,
            queue_s=self.queue_s,
            stages=self.stages,
            cache_hit=(self._cached > 0) if cache_enabled else None,
        )


def cancelled_at_start(queue_s: float) -> GenerationStats:
    """The stats of a request cancelled before it got a sequence."""
    return GenerationStats(prompt_tokens=0, cached_tokens=0, completion_tokens=0,
                           finish_reason="cancelled", ttft_s=None, total_s=queue_s,
                           queue_s=queue_s)


def deliver(request: Request, stats: GenerationStats | None = None,
            error: BaseException | None = None) -> None:
    """Call the request's ``done`` or ``fail``; a caller that went away (its event loop
    closed) is no reason to stop serving the others."""
    try:
        if error is not None:
            request.fail(error)
        elif stats is not None:
            request.done(stats)
    except Exception:  # the consumer is gone; nothing is waiting for this answer
        log.debug("a finished request's consumer is gone", exc_info=True)
