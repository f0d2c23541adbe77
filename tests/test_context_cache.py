"""The context cache with the real model: conversations interleaving on one model,
restored states answering exactly like fresh ones, byte caps, persistence across
restarts, corrupt and mismatched records, damaged cache directories that heal, and the
memory of dropped states going back to the OS."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from jarvis.config import Settings
from jarvis.evaluation.dialogues import home_system_prompt, turn
from jarvis.llm.base import ChatMessage, GenerationStats
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.llm.prefix_store import PrefixStore
from tests.conftest import make_settings

pytestmark = pytest.mark.slow


def backend_for(settings: Settings, prefill: bool = False) -> LlamaCppBackend:
    return LlamaCppBackend(settings.llm, settings.cache, prefill_system=prefill)


def test_restored_state_gives_the_same_greedy_continuation(tmp_path: Path) -> None:
    """Save/restore must be lossless: a system prompt evaluated fresh, then a question,
    gives exactly the same greedy tokens as the same system prompt restored from the
    cache (here: from disk, in a new backend), then the same question."""
    settings = make_settings(tmp_path, SYSTEM_PROMPT=home_system_prompt(), TEMPERATURE="0",
                             MAX_TOKENS="48", CACHE_PERSIST_RECENT="0")
    question = [ChatMessage("system", settings.llm.system_prompt),
                ChatMessage("user", "Who is Biscuit?")]

    async def run() -> tuple[str, GenerationStats, int]:
        async with backend_for(settings, prefill=True) as backend:
            text, stats = await backend.complete(question)
            return text, stats, backend.cache.stats().disk_hits

    fresh, fresh_stats, fresh_disk_hits = asyncio.run(run())  # evaluates the system prompt
    restored, restored_stats, disk_hits = asyncio.run(run())  # restores it from disk
    assert fresh_disk_hits == 0 and disk_hits == 1
    system_tokens = fresh_stats.cached_tokens
    assert system_tokens > 500 and restored_stats.cached_tokens == system_tokens
    assert restored == fresh
    assert fresh_stats.completion_tokens > 20  # a continuation long enough to mean something


def test_switching_conversations_restores_instead_of_reevaluating(tmp_path: Path) -> None:
    # One sequence: each switch of conversation must go through the cache (with more,
    # each conversation keeps its own sequence; tests/test_batching.py).
    settings = make_settings(tmp_path, CACHE_DIR="", SYSTEM_PROMPT=home_system_prompt(),
                             MAX_TOKENS="24", PARALLEL="1")

    async def run() -> None:
        async with backend_for(settings, prefill=True) as backend:
            convs = [Conversation(settings.llm.system_prompt) for _ in range(3)]
            results = []
            for index in range(3):
                for client, conv in enumerate(convs):
                    text = turn(client, index)
                    reply, stats = await backend.complete(conv.messages(text))
                    conv.add_turn(text, reply)
                    results.append((index, stats))
            cache = backend.cache.stats()
        system_tokens = len(backend.engine.system_prefix)
        assert system_tokens > 400
        for index, stats in results:
            assert stats.cache_hit
            if index == 0:
                assert stats.cached_tokens >= system_tokens
            else:  # came back to its conversation: the history is restored, not evaluated
                assert stats.evaluated_prompt_tokens < 40, stats
        assert cache.hits == cache.queries == 9
        assert cache.restores >= 6
        assert cache.bytes_held <= settings.cache.max_bytes

    asyncio.run(run())


@pytest.mark.parametrize("slide", [True, False])
def test_dropping_old_turns_slides_the_state_back_instead_of_evaluating_it(
    tmp_path: Path, slide: bool
) -> None:
    settings = make_settings(tmp_path, CACHE_DIR="", SYSTEM_PROMPT="You are Jarvis.",
                             MAX_TOKENS="24", CACHE_SLIDE=str(slide).lower())

    async def run() -> None:
        async with backend_for(settings, prefill=True) as backend:
            conv = Conversation(settings.llm.system_prompt, max_turns=4)
            for index in range(5):  # the fifth turn drops the oldest three
                text = turn(0, index)
                reply, _ = await backend.complete(conv.messages(text))
                conv.add_turn(text, reply)
            assert len(conv.turns) == 2
            reply, stats = await backend.complete(conv.messages("And what about lunch?"))
            assert reply.strip()
            if slide:  # the two kept turns were reused, only the new request evaluated
                assert "cache_slide" in stats.stages, stats
                assert stats.evaluated_prompt_tokens < 30, stats
                # Slid KV is right for this conversation but is no cache entry's truth:
                # it is never snapshotted.
                engine = backend.engine
                assert not engine.call(lambda: any(s.store_live() for s in engine.kv.seqs))
            else:  # the kept turns are evaluated again
                assert "cache_slide" not in stats.stages
                assert stats.evaluated_prompt_tokens > 60, stats

    asyncio.run(run())


def test_byte_cap_is_never_exceeded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, CACHE_DIR="", MAX_CACHE_BYTES="40MiB", MAX_TOKENS="16",
                             SYSTEM_PROMPT=home_system_prompt())

    async def run() -> None:
        async with backend_for(settings) as backend:
            convs = [Conversation(settings.llm.system_prompt) for _ in range(4)]
            for index in range(2):
                for client, conv in enumerate(convs):
                    text = turn(client, index)
                    reply, _ = await backend.complete(conv.messages(text))
                    conv.add_turn(text, reply)
                    stats = backend.cache.stats()
                    assert stats.bytes_held <= 40 * 1024 * 1024
            assert backend.cache.stats().evictions > 0

    asyncio.run(run())


def ask_once(settings: Settings, text: str) -> tuple[str, int, float]:
    async def run() -> tuple[str, int, float]:
        async with backend_for(settings) as backend:
            reply, stats = await backend.complete(
                [ChatMessage("system", settings.llm.system_prompt), ChatMessage("user", text)]
            )
            assert stats.ttft_s is not None
            return reply, stats.cached_tokens, stats.ttft_s

    return asyncio.run(run())


def test_restart_answers_warm_from_disk(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, SYSTEM_PROMPT=home_system_prompt(), MAX_TOKENS="8")
    _, cached_first, ttft_first = ask_once(settings, "Is the porch light on a schedule?")
    _, cached_second, ttft_second = ask_once(settings, "When does Biscuit eat?")
    assert cached_first == 0
    assert cached_second > 400  # the system prompt came from disk
    assert ttft_second < ttft_first / 3


def _scribble(cache_dir: Path, mode: str) -> int:
    """Damage every large record file diskcache wrote; returns how many."""
    files = [p for p in cache_dir.rglob("*.val") if p.stat().st_size > 10_000]
    for path in files:
        data = bytearray(path.read_bytes())
        if mode == "truncate":
            path.write_bytes(bytes(data[: len(data) // 2]))
        else:
            for i in range(len(data) // 2, len(data) // 2 + 64):
                data[i] ^= 0xFF
            path.write_bytes(bytes(data))
    return len(files)


@pytest.mark.parametrize("mode", ["truncate", "scribble"])
def test_corrupt_record_is_a_miss_with_a_warning(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, SYSTEM_PROMPT=home_system_prompt(), MAX_TOKENS="16",
                             CACHE_PERSIST_RECENT="0")
    reference, _, _ = ask_once(settings, "Who is Mia?")
    assert _scribble(tmp_path / "ctx-cache", mode) >= 1
    with caplog.at_level(logging.WARNING, logger="jarvis.llm.cache"):
        reply, cached, _ = ask_once(settings, "Who is Mia?")
    assert cached == 0  # a miss, never a wrong state
    assert reply == reference
    assert any("ignoring saved context" in r.getMessage() for r in caplog.records)
    # ... and it was rebuilt, so the next start is warm again.
    _, cached_again, _ = ask_once(settings, "Who is Leo?")
    assert cached_again > 400


def test_fingerprint_mismatch_is_a_miss(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, SYSTEM_PROMPT=home_system_prompt(), MAX_TOKENS="8")
    ask_once(settings, "Hello.")
    other = make_settings(tmp_path, SYSTEM_PROMPT=home_system_prompt(), MAX_TOKENS="8",
                          MODEL_CONTEXT_WINDOW="2048")
    _, cached, _ = ask_once(other, "Hello.")
    assert cached == 0
    _, cached_same, _ = ask_once(settings, "Hello again.")
    assert cached_same > 400


# --------------------------------------------------------------------------- healing


def jarvis_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("jarvis")]


@pytest.mark.parametrize("damage", ["record files deleted", "cache.db corrupt"])
def test_a_damaged_cache_directory_heals(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The next start is a miss with one warning that says what happened, answers the
    same, and saves the state again, so the start after that is warm."""
    settings = make_settings(tmp_path, MAX_TOKENS="8", CACHE_PERSIST_RECENT="0")
    reference, cached_first, _ = ask_once(settings, "Say hello.")
    assert cached_first == 0
    cache_dir = tmp_path / "ctx-cache"
    if damage == "record files deleted":
        files = list(cache_dir.rglob("*.val"))
        assert files
        for path in files:
            path.unlink()
    else:
        db = cache_dir / "cache.db"
        db.write_bytes(b"\x00garbage" * (db.stat().st_size // 8 + 1))
    with caplog.at_level(logging.WARNING):
        reply, cached, _ = ask_once(settings, "Say hello.")
    assert cached == 0 and reply == reference
    (message,) = jarvis_warnings(caplog)
    assert ("missing" if damage == "record files deleted" else "corrupt") in message
    assert "permission" not in message.lower()
    _, cached_again, _ = ask_once(settings, "Say hello.")
    assert cached_again > 30  # the system prompt's state was saved again


# --------------------------------------------------------------------------- memory


def test_room_is_made_before_a_snapshot_in_the_order_an_insert_would_evict() -> None:
    """The cache evicts *before* a snapshot is taken (so the process never holds the cap
    plus one state), choosing what the insert would have chosen: the conversation's own
    older state, which the new one will serve, not another conversation's."""
    store: PrefixStore[str] = PrefixStore(max_entries=10, max_bytes=100)
    other = store.insert((7, 8), "other conversation", 40)
    older = store.insert((1, 2), "this conversation, a turn ago", 40)  # the newest entry
    assert store.make_room((1, 2, 3), 40)
    assert older not in store and other in store
    assert store.nbytes + 40 <= 100
    assert store.insert((1, 2, 3), "this conversation", 40) is not None
    assert store.stats.evictions == 1  # the insert itself had nothing left to evict
    assert not store.make_room((9,), 101)  # could never fit: nothing is evicted
    assert len(store) == 2
    store._check_invariants()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux /proc")
def test_memory_of_dropped_states_goes_back_to_the_os(tmp_path: Path) -> None:
    """What the byte cap counts is what the process holds: dropping the cache's entries
    gives (nearly) all of the counted bytes back to the OS, after a run of conversation
    switches in which states were snapshotted, restored and evicted by the cap."""
    settings = make_settings(tmp_path, CACHE_DIR="", MAX_TOKENS="8", MAX_CACHE_BYTES="16MiB")

    async def run() -> tuple[int, int, int]:
        async with backend_for(settings, prefill=True) as backend:
            convs = [Conversation(settings.llm.system_prompt) for _ in range(6)]
            for index in range(3):
                for client, conv in enumerate(convs):
                    text = turn(client, index)
                    reply, _ = await backend.complete(conv.messages(text))
                    conv.add_turn(text, reply)
            engine = backend.engine

            def measure() -> tuple[int, int, int]:  # on the engine's thread: nothing runs
                stats = backend.cache.stats()
                assert stats.evictions > 0 and stats.bytes_held <= 16 * 1024 * 1024
                before = rss()
                backend.cache.clear()
                assert backend.cache.stats().bytes_held == 0
                return stats.bytes_held, before, rss()

            return await asyncio.to_thread(engine.call, measure)

    held, before, after = asyncio.run(run())
    assert held > 8 * 1024 * 1024
    assert before - after >= 0.97 * held, (held, before - after)
