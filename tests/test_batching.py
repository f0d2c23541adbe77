"""Continuous batching in the in-process engine, with the real starter model: requests
decoded together give the same greedy replies as one at a time, a request joins a
running batch, more requests than sequences wait in arrival order, a failing request
fails alone, and idle work never holds a request up."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from jarvis.config import Settings, load_settings
from jarvis.errors import ConfigError, ModelError
from jarvis.evaluation.dialogues import home_system_prompt, turn
from jarvis.llm.base import ChatMessage, GenerationOptions, GenerationStats
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.llm.serving import Request
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

SYSTEM = "You are Jarvis, a helpful voice assistant. Answer briefly."
QUESTIONS = ["What is two plus two?", "Name a fruit.", "What colour is the sky?",
             "Say good morning.", "Tell me a joke about cats."]


def msgs(question: str) -> list[ChatMessage]:
    return [ChatMessage("system", SYSTEM), ChatMessage("user", question)]


def greedy(tmp_path: Path, parallel: int, **env: str) -> Settings:
    return make_settings(tmp_path, **{"TEMPERATURE": "0", "MAX_TOKENS": "24", "CACHE_DIR": "",
                                      "PARALLEL": str(parallel), **env})


def one_at_a_time(settings: Settings, questions: list[str]) -> list[str]:
    async def run() -> list[str]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            return [(await backend.complete(msgs(q)))[0] for q in questions]

    return asyncio.run(run())


def test_batched_greedy_replies_equal_one_at_a_time(tmp_path: Path) -> None:
    expected = one_at_a_time(greedy(tmp_path, 1), QUESTIONS[:4])

    async def together() -> list[tuple[str, GenerationStats]]:
        settings = greedy(tmp_path, 4)
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            assert backend.engine.n_seq == 4
            return list(await asyncio.gather(*(backend.complete(msgs(q))
                                               for q in QUESTIONS[:4])))

    results = asyncio.run(together())
    assert [text for text, _ in results] == expected
    # All four were served at once: none waited for another to finish.
    longest = max(stats.total_s for _, stats in results)
    assert all(stats.queue_s < longest / 4 for _, stats in results), results


def test_a_request_joins_a_running_batch(tmp_path: Path) -> None:
    settings = greedy(tmp_path, 2, MAX_TOKENS="48")
    expected = one_at_a_time(settings, ["Tell me a long story about a dragon.", QUESTIONS[1]])

    async def run() -> tuple[str, str, GenerationStats, int]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            long_pieces: list[str] = []
            late: asyncio.Task[tuple[str, GenerationStats]] | None = None
            pieces_when_joined = 0
            async for piece in backend.stream_chat(msgs("Tell me a long story about a dragon.")):
                long_pieces.append(piece)
                if len(long_pieces) == 3:
                    late = asyncio.create_task(backend.complete(msgs(QUESTIONS[1])))
                    pieces_when_joined = len(long_pieces)
            assert late is not None
            short, stats = await late
            return "".join(long_pieces), short, stats, pieces_when_joined

    long_text, short, stats, at = asyncio.run(run())
    assert (long_text, short) == tuple(expected)
    assert stats.queue_s < 0.5, "it joined at the next step instead of waiting"
    assert at == 3


def test_more_requests_than_sequences_wait_first_come_first_served(tmp_path: Path) -> None:
    settings = greedy(tmp_path, 2)
    expected = one_at_a_time(settings, QUESTIONS)

    async def run() -> list[tuple[str, GenerationStats]]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            return list(await asyncio.gather(*(backend.complete(msgs(q)) for q in QUESTIONS)))

    results = asyncio.run(run())
    assert [text for text, _ in results] == expected
    queues = [stats.queue_s for _, stats in results]
    assert max(queues[:2]) < 0.1, queues  # two sequences: the first two start at once
    assert min(queues[2:]) > max(queues[:2]), queues  # the others waited for a free one
    assert queues[2:] == sorted(queues[2:]), "served in arrival order"
    records = [stats.to_record() for _, stats in results]
    assert records[4].stages["queue"] == queues[4] > 0  # the tracker sees the wait


def test_a_request_that_fails_mid_batch_fails_alone(tmp_path: Path) -> None:
    settings = greedy(tmp_path, 4)
    expected = one_at_a_time(settings, QUESTIONS[:3])

    async def run() -> tuple[list[str], BaseException | None, int]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            failed: list[BaseException] = []
            emitted = 0
            ended = threading.Event()

            def emit(piece: str) -> None:  # a consumer that breaks after two pieces
                nonlocal emitted
                emitted += 1
                if emitted == 3:
                    raise RuntimeError("consumer broke")

            def done(stats: GenerationStats) -> None:
                ended.set()

            def fail(exc: BaseException) -> None:
                failed.append(exc)
                ended.set()

            backend.engine.submit(Request(msgs("Count from one to fifty."),
                                          GenerationOptions(max_tokens=60), emit, done, fail))
            others = await asyncio.gather(*(backend.complete(msgs(q)) for q in QUESTIONS[:3]))
            await asyncio.to_thread(ended.wait, 30)
            # The engine goes on serving after the failure.
            after, _ = await backend.complete(msgs(QUESTIONS[0]))
            assert after == expected[0]
            return [text for text, _ in others], failed[0] if failed else None, emitted

    texts, error, emitted = asyncio.run(run())
    assert texts == expected
    assert isinstance(error, RuntimeError) and str(error) == "consumer broke"
    assert emitted == 3, "nothing was emitted after the failure"


def test_idle_pre_evaluation_yields_to_a_request(tmp_path: Path) -> None:
    """A long pre-evaluation (a hint of several hundred new tokens: seconds of work) is
    done in small pieces; a request arriving meanwhile starts at once."""
    settings = make_settings(tmp_path, TEMPERATURE="0", MAX_TOKENS="8", CACHE_DIR="",
                             PARALLEL="1", SYSTEM_PROMPT="You are Jarvis.")

    async def run() -> tuple[GenerationStats, int]:
        async with LlamaCppBackend(settings.llm, settings.cache) as backend:
            history = Conversation(home_system_prompt())  # ~1,100 tokens not yet evaluated
            history.add_turn(turn(0, 0), "Sure.")
            backend.prepare(history.messages(turn(0, 1))[:-1])
            while backend.engine.idle_tokens == 0:  # until the pre-evaluation is under way
                await asyncio.sleep(0.01)
            _, stats = await backend.complete(msgs("Say hi."))
            paused_at = backend.engine.idle_tokens
            return stats, paused_at

    stats, paused_at = asyncio.run(run())
    assert 0 < paused_at < 400, "the request came while the pre-evaluation was running"
    # Evaluating the whole hint takes ~10 s here; the request waited for one piece.
    assert stats.queue_s + stats.stages.get("prepare", 0) < 1.0, stats


def test_parallel_out_of_range_is_refused_naming_the_limit(tmp_path: Path) -> None:
    for value in ("0", "65", "four"):
        with pytest.raises(ConfigError, match=f"JARVIS_PARALLEL='{value}' is invalid: .* 1 to 64"):
            load_settings({"JARVIS_PARALLEL": value, "JARVIS_CACHE_DIR": ""})

    settings = make_settings(tmp_path, PARALLEL="64", MODEL_CONTEXT_WINDOW="1000000",
                             CACHE_DIR="")

    async def run() -> None:
        backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=False)
        await backend.start()

    with pytest.raises(ModelError) as caught:
        asyncio.run(run())
    message = str(caught.value)
    assert "\n" not in message
    assert "JARVIS_PARALLEL=64" in message and "GiB available" in message, message
