#!/usr/bin/env python3
"""Context-cache benchmark: one interleaved workload, four ways, in one process.

Workload: 4 conversations sharing the ~1,100-token household system prompt, 5 turns
each, round-robin (kitchen, bedroom, MQTT, CLI... taking turns on one model).

1. ``no cache``   llama-cpp-python's ``create_chat_completion`` with no cache set (it
                  still reuses the prefix of whatever is live in its context);
2. ``LlamaRAMCache`` the same with llama-cpp-python's own RAM cache;
3. ``jarvis cold`` our backend: radix-tree prefix cache, snapshots when switching;
4. ``jarvis``     the same as deployed: the system prompt prefilled at start-up (or
                  restored from disk), so no request pays for it.

All three answer greedily (temperature 0) with the same token limit. Then a restart
test with real processes: ``jarvis ask --json`` twice with persistence on, the second
process's time to first token compared with the first (cold) and with a warm one.

    python bench/cache_bench.py [--turns 5] [--conversations 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from jarvis.config import Settings, load_settings
from jarvis.evaluation.dialogues import HOME_SYSTEM_PROMPT_FILE, home_system_prompt, turn
from jarvis.latency import percentile
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend

MAX_TOKENS = 32
THINK_TIME_S = 0.0
"""Pause after each reply (``--think-time``): a person listening and answering. Our
backend uses idle time to snapshot and pre-evaluate; the others cannot."""


def settings_for_bench() -> Settings:
    env = dict(os.environ, JARVIS_CACHE_DIR="", JARVIS_TEMPERATURE="0",
               JARVIS_MAX_TOKENS=str(MAX_TOKENS))
    s = load_settings(env)
    return replace(s, llm=replace(s.llm, system_prompt=home_system_prompt()))


def summarise(name: str, ttfts: list[float], hits: int, queries: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ordered = sorted(ttfts)
    row = {
        "way": name,
        "requests": len(ttfts),
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_median_s": percentile(ordered, 50),
        "ttft_p95_s": percentile(ordered, 95),
        "hit_rate": hits / queries if queries else None,
    }
    row.update(extra or {})
    return row


def plain_llama(settings: Settings, conversations: int, turns: int,
                make_cache: Callable[[], Any] | None, name: str) -> dict[str, Any]:
    """llama-cpp-python used the usual way: create_chat_completion(stream=True)."""
    import llama_cpp

    s = settings.llm
    llm = llama_cpp.Llama(model_path=str(s.model_path), n_ctx=s.context_window,
                          n_threads=s.n_threads, n_threads_batch=s.n_threads_batch,
                          n_batch=s.n_batch, n_ubatch=s.n_ubatch, verbose=False)
    cache = make_cache() if make_cache else None
    if cache is not None:
        llm.set_cache(cache)
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": s.system_prompt}] for _ in range(conversations)
    ]
    ttfts: list[float] = []
    hits = 0
    for index in range(turns):
        for client in range(conversations):
            history = histories[client]
            history.append({"role": "user", "content": turn(client, index)})
            if cache is not None:
                prompt = _prompt_tokens(llm, history)
                hits += _ram_cache_has_prefix(cache, prompt)
            t0 = time.perf_counter()
            first: float | None = None
            parts: list[str] = []
            chunks: Any = llm.create_chat_completion(messages=history,  # type: ignore[arg-type]
                                                     max_tokens=MAX_TOKENS, temperature=0.0,
                                                     stream=True)
            for chunk in chunks:
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    if first is None:
                        first = time.perf_counter() - t0
                    parts.append(delta)
            ttfts.append(first if first is not None else time.perf_counter() - t0)
            history.append({"role": "assistant", "content": "".join(parts).strip()})
            print(f"  [{name}] conv {client} turn {index + 1}: ttft {ttfts[-1]:.3f} s",
                  flush=True)
            time.sleep(THINK_TIME_S)
    extra: dict[str, Any] = {}
    if cache is not None:
        states = list(cache.cache_state.values())
        extra["cache_entries"] = len(states)
        extra["cache_bytes_reported"] = int(cache.cache_size)
        extra["cache_bytes_real"] = sum(
            st.llama_state_size + st.scores.nbytes + st.input_ids.nbytes for st in states
        )
    llm.close()
    return summarise(name, ttfts, hits, conversations * turns if cache is not None else 0, extra)


def _prompt_tokens(llm: Any, history: list[dict[str, str]]) -> list[int]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                              eos_token="<|im_end|>", bos_token="<|im_start|>")
    prompt = fmt(messages=cast(Any, history)).prompt
    tokens: list[int] = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    return tokens


def _ram_cache_has_prefix(cache: Any, tokens: list[int]) -> bool:
    """Whether LlamaRAMCache would serve any prefix of ``tokens`` (its own lookup)."""
    try:
        return cache._find_longest_prefix_key(tuple(tokens)) is not None
    except AttributeError:
        return False


async def jarvis_way(settings: Settings, conversations: int, turns: int, *, prefill: bool,
                     name: str) -> dict[str, Any]:
    """Our backend. ``prefill``: the system prompt is evaluated (or restored from disk)
    at start-up, as ``jarvis run`` does; without it the first request pays for it."""
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=prefill)
    await backend.start()
    convs = [Conversation(settings.llm.system_prompt) for _ in range(conversations)]
    ttfts: list[float] = []
    max_bytes_held = 0
    try:
        for index in range(turns):
            for client, conv in enumerate(convs):
                text = turn(client, index)
                reply, stats = await backend.complete(conv.messages(text))
                conv.add_turn(text, reply)
                ttfts.append(stats.ttft_s or stats.total_s)
                max_bytes_held = max(max_bytes_held, backend.cache.stats().bytes_held)
                print(f"  [{name}] conv {client} turn {index + 1}: ttft {ttfts[-1]:.3f} s "
                      f"({stats.cached_tokens}/{stats.prompt_tokens} cached)", flush=True)
                await asyncio.sleep(THINK_TIME_S)
        cache = backend.cache.stats()
    finally:
        await backend.close()
    return summarise(name, ttfts, cache.hits, cache.queries, {
        "reuse_rate": cache.reuse_rate,
        "restores": cache.restores,
        "restore_mean_ms": 1000 * cache.restore_s / cache.restores if cache.restores else None,
        "save_mean_ms": 1000 * cache.save_s / cache.saves if cache.saves else None,
        "max_bytes_held": max_bytes_held,
        "max_bytes_cap": settings.cache.max_bytes,
    })


def restart_test() -> dict[str, Any]:
    """Two separate ``jarvis ask`` processes sharing a cache directory."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JARVIS_CACHE_DIR=tmp, JARVIS_MAX_TOKENS="8",
                   JARVIS_SYSTEM_PROMPT_FILE=str(HOME_SYSTEM_PROMPT_FILE))
        env.pop("JARVIS_SYSTEM_PROMPT", None)
        results = []
        for text in ("Is the porch light on a schedule?", "When does Biscuit get fed?"):
            out = subprocess.run([sys.executable, "-m", "jarvis", "ask", text, "--json"],
                                 env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout))
    cold, restarted = results
    print(f"  [restart] first process ttft {cold['ttft_s']:.3f} s "
          f"({cold['cached_tokens']} cached); second process ttft "
          f"{restarted['ttft_s']:.3f} s ({restarted['cached_tokens']} cached)", flush=True)
    return {"first_process_ttft_s": cold["ttft_s"], "second_process_ttft_s": restarted["ttft_s"],
            "second_cached_tokens": restarted["cached_tokens"],
            "second_over_first": restarted["ttft_s"] / cold["ttft_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--think-time", type=float, default=0.0,
                   help="seconds between a reply and the next request (default 0: back to back)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    global THINK_TIME_S
    THINK_TIME_S = args.think_time
    settings = settings_for_bench()
    from llama_cpp.llama_cache import LlamaRAMCache

    print(f"workload: {args.conversations} conversations x {args.turns} turns, round-robin, "
          f"shared system prompt, greedy, max {MAX_TOKENS} tokens, think time "
          f"{THINK_TIME_S:g} s", flush=True)
    rows = [
        plain_llama(settings, args.conversations, args.turns, None, "no cache"),
        plain_llama(settings, args.conversations, args.turns,
                    lambda: LlamaRAMCache(capacity_bytes=settings.cache.max_bytes),
                    "LlamaRAMCache"),
        asyncio.run(jarvis_way(settings, args.conversations, args.turns, prefill=False,
                               name="jarvis cold")),
        asyncio.run(jarvis_way(settings, args.conversations, args.turns, prefill=True,
                               name="jarvis")),
    ]
    restart = restart_test()
    ours = rows[3]
    print()
    print(f"{'way':<15} {'n':>3} {'ttft mean':>10} {'median':>9} {'p95':>9} {'hit rate':>9}")
    for row in rows:
        hit = f"{row['hit_rate']:.0%}" if row["hit_rate"] is not None else "n/a"
        print(f"{row['way']:<15} {row['requests']:>3} {row['ttft_mean_s']:>9.3f}s "
              f"{row['ttft_median_s']:>8.3f}s {row['ttft_p95_s']:>8.3f}s {hit:>9}")
    speedups = {row["way"]: row["ttft_mean_s"] / ours["ttft_mean_s"] for row in rows[:3]}
    print()
    print("'jarvis' runs as deployed (system prompt prefilled at start-up or restored from disk);")
    print("'jarvis cold' makes its first request pay for the system prompt, like the others.")
    for way, factor in speedups.items():
        print(f"jarvis mean ttft is {factor:.1f}x faster than {way} (target >= 3x)")
    cold = rows[2]
    for way in ("no cache", "LlamaRAMCache"):
        base = next(r for r in rows if r["way"] == way)
        print(f"jarvis cold mean ttft is {base['ttft_mean_s'] / cold['ttft_mean_s']:.1f}x faster "
              f"than {way}; median {base['ttft_median_s'] / cold['ttft_median_s']:.1f}x")
    print(f"jarvis hit rate {ours['hit_rate']:.0%} (target >= 90%); reused "
          f"{ours['reuse_rate']:.0%} of prompt tokens; restore {ours['restore_mean_ms']:.1f} ms, "
          f"snapshot {ours['save_mean_ms']:.1f} ms on average")
    print(f"jarvis cache held at most {ours['max_bytes_held'] / 1e6:.1f} MB "
          f"(cap {ours['max_bytes_cap'] / 1e6:.0f} MB)")
    ram = rows[1]
    print(f"LlamaRAMCache reports {ram['cache_bytes_reported'] / 1e6:.1f} MB for "
          f"{ram['cache_entries']} entries but holds {ram['cache_bytes_real'] / 1e6:.1f} MB "
          "(its counter misses the scores array)")
    warm = ours["ttft_median_s"]
    print(f"restart: second process ttft {restart['second_process_ttft_s']:.3f} s = "
          f"{restart['second_over_first']:.2f}x the cold first process (target <= 0.20), "
          f"{restart['second_process_ttft_s'] / warm:.2f}x a warm request (target <= 2)")
    if args.json:
        args.json.write_text(json.dumps({"ways": rows, "speedups": speedups,
                                         "restart": restart}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
