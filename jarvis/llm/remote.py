"""The OpenAI-compatible backend: a bigger model on another machine (llama.cpp's
``llama-server``, vLLM, Ollama) behind the same :class:`~jarvis.llm.base.LLMBackend`
protocol as the in-process engine, so every entry point works unchanged.

- **One pooled keep-alive** ``httpx.AsyncClient`` for everything; every connect and
  every read has a timeout (``JARVIS_LLM_CONNECT_TIMEOUT_S``, ``JARVIS_LLM_READ_TIMEOUT_S``).
- **Streaming**: ``/v1/chat/completions`` as server-sent events, read by a task of its
  own; cancelling the stream cancels that task, which closes the connection, and the
  server stops generating when it notices the client is gone.
- **The server's cache keeps hitting**: the prompt is the conversation as it is (system
  prompt first, nothing volatile), and on llama.cpp ``cache_prompt`` with each
  conversation pinned to a slot (:mod:`jarvis.llm.remote_slots`). At start the system
  prompt is restored into every slot from a slot file saved on the server
  (``--slot-save-path``), or evaluated once and saved, so a restarted server answers
  warm. The server's own counts (``prompt_n``/``cache_n``) become the request's
  :class:`GenerationStats`, so the latency tracker's cache hit rate covers remote turns.
- **Faults**: an unreachable server at start is one line naming the URL and what was
  tried; a model the server does not serve lists those it does; a server that goes
  away fails the turn (stage ``llm``) and is probed again with backoff until it is back
  (then its slots are warmed again). Anything not an OpenAI answer (HTML, non-JSON, a
  stream cut mid-event, an empty reply, HTTP 500) is a clear error for that turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from jarvis.config import LlmSettings
from jarvis.errors import BackendClosedError, BackendError
from jarvis.llm.base import ChatMessage, FinishReason, GenerationOptions, GenerationStats
from jarvis.llm.remote_protocol import (
    Chunk,
    Flavor,
    Sampling,
    ServerUnreachableError,
    SseParser,
    Tally,
    base_url,
    describe_body,
    finish_reason,
    flavor_of,
    generation_stats,
    http_error,
    model_ids,
    parse_event,
    pick_model,
    request_body,
)
from jarvis.llm.remote_slots import SlotTable
from jarvis.llm.stream_queue import Done, Failed, PieceQueue, pieces

log = logging.getLogger(__name__)

WARM_REQUEST = "Hello."
"""The user turn sent with the system prompt to evaluate it into a slot."""
MAX_BACKOFF_S = 8.0
_ERROR_BODY_LIMIT = 16_384


@dataclass
class ServerCacheStats:
    """How much of the prompts the server reused, as it reported them."""

    requests: int = 0
    queries: int = 0
    """Requests whose answer said how many prompt tokens came from its cache."""
    hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    @property
    def reuse_rate(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate, "reuse_rate": self.reuse_rate}


class ServerCache:
    """The server's prompt cache as seen from here (``backend.cache.stats()``)."""

    enabled = True

    def __init__(self) -> None:
        self._stats = ServerCacheStats()

    def record(self, stats: GenerationStats) -> None:
        s = self._stats
        s.requests += 1
        if stats.cache_hit is not None:
            s.queries += 1
            s.hits += stats.cache_hit
            s.prompt_tokens += stats.prompt_tokens
            s.cached_tokens += stats.cached_tokens

    def stats(self) -> ServerCacheStats:
        return ServerCacheStats(**asdict(self._stats))


class RemoteTokenStream:
    """Text pieces of one reply from the server; see :class:`jarvis.llm.base.TokenStream`."""

    def __init__(self, backend: RemoteBackend, messages: Sequence[ChatMessage],
                 options: GenerationOptions) -> None:
        self._backend = backend
        self._messages = list(messages)
        self._options = options
        self._task: asyncio.Task[None] | None = None
        self._cancelled = False
        self._consumed = False
        self.t0 = time.perf_counter()
        self.tally = Tally()
        """What the server has reported so far (filled in by the reading task)."""
        self.ttft: float | None = None
        self.stats: GenerationStats | None = None

    def _set_stats(self, stats: GenerationStats) -> None:
        self.stats = stats

    def cancel(self) -> None:
        """Stop: the reading task is cancelled, its connection closed. ``stats`` are
        set at once (a cancelled reply gets no timings from the server)."""
        self._cancelled = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            if self.stats is None:
                self.stats = generation_stats(self.tally, ttft_s=self.ttft,
                                              total_s=time.perf_counter() - self.t0,
                                              finish="cancelled")

    def __aiter__(self) -> AsyncIterator[str]:
        if self._consumed:
            raise RuntimeError("a token stream can be iterated only once")
        self._consumed = True
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        queue: PieceQueue = asyncio.Queue()
        if self._cancelled:
            self.stats = GenerationStats(0, 0, 0, "cancelled", None, 0.0)
            return
        self._task = self._backend._spawn(self._backend._run(self, self._messages,
                                                             self._options, queue))
        try:
            async for piece in pieces(queue, self._set_stats):
                yield piece
        finally:
            self.cancel()  # early exit, an error or task cancellation: close the stream


