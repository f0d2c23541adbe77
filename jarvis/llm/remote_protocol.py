"""The wire side of the OpenAI-compatible backend, free of I/O so it can be read (and
tested) on its own: which server we talk to, the request body each kind takes, the
server-sent-event parser, the server's timings as :class:`GenerationStats`, and HTTP
errors turned into one clear line.

Servers differ in what they add to ``/v1/chat/completions``:

- **llama.cpp** (``llama-server``, also the ``xllamacpp`` wheel): ``cache_prompt``,
  ``id_slot`` (a conversation stays on its slot), a GBNF ``grammar``, and ``timings``
  with ``prompt_n`` (evaluated) and ``cache_n`` (reused) in the last event;
- **vLLM**: automatic prefix caching (on by default in vLLM ≥ 0.6 with the V1 engine;
  ``--enable-prefix-caching`` on older ones), JSON-schema constrained output, cached
  tokens in ``usage.prompt_tokens_details`` with ``--enable-prompt-tokens-details``;
- **Ollama**: keeps the model loaded for ``keep_alive`` (set when Jarvis starts),
  JSON-schema constrained output;
- anything else OpenAI-compatible: the standard fields only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from jarvis.errors import BackendError, ConfigError, PromptTooLongError
from jarvis.llm.base import ChatMessage, FinishReason, GenerationOptions, GenerationStats

Flavor = Literal["llama.cpp", "vllm", "ollama", "openai"]

_ERROR_TEXT_LIMIT = 200


class ServerUnreachableError(BackendError):
    """The server could not be reached (refused, timed out, gone mid-reply): a fault of
    the connection, not of the request; the fallback model may answer instead."""


class ModelNotFoundError(BackendError):
    """The server does not serve the model asked for (the message lists those it does)."""


def base_url(url: str) -> str:
    """``JARVIS_LLM_URL`` as the server's root: no trailing ``/`` or ``/v1`` (people
    paste either from the servers' docs). A URL that is not http(s) is a ConfigError."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"JARVIS_LLM_URL={url!r} is invalid: expected an http:// or https:// URL such "
            "as http://192.168.1.20:8080 (empty = the in-process model)")
    root = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    return root.removesuffix("/v1")


def flavor_of(models: dict[str, Any]) -> Flavor | None:
    """The server kind from its ``/v1/models`` answer, when it says (``owned_by``)."""
    owners = {str(m.get("owned_by", "")).lower() for m in _model_entries(models)}
    if "llamacpp" in owners:
        return "llama.cpp"
    if "vllm" in owners:
        return "vllm"
    return None


def model_ids(models: dict[str, Any]) -> list[str]:
    """The model names a ``/v1/models`` answer lists."""
    return [str(m["id"]) for m in _model_entries(models) if m.get("id")]


