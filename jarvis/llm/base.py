"""The contract every LLM backend keeps: stream text for a list of chat messages,
cancellable mid-generation, with token counts and timings at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from jarvis.latency import RequestRecord

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, in the order the model sees them."""

    role: Role
    content: str


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request overrides; ``None`` means the backend's configured default."""

    max_tokens: int | None = None
    temperature: float | None = None
    grammar: Any = None
    """A constraint on the output, so the model can only produce what the grammar
    allows: GBNF text, which every backend takes (the in-process engine compiles it, a
    llama.cpp server receives it as its ``grammar`` field), or an object only one
    backend understands (for the in-process engine a ``LlamaGrammar``)."""
    json_schema: dict[str, Any] | None = None
    """The same constraint as a JSON schema, for servers that take JSON-schema
    constrained output but no GBNF (vLLM, Ollama); the answer is then JSON. Backends
    that take the grammar ignore it."""


@dataclass(frozen=True)
class GenerationStats:
    """What one request cost. Times are seconds from the moment the request was made."""

    prompt_tokens: int
    """Tokens in the formatted prompt."""
    cached_tokens: int
    """Prompt tokens reused from the context cache (not evaluated again)."""
    completion_tokens: int
    finish_reason: FinishReason
    ttft_s: float | None
    """Time to first token: None when no token was produced."""
    total_s: float
    queue_s: float = 0.0
    """Time spent waiting for the model while other requests used it."""
    stages: dict[str, float] = field(default_factory=dict)
    """Finer timings, e.g. ``cache_restore``, ``prompt_eval``, ``generation``."""
    cache_hit: bool | None = None
    """None when the context cache is disabled."""

    @property
    def evaluated_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def to_record(self, label: str = "", warmup: bool = False) -> RequestRecord:
        """This request as a latency-tracker record."""
        return RequestRecord(
            total_s=self.total_s,
            ttft_s=self.ttft_s,
            stages={"queue": self.queue_s, **self.stages},
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            cache_hit=self.cache_hit,
            label=label,
            warmup=warmup,
        )


class TokenStream(Protocol):
    """An async iterator of text pieces. ``stats`` is set once the iteration ends.

    Cancelling the consuming task, calling :meth:`cancel`, or leaving the ``async for``
    early stops generation within one token.
    """

    stats: GenerationStats | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    def cancel(self) -> None: ...


class LLMBackend(Protocol):
    """A language model that turns chat messages into a stream of text."""

    async def start(self) -> None:
        """Load and warm up; returns when the first request will be served warm."""

    async def close(self) -> None:
        """Release the model; outstanding streams are cancelled."""

    def stream_chat(
        self, messages: Sequence[ChatMessage], options: GenerationOptions | None = None
    ) -> TokenStream:
        """Start answering ``messages`` (the last one is the user's)."""

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        """Hint: the next request starts with ``history``; a backend may evaluate it
        while idle so that request only pays for its new words."""

    def info(self) -> dict[str, Any]:
        """Model facts for reports: path, context size, threads, offload, cache state."""
