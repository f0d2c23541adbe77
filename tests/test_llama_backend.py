"""The llama.cpp backend with the real starter model: streaming, cancellation,
concurrency on one model, the context cache across turns, and errors."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from jarvis.config import Settings
from jarvis.errors import BackendClosedError, PromptTooLongError
from jarvis.llm.base import ChatMessage, GenerationOptions, GenerationStats
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

SYSTEM = "You are Jarvis, a helpful voice assistant. Answer briefly."


def msgs(*user: str) -> list[ChatMessage]:
    return [ChatMessage("system", SYSTEM)] + [ChatMessage("user", u) for u in user]


async def started(settings: Settings, prefill: bool = False) -> LlamaCppBackend:
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=prefill)
    await backend.start()
    return backend


def test_streams_pieces_with_stats(settings: Settings) -> None:
    async def run() -> None:
        backend = await started(settings)
        try:
            stream = backend.stream_chat(msgs("Name three colours."))
            pieces = [p async for p in stream]
        finally:
            await backend.close()
        assert len(pieces) >= 2, "the reply must arrive in several pieces"
        stats = stream.stats
        assert stats is not None
        assert "".join(pieces).strip()
        assert stats.finish_reason in ("stop", "length")
        assert 0 < stats.completion_tokens <= settings.llm.max_tokens
        assert stats.prompt_tokens > 10
        assert stats.ttft_s is not None and 0 < stats.ttft_s <= stats.total_s
        assert "prompt_eval" in stats.stages and "generation" in stats.stages
        info = backend.info()
        assert info["chat_template"] == "gguf"
        assert info["gpu"] == "CPU-only build: JARVIS_N_GPU_LAYERS=-1 has no effect"

    asyncio.run(run())


def test_cancel_stops_within_one_token(settings: Settings) -> None:
    async def run() -> None:
        backend = await started(settings)
        try:
            opts = GenerationOptions(max_tokens=200)
            stream = backend.stream_chat(msgs("Tell me a long story about a dragon."), opts)
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    stream.cancel()
            assert stream.stats is not None
            assert stream.stats.finish_reason == "cancelled"
            assert stream.stats.completion_tokens <= 4  # 3 delivered + at most one more

            # Breaking out of the loop (consumer gone) also stops generation, and the
            # model is free again right away.
            stream2 = backend.stream_chat(msgs("Count from one to fifty."), opts)
            async for _ in stream2:
                break
            text, stats = await asyncio.wait_for(backend.complete(msgs("Say hi.")), 30)
            assert text.strip() and stats.finish_reason in ("stop", "length")
        finally:
            await backend.close()

    asyncio.run(run())


def test_cancelling_the_consumer_task(settings: Settings) -> None:
    async def run() -> None:
        backend = await started(settings)
        try:
            first_piece = asyncio.Event()

            async def consume() -> None:
                async for _ in backend.stream_chat(msgs("Describe the sea at length."),
                                                   GenerationOptions(max_tokens=300)):
                    first_piece.set()

            task = asyncio.create_task(consume())
            await first_piece.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            _, stats = await asyncio.wait_for(backend.complete(msgs("Say ok.")), 30)
            # The cancelled generation released the model within about a token:
            assert stats.queue_s < 1.0
        finally:
            await backend.close()

    asyncio.run(run())
    # No worker thread outlives the event loop (asyncio.run joins its executor).
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncio_")]


def test_concurrent_requests_match_sequential_answers(tmp_path: Path) -> None:
    """Requests made at once are served one at a time in arrival order, so their greedy
    replies are exactly those of the same requests made one after another on a fresh
    backend: the model is never used by two requests at the same time."""
    settings = make_settings(tmp_path, TEMPERATURE="0", MAX_TOKENS="24", CACHE_DIR="")
    questions = ["What is two plus two?", "Name a fruit.", "What colour is the sky?",
                 "Say good morning."]

    async def sequential() -> list[str]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            return [(await backend.complete(msgs(q)))[0] for q in questions]

    async def together() -> list[tuple[str, GenerationStats]]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            return list(await asyncio.gather(*(backend.complete(msgs(q)) for q in questions)))

    expected = asyncio.run(sequential())
    results = asyncio.run(together())
    assert [text for text, _ in results] == expected
    queues = [stats.queue_s for _, stats in results]
    assert queues == sorted(queues) and queues[-1] > queues[0], "FIFO: later ones waited"


def test_follow_up_turn_reuses_the_conversation_prefix(settings: Settings) -> None:
    async def run() -> None:
        backend = await started(settings)
        conv = Conversation(SYSTEM)
        try:
            records = []
            for text in ("What is the capital of Italy?", "How big is it?", "Thanks!"):
                reply, stats = await backend.complete(conv.messages(text))
                conv.add_turn(text, reply)
                records.append(stats)
            cache = backend.cache.stats()
        finally:
            await backend.close()
        first, second, third = records
        assert first.cached_tokens == 0 and first.cache_hit is False
        # Everything before the new user message was evaluated in an earlier turn.
        assert second.cached_tokens >= first.prompt_tokens
        assert third.cached_tokens >= second.prompt_tokens
        assert second.evaluated_prompt_tokens < 40
        assert cache.queries == 3 and cache.hits == 2
        assert cache.reused_tokens == second.cached_tokens + third.cached_tokens

    asyncio.run(run())


def test_cache_disabled_evaluates_everything(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, ENABLE_CONTEXT_CACHE="false")

    async def run() -> None:
        backend = await started(settings)
        conv = Conversation(SYSTEM)
        try:
            for text in ("Hello.", "How are you?"):
                reply, stats = await backend.complete(conv.messages(text))
                conv.add_turn(text, reply)
                assert stats.cache_hit is None
        finally:
            await backend.close()
        assert backend.cache.stats().queries == 0

    asyncio.run(run())


def test_prompt_too_long_and_closed_backend(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, MODEL_CONTEXT_WINDOW="128")

    async def run() -> None:
        backend = await started(settings)
        try:
            with pytest.raises(PromptTooLongError, match="JARVIS_MODEL_CONTEXT_WINDOW=128"):
                await backend.complete(msgs("word " * 300))
            # The backend keeps serving after the error.
            text, _ = await backend.complete([ChatMessage("user", "Hi")])
            assert text.strip()
        finally:
            await backend.close()
        with pytest.raises(BackendClosedError):
            backend.stream_chat(msgs("hello"))

    asyncio.run(run())


def test_grammar_constrains_the_output(settings: Settings) -> None:
    from llama_cpp import LlamaGrammar

    schema = {"type": "object", "required": ["device", "action"],
              "properties": {"device": {"enum": ["kitchen light", "porch light"]},
                             "action": {"enum": ["on", "off"]}}}
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)

    async def run() -> tuple[str, str]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            constrained, _ = await backend.complete(
                msgs("Please switch the garage heater to maximum."),
                GenerationOptions(grammar=grammar, max_tokens=40),
            )
            free, _ = await backend.complete(msgs("Say hello."))
            return constrained, free

    constrained, free = asyncio.run(run())
    choice = json.loads(constrained)  # only what the schema allows, even for a silly request
    assert choice["device"] in ("kitchen light", "porch light")
    assert choice["action"] in ("on", "off")
    assert free.strip() and not free.lstrip().startswith("{")  # the next request is free again