def _model_entries(models: dict[str, Any]) -> list[dict[str, Any]]:
    data = models.get("data") if isinstance(models, dict) else None
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def pick_model(wanted: str, available: list[str], url: str) -> str:
    """The model to ask for: ``wanted`` (also matched by file name, since llama.cpp
    lists the GGUF path), or the only one served. Else a ModelNotFoundError that lists
    what the server has."""
    listed = ", ".join(available) or "none"
    if not wanted:
        if len(available) == 1:
            return available[0]
        if not available:
            raise ModelNotFoundError(f"the LLM server at {url} lists no models (GET /v1/models)")
        raise ModelNotFoundError(
            f"the LLM server at {url} serves several models ({listed}): set "
            "JARVIS_LLM_MODEL to one of them")
    for name in available:
        stem = name.replace("\\", "/").rsplit("/", 1)[-1]
        if wanted in (name, stem, stem.removesuffix(".gguf")):
            return name
    raise ModelNotFoundError(
        f"JARVIS_LLM_MODEL={wanted!r}: the LLM server at {url} does not serve it; it "
        f"serves: {listed}")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Sampling:
    """The sampling settings sent with every request (from ``LlmSettings``)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repeat_penalty: float
    seed: int


def request_body(flavor: Flavor, model: str, messages: list[ChatMessage],
                 options: GenerationOptions, sampling: Sampling, *,
                 slot: int | None = None, keep_alive: str = "") -> dict[str, Any]:
    """The ``/v1/chat/completions`` body for this server kind. Only the fields a kind
    understands are sent (vLLM warns about unknown ones, stricter servers refuse them)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": options.max_tokens or sampling.max_tokens,
        "temperature": sampling.temperature if options.temperature is None
        else options.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.seed >= 0:
        body["seed"] = sampling.seed
    grammar = options.grammar
    if grammar is not None and not isinstance(grammar, str):
        raise BackendError("the remote backend takes a grammar as GBNF text, not "
                           f"{type(grammar).__name__}")
    if flavor == "llama.cpp":
        body.update(cache_prompt=True, top_k=sampling.top_k, min_p=0.05,
                    repeat_penalty=sampling.repeat_penalty)
        if slot is not None:
            body["id_slot"] = slot
        if grammar:
            body["grammar"] = grammar
        return body
    if flavor == "vllm":
        body.update(top_k=sampling.top_k, repetition_penalty=sampling.repeat_penalty)
    if flavor == "ollama" and keep_alive:
        body["keep_alive"] = keep_alive
    if options.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "answer", "strict": True, "schema": options.json_schema}}
    return body


# --------------------------------------------------------------------------- events


class SseParser:
    """Server-sent events from raw lines: yields each event's ``data`` (the ``data:``
    lines joined), skips comments (``: ping``) and other fields. ``pending`` says whether
    an event was cut off before its blank line."""

    def __init__(self) -> None:
        self._data: list[str] = []

    @property
    def pending(self) -> bool:
        return bool(self._data)

    def feed(self, line: str) -> Iterator[str]:
        line = line.rstrip("\r\n")
        if not line:
            if self._data:
                data, self._data = "\n".join(self._data), []
                yield data
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> Iterator[str]:
        """The last event when the stream ends without a blank line after it (some
        servers do); the caller decides whether it is whole."""
        if self._data:
            data, self._data = "\n".join(self._data), []
            yield data


@dataclass
class Chunk:
    """What one streamed event carried."""

    text: str = ""
    finish_reason: str | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    slot: int | None = None


def parse_event(data: str) -> Chunk | None:
    """One event's payload; None for ``[DONE]``. A BackendError for anything that is
    not a chat-completion chunk (malformed JSON, an error object); its message goes on
    from "the LLM server at <url> ..."."""
    if data.strip() == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        raise BackendError(f"sent a malformed event: {_short(data)!r}") from None
    if not isinstance(obj, dict):
        raise BackendError(f"sent an unexpected event: {_short(data)!r}")
    if "error" in obj:
        raise BackendError(f"failed mid-reply: {error_message(obj)}")
    chunk = Chunk(timings=_dict(obj.get("timings")), usage=_dict(obj.get("usage")))
    slot = obj.get("id_slot")
    chunk.slot = slot if isinstance(slot, int) else None
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta") or choice.get("message") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        chunk.text = content if isinstance(content, str) else ""
        reason = choice.get("finish_reason")
        chunk.finish_reason = reason if isinstance(reason, str) else None
    elif "choices" not in obj and chunk.timings is None and chunk.usage is None:
        raise BackendError(f"sent an unexpected event: {_short(data)!r}")
    return chunk