class RemoteBackend:
    """A model served over HTTP by llama.cpp's server, vLLM, Ollama or any
    OpenAI-compatible server. ``prefill_system=False`` (one-shot ``jarvis ask``) still
    restores the saved system prompt into the slots but evaluates nothing."""

    def __init__(self, settings: LlmSettings, *, prefill_system: bool = True) -> None:
        self.settings = settings
        self.url = base_url(settings.url)
        self.prefill_system = prefill_system
        self.sampling = Sampling(settings.max_tokens, settings.temperature, settings.top_p,
                                 settings.top_k, settings.repeat_penalty, settings.seed)
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url, headers=headers, trust_env=False,
            timeout=httpx.Timeout(connect=settings.connect_timeout_s,
                                  read=settings.read_timeout_s,
                                  write=settings.read_timeout_s,
                                  pool=settings.read_timeout_s),
            # llama-server and vLLM drop idle connections after 5 s: never reuse one
            # they may be closing.
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16,
                                keepalive_expiry=4.0))
        self.cache = ServerCache()
        self.model = settings.remote_model
        self.flavor: Flavor = "openai"
        self.slots: SlotTable | None = None
        self.slot_file: str | None = None
        self.persistence = "off"
        """What happened to the system prompt's slot state: restored, saved, evaluated, off."""
        self.available = False
        self.start_s = 0.0
        self._meta: dict[str, Any] = {}
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._warming: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Find the server and its model, then warm its cache with the system prompt."""
        t = time.perf_counter()
        await self._discover(wait_loading=True)
        await self._prepare_server()
        self.available = True
        self.start_s = time.perf_counter() - t
        log.info("LLM server %s (%s) model %s ready in %.2f s; system prompt %s", self.url,
                 self.flavor, self.model, self.start_s, self.persistence)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()

    async def __aenter__(self) -> RemoteBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ discovery

    async def _discover(self, *, wait_loading: bool = False) -> None:
        """``GET /v1/models``: the server is there, speaks OpenAI, serves our model."""
        deadline = time.monotonic() + self.settings.read_timeout_s
        delay = 0.25
        while True:
            status, models = await self._json("GET", "/v1/models")
            if status != 503:
                break
            if not wait_loading or time.monotonic() > deadline:
                raise ServerUnreachableError(f"the LLM server at {self.url} is not ready "
                                             f"(HTTP 503 to GET /v1/models: {models})")
            log.info("the LLM server at %s is loading its model; waiting", self.url)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if status in (401, 403):
            raise BackendError(f"the LLM server at {self.url} refused GET /v1/models (HTTP "
                               f"{status}: {models}); check JARVIS_LLM_API_KEY")
        if status != 200 or not isinstance(models, dict):
            raise BackendError(f"the LLM server at {self.url} answered GET /v1/models with "
                               f"HTTP {status}: is JARVIS_LLM_URL an OpenAI-compatible server?")
        self.model = pick_model(self.settings.remote_model, model_ids(models), self.url)
        entry = next((m for m in models.get("data", []) if isinstance(m, dict)
                      and m.get("id") == self.model), {})
        meta = entry.get("meta")
        self._meta = meta if isinstance(meta, dict) else {}
        self.flavor = flavor_of(models) or await self._probe_flavor()

    async def _probe_flavor(self) -> Flavor:
        """A server whose model list does not say: llama.cpp answers ``/props``,
        Ollama ``/api/version``."""
        probes: tuple[tuple[str, Flavor, str], ...] = (
            ("/props", "llama.cpp", "default_generation_settings"),
            ("/api/version", "ollama", "version"))
        for path, flavor, key in probes:
            try:
                status, answer = await self._json("GET", path)
            except BackendError:
                continue
            if status == 200 and isinstance(answer, dict) and key in answer:
                return flavor
        return "openai"

    async def _prepare_server(self) -> None:
        """Flavor-specific start: llama.cpp slots (pinning, the saved system prompt),
        Ollama's keep-alive; elsewhere one request puts the system prompt in the
        server's prefix cache."""
        self.slots = None
        if self.flavor == "llama.cpp":
            try:
                status, slots = await self._json("GET", "/slots")
            except BackendError:
                status, slots = 0, None
            if status == 200 and isinstance(slots, list) and slots:
                ids = [int(s["id"]) for s in slots if isinstance(s, dict) and "id" in s]
                self.slots = SlotTable(ids)
            else:
                log.info("the llama.cpp server at %s has no /slots endpoint (--no-slots?): "
                         "conversations are not pinned to slots", self.url)
        elif self.flavor == "ollama":
            status, answer = await self._json("POST", "/api/generate", {
                "model": self.model, "keep_alive": self.settings.keep_alive})
            if status != 200:
                log.warning("Ollama did not load %s: %s", self.model, answer)
        system = self.settings.system_prompt
        if not system:
            return
        if self.slots is not None:
            await self._warm_slots(system)
        elif self.prefill_system:
            await self._prefill(None, system)
            self.persistence = "evaluated"

    async def _warm_slots(self, system: str) -> None:
        """Put the system prompt's state into every slot: restored from the slot file
        when the server has it (``--slot-save-path``), else evaluated once, saved, and
        restored into the other slots (or evaluated in each, without a save path)."""
        assert self.slots is not None
        ids = list(self.slots.slots)
        key = json.dumps([self.model, self._meta, system], sort_keys=True)
        self.slot_file = f"jarvis-{hashlib.sha256(key.encode()).hexdigest()[:24]}.bin"
        if await self._slot_action(ids[0], "restore"):
            self.persistence = "restored"
        elif self.prefill_system:
            await self._prefill(ids[0], system)
            self.persistence = "saved" if await self._slot_action(ids[0], "save") \
                else "evaluated"
        else:
            self.persistence = "off"
            return
        rest = ids[1:]
        if self.persistence in ("restored", "saved"):
            done = await asyncio.gather(*(self._slot_action(i, "restore") for i in rest))
            rest = [i for i, ok in zip(rest, done, strict=True) if not ok]
        if self.prefill_system:
            await asyncio.gather(*(self._prefill(i, system) for i in rest))
        for i in ids:
            self.slots.warmed(i, [ChatMessage("system", system)])

    async def _slot_action(self, slot: int, action: str) -> bool:
        """``POST /slots/{slot}?action=save|restore`` with our slot file; False when the
        server cannot (no ``--slot-save-path``, no such file yet)."""
        status, answer = await self._json("POST", f"/slots/{slot}?action={action}",
                                          {"filename": self.slot_file})
        if status != 200:
            log.debug("slot %d %s of %s: HTTP %d %s", slot, action, self.slot_file, status,
                      answer)
        return status == 200

    async def _prefill(self, slot: int | None, system: str) -> None:
        """Evaluate the system prompt (with a one-token reply) into ``slot``."""
        messages = [ChatMessage("system", system), ChatMessage("user", WARM_REQUEST)]
        body = request_body(self.flavor, self.model, messages,
                            GenerationOptions(max_tokens=1, temperature=0.0), self.sampling,
                            slot=slot, keep_alive=self.settings.keep_alive)
        body.update(stream=False)
        body.pop("stream_options", None)
        status, answer = await self._json("POST", "/v1/chat/completions", body)
        if status != 200:
            log.warning("could not evaluate the system prompt on the LLM server: HTTP %d %s",
                        status, answer)

    async def _json(self, method: str, path: str,
                    body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """A small request: (status, parsed JSON). Transport faults are
        ServerUnreachableError; a 200 that is not JSON a BackendError."""
        try:
            try:
                response = await self.client.request(method, path, json=body)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # A pooled connection the server closed as we reused it: once more.
                response = await self.client.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise ServerUnreachableError(self._fault_text(exc, f"{method} {path}")) from None
        ctype = response.headers.get("content-type", "")
        try:
            return response.status_code, response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            if response.status_code == 503:
                raise ServerUnreachableError(f"the LLM server at {self.url} is not ready "
                                             "(HTTP 503)") from None
            if response.status_code == 200:
                raise BackendError(f"the LLM server at {self.url} answered {method} {path} "
                                   f"with {describe_body(response.content, ctype)}") from None
            return response.status_code, describe_body(response.content, ctype)

    def _fault_text(self, exc: httpx.TransportError, what: str) -> str:
        s = self.settings
        if isinstance(exc, httpx.ConnectTimeout):
            reason = f"no connection within {s.connect_timeout_s:g} s " \
                     "(JARVIS_LLM_CONNECT_TIMEOUT_S)"
        elif isinstance(exc, httpx.TimeoutException):
            return (f"the LLM server at {self.url} sent nothing for {s.read_timeout_s:g} s "
                    f"on {what} (JARVIS_LLM_READ_TIMEOUT_S)")
        elif isinstance(exc, httpx.ConnectError):
            reason = _connect_reason(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return (f"cannot reach the LLM server at {self.url} (JARVIS_LLM_URL): tried {what}: "
                f"{reason}")

    # ------------------------------------------------------------------ reconnect

    def _lost(self, error: BaseException) -> None:
        """The server went away: probe it with backoff until it answers, then warm it."""
        if self._closed:
            return
        if self.available:
            log.warning("%s; reconnecting in the background", error)
        self.available = False
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay, started = 0.25, time.monotonic()
        while not self._closed:
            try:
                await self._discover()
                await self._prepare_server()
            except ServerUnreachableError:
                pass
            except BackendError as exc:  # there, but not usable (model gone): keep trying
                log.warning("the LLM server is back but not usable: %s", exc)
            else:
                self.available = True
                log.info("the LLM server at %s is back after %.1f s (system prompt %s)",
                         self.url, time.monotonic() - started, self.persistence)
                return
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _rewarm(self) -> None:
        """A request found a slot cold that should have held our prompt: the server
        restarted (or evicted it). Warm the slots again in the background."""
        if self._warming is None or self._warming.done():
            self._warming = self._spawn(self._prepare_server())

    # ------------------------------------------------------------------ requests

    def stream_chat(self, messages: Sequence[ChatMessage],
                    options: GenerationOptions | None = None) -> RemoteTokenStream:
        if self._closed:
            raise BackendClosedError("the remote LLM backend is closed")
        if not messages:
            raise ValueError("stream_chat needs at least one message")
        return RemoteTokenStream(self, messages, options or GenerationOptions())

    async def complete(self, messages: Sequence[ChatMessage],
                       options: GenerationOptions | None = None) -> tuple[str, GenerationStats]:
        """The whole reply and its stats (convenience for non-streaming callers)."""
        stream = self.stream_chat(messages, options)
        text = "".join([piece async for piece in stream])
        assert stream.stats is not None
        return text, stream.stats

    async def _run(self, stream: RemoteTokenStream, messages: list[ChatMessage],
                   options: GenerationOptions, queue: asyncio.Queue[Any]) -> None:
        """Send one request and feed ``queue`` with its pieces, then its end."""
        slot = shared = None
        if self.slots is not None and self.flavor == "llama.cpp":
            slot, shared = self.slots.acquire(messages)
        tally, parts = stream.tally, []
        reply: str | None = None
        finish: FinishReason = "cancelled"
        try:
            body = request_body(self.flavor, self.model, messages, options, self.sampling,
                                slot=slot, keep_alive=self.settings.keep_alive)
            async for piece in self._stream(body, tally):
                if stream.ttft is None:
                    stream.ttft = time.perf_counter() - stream.t0
                parts.append(piece)
                queue.put_nowait(piece)
            if not parts:
                raise BackendError(f"the LLM server at {self.url} sent an empty reply "
                                   f"(finish reason {tally.finish_reason or 'none'})")
            finish = finish_reason(tally.finish_reason)
            reply = "".join(parts)
        except asyncio.CancelledError:
            finish = "cancelled"
            raise
        except BaseException as exc:
            finish = "error"
            if isinstance(exc, ServerUnreachableError):
                self._lost(exc)
            queue.put_nowait(Failed(exc))
        finally:
            stats = generation_stats(tally, ttft_s=stream.ttft,
                                     total_s=time.perf_counter() - stream.t0, finish=finish)
            if slot is not None and self.slots is not None:
                self.slots.release(slot, messages, reply)
            if finish in ("stop", "length"):
                self.available = True
                self.cache.record(stats)
                if slot is not None and shared and stats.cache_hit is False:
                    self._rewarm()
                queue.put_nowait(Done(stats))
            stream.stats = stream.stats or stats

    async def _stream(self, body: dict[str, Any], tally: Tally) -> AsyncIterator[str]:
        """POST the body and yield the reply's text pieces as the events arrive. A pooled
        connection the server closed just before we used it (it answered nothing) is
        retried once on a fresh one: llama.cpp's server, for one, closes the connection
        after each streamed answer although it announces keep-alive."""
        for attempt in (1, 2):
            started = False
            try:
                async with self.client.stream("POST", "/v1/chat/completions",
                                              json=body) as response:
                    started = True
                    async for piece in self._pieces(response, tally):
                        yield piece
                return
            except (httpx.TimeoutException, httpx.ConnectError) as exc:
                raise ServerUnreachableError(
                    self._fault_text(exc, "POST /v1/chat/completions")) from None
            except httpx.TransportError as exc:
                if not started and attempt == 1:
                    log.debug("a pooled connection was closed under us (%s); retrying", exc)
                    continue
                doing = "went away mid-reply" if started else "closed the connection unanswered"
                raise ServerUnreachableError(f"the LLM server at {self.url} {doing} "
                                             f"({type(exc).__name__}: {exc})") from None

    async def _pieces(self, r: httpx.Response, tally: Tally) -> AsyncIterator[str]:
        """The text pieces of one answer, checked: an error status, something other
        than an event stream, a stream cut short are errors."""
        ctype = r.headers.get("content-type", "")
        if r.status_code != 200:
            raise http_error(r.status_code, await _read_some(r), ctype, self.url)
        if "text/event-stream" not in ctype:
            async for piece in self._whole_answer(r, ctype, tally):
                yield piece
            return
        parser, lines = SseParser(), r.aiter_lines()
        async for line in lines:
            for data in parser.feed(line):
                chunk = self._event(data)
                if chunk is None:  # [DONE]: read the body's end, so the connection goes
                    await _drain(lines)  # back to the pool
                    return
                tally.add(chunk)
                if chunk.text:
                    yield chunk.text
        for data in parser.close():  # a last event without its blank line
            try:
                last = parse_event(data)
            except BackendError:
                raise ServerUnreachableError(f"the LLM server at {self.url} stopped in the "
                                             "middle of an event (the stream was cut)") from None
            if last is not None:
                tally.add(last)
                if last.text:
                    yield last.text
        if tally.finish_reason is None:
            raise ServerUnreachableError(f"the LLM server at {self.url} ended the stream "
                                         "before the reply was finished")

    def _event(self, data: str) -> Chunk | None:
        try:
            return parse_event(data)
        except BackendError as exc:
            raise BackendError(f"the LLM server at {self.url} {exc}") from None

    async def _whole_answer(self, response: httpx.Response, ctype: str,
                            tally: Tally) -> AsyncIterator[str]:
        """A 200 that is not an event stream: a whole JSON completion (a server that
        ignored ``stream``) is accepted; anything else is an error."""
        raw = await _read_some(response)
        try:
            chunk = parse_event(raw.decode("utf-8", "replace")) if "json" in ctype else None
        except BackendError:
            chunk = None
        if chunk is None:
            raise BackendError(f"the LLM server at {self.url} answered "
                               f"{describe_body(raw, ctype)}")
        tally.add(chunk)
        tally.finish_reason = tally.finish_reason or "stop"
        if chunk.text:
            yield chunk.text

    def prepare(self, history: Sequence[ChatMessage]) -> None:
        """Nothing to do: the conversation's slot already holds its history."""

    def info(self) -> dict[str, Any]:
        return {
            "backend": "remote",
            "url": self.url,
            "server": self.flavor,
            "model": self.model,
            "gpu": f"remote ({self.flavor} at {self.url})",
            "available": self.available,
            "slots": len(self.slots) if self.slots is not None else None,
            "slot_pinning": self.slots is not None,
            "system_prompt_state": self.persistence,
            "slot_file": self.slot_file,
            "context_cache": "server",
            "connect_timeout_s": self.settings.connect_timeout_s,
            "read_timeout_s": self.settings.read_timeout_s,
            "start_s": round(self.start_s, 3),
        }


async def _read_some(response: httpx.Response) -> bytes:
    """At most ~16 KB of a response body (an error page can be anything)."""
    data = bytearray()
    async for part in response.aiter_bytes():
        data += part
        if len(data) >= _ERROR_BODY_LIMIT:
            break
    return bytes(data[:_ERROR_BODY_LIMIT])


async def _drain(lines: AsyncIterator[str], timeout_s: float = 1.0) -> None:
    """Read what is left of a finished stream (its end), for at most ``timeout_s``."""

    async def rest() -> None:
        async for _ in lines:
            pass

    with contextlib.suppress(asyncio.TimeoutError, httpx.TransportError):
        await asyncio.wait_for(rest(), timeout_s)


def _connect_reason(exc: httpx.ConnectError) -> str:
    text = str(exc)
    lowered = text.lower()
    if "refused" in lowered or "all connection attempts failed" in lowered:
        return "connection refused (is the server running and listening on that address?)"
    if "name or service not known" in lowered or "nodename" in lowered \
            or "name resolution" in lowered:
        return "unknown host name"
    return text or type(exc).__name__