def _dict(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- stats


@dataclass
class Tally:
    """What a stream reported, gathered as its events arrive."""

    pieces: int = 0
    finish_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    slot: int | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.text:
            self.pieces += 1
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.timings:
            self.timings = chunk.timings
        if chunk.usage:
            self.usage = chunk.usage
        if chunk.slot is not None:
            self.slot = chunk.slot


def generation_stats(tally: Tally, *, ttft_s: float | None, total_s: float,
                     finish: FinishReason) -> GenerationStats:
    """The request's stats from the server's own figures: llama.cpp's ``timings``
    (``prompt_n`` evaluated + ``cache_n`` reused), else the standard ``usage`` (with
    ``prompt_tokens_details.cached_tokens`` where the server fills it in). The cache
    hit is None when the server does not say."""
    t, u = tally.timings, tally.usage
    stages: dict[str, float] = {}
    cached: int | None = None
    prompt = _int(u.get("prompt_tokens"))
    if "prompt_n" in t or "cache_n" in t:
        cached = _int(t.get("cache_n")) or 0
        prompt = (_int(t.get("prompt_n")) or 0) + cached
        for key, stage in (("prompt_ms", "server_prompt_eval"),
                           ("predicted_ms", "server_generation")):
            value = t.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                stages[stage] = float(value) / 1000
    else:
        details = u.get("prompt_tokens_details")
        if isinstance(details, dict) and _int(details.get("cached_tokens")) is not None:
            cached = _int(details.get("cached_tokens"))
    completion = _int(u.get("completion_tokens"))
    if completion is None:
        completion = _int(t.get("predicted_n"))
    return GenerationStats(
        prompt_tokens=prompt or 0,
        cached_tokens=cached or 0,
        completion_tokens=tally.pieces if completion is None else completion,
        finish_reason=finish,
        ttft_s=ttft_s,
        total_s=total_s,
        stages=stages,
        cache_hit=None if cached is None else cached > 0,
    )


def finish_reason(reason: str | None) -> FinishReason:
    """The server's finish reason in our terms."""
    return "length" if reason == "length" else "stop"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- errors


def error_message(payload: object) -> str:
    """The message inside an error answer: OpenAI's ``{"error": {"message"}}``,
    Ollama's ``{"error": "..."}``, vLLM's ``{"message"}``/``{"detail"}``."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(error.get(key), str):
                    return _short(error[key])
        if isinstance(error, str):
            return _short(error)
        detail = payload.get("detail")
        if isinstance(detail, str):
            return _short(detail)
    return _short(json.dumps(payload)) if not isinstance(payload, str) else _short(payload)


def http_error(status: int, body: bytes, content_type: str, url: str) -> BackendError:
    """A non-200 answer as one line: what the server said and what to do about it. A
    prompt over the context is a PromptTooLongError (the responder then drops the
    oldest turns); an unknown model a ModelNotFoundError."""
    text = body.decode("utf-8", "replace")
    try:
        message = error_message(json.loads(text))
    except json.JSONDecodeError:
        message = describe_body(body, content_type)
    lowered = message.lower()
    if status == 400 and "context" in lowered and any(
            word in lowered for word in ("exceed", "maximum", "too long", "longer")):
        return PromptTooLongError(f"the prompt does not fit the server's context: {message}")
    if status == 404 and "model" in lowered:
        return ModelNotFoundError(f"the LLM server at {url}: {message}")
    if status in (401, 403):
        return BackendError(f"the LLM server at {url} refused the request (HTTP {status}: "
                            f"{message}); check JARVIS_LLM_API_KEY")
    if status == 503:
        return ServerUnreachableError(f"the LLM server at {url} is not ready (HTTP 503: "
                                      f"{message})")
    return BackendError(f"the LLM server at {url} answered HTTP {status}: {message}")


def describe_body(body: bytes, content_type: str) -> str:
    """A short description of an answer that is not what we expected."""
    text = body.decode("utf-8", "replace").strip()
    if "html" in content_type.lower() or text[:15].lower().startswith(("<!doctype", "<html")):
        return (f"an HTML page ({_short(text, 60)!r}), not an OpenAI-compatible API: is "
                "JARVIS_LLM_URL the LLM server's address?")
    if not text:
        return "an empty answer"
    return f"{content_type or 'no content type'}: {_short(text)!r}"


def _short(text: str, limit: int = _ERROR_TEXT_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
