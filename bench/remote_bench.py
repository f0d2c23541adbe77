#!/usr/bin/env python3
"""Remote-backend benchmark: the context-cache workload, in-process and on llama.cpp's
own server (the ``xllamacpp`` wheel), with and without Jarvis in front, in one run.

Workload (as bench/cache_bench.py): 4 conversations × 5 turns under the ~1,139-token
household system prompt, round-robin, greedy, 32 tokens a reply.

1. ``in-process``            the in-process engine (radix context cache, prefilled);
2. ``server 1 slot``         the server with one slot, asked by a bare HTTP client
                             (``cache_prompt``, the system prompt evaluated first);
3. ``jarvis → 1 slot``       the same server through Jarvis's remote backend;
4. ``server 4 slots``        one slot per conversation (``id_slot``), bare client;
5. ``jarvis → 4 slots``      the same through Jarvis (slot pinning, restored prompt);
6. ``jarvis → 4 slots ×4``   the 4 conversations at once through Jarvis.

Each server row starts a fresh server (``--cache-ram 0``: with the conversations in
slots, llama.cpp's host-memory prompt cache only copies idle slots, tens of
milliseconds before each prompt that its own timing does not show). Time to first
token is measured where the caller sees the first piece of text. ``server ttft`` is
the server's own figure (``timings.prompt_ms``: from taking the request to its first
token), so ``overhead`` = caller's ttft − server's is what the HTTP hop, the server's
parsing and tokenizing, and the client add; the bare client's row shows how much of
it is not Jarvis's. Targets: the remote backend adds ≤ 15 ms over the server's own
timing; 4 concurrent conversations on 4 slots have a p95 ≤ 2× the sequential p95.

    python bench/remote_bench.py [--turns 5] [--conversations 4] [--threads N]
                                 [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from jarvis.config import Settings, load_settings, physical_cores
from jarvis.evaluation.dialogues import home_system_prompt, turn
from jarvis.latency import percentile
from jarvis.llm.base import ChatMessage, GenerationStats
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.llm.remote import RemoteBackend
from jarvis.llm.remote_server import LlamaServer

MAX_TOKENS = 32
OVERHEAD_TARGET_S = 0.015
CONCURRENCY_TARGET = 2.0


@dataclass
class Row:
    """One way of answering the workload, and what each turn cost."""

    way: str
    ttft: list[float] = field(default_factory=list)
    server_ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    hits: int = 0
    wall_s: float = 0.0

    def add(self, ttft: float, prompt: int, cached: int, server_ttft: float | None) -> None:
        self.ttft.append(ttft)
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.hits += cached > 0
        if server_ttft is not None:
            self.server_ttft.append(server_ttft)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.ttft)
        out: dict[str, Any] = {
            "way": self.way, "requests": len(self.ttft),
            "ttft_mean_s": statistics.fmean(self.ttft),
            "ttft_median_s": percentile(ordered, 50), "ttft_p95_s": percentile(ordered, 95),
            "reuse": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None,
            "hit_rate": self.hits / len(self.ttft), "wall_s": self.wall_s,
        }
        if len(self.server_ttft) == len(self.ttft):
            over = sorted(t - s for t, s in zip(self.ttft, self.server_ttft, strict=True))
            out.update(server_ttft_mean_s=statistics.fmean(self.server_ttft),
                       overhead_mean_s=statistics.fmean(over),
                       overhead_median_s=percentile(over, 50),
                       overhead_p95_s=percentile(over, 95))
        return out


THREADS = physical_cores()
"""Threads for the in-process engine and the server alike (``--threads``)."""


def bench_settings(url: str = "") -> Settings:
    env = dict(os.environ, JARVIS_CACHE_DIR="", JARVIS_TEMPERATURE="0",
               JARVIS_MAX_TOKENS=str(MAX_TOKENS), JARVIS_LLM_URL=url,
               JARVIS_N_THREADS=str(THREADS))
    s = load_settings(env)
    return replace(s, llm=replace(s.llm, system_prompt=home_system_prompt()))


def log(row: Row, client: int, index: int, ttft: float, prompt: int, cached: int,
        server_ttft: float | None) -> None:
    server = f", server {server_ttft:.3f} s" if server_ttft is not None else ""
    print(f"  [{row.way}] conv {client} turn {index + 1}: ttft {ttft:.3f} s{server} "
          f"({cached}/{prompt} reused)", flush=True)


Ask = Callable[[int, list[ChatMessage]], Awaitable[tuple[str, float, int, int, float | None]]]
"""(conversation, messages) -> (reply, ttft, prompt tokens, cached tokens, server ttft)."""


async def run_workload(row: Row, ask: Ask, conversations: int, turns: int, system: str, *,
                       concurrent: bool = False) -> Row:
    convs = [Conversation(system) for _ in range(conversations)]

    async def one(client: int, index: int) -> None:
        text = turn(client, index)
        reply, ttft, prompt, cached, server = await ask(client, convs[client].messages(text))
        convs[client].add_turn(text, reply)
        row.add(ttft, prompt, cached, server)
        log(row, client, index, ttft, prompt, cached, server)

    async def conversation(client: int) -> None:
        for index in range(turns):
            await one(client, index)

    t0 = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    else:
        for index in range(turns):
            for client in range(conversations):
                await one(client, index)
    row.wall_s = time.perf_counter() - t0
    return row


# --------------------------------------------------------------------------- the ways


async def in_process(conversations: int, turns: int) -> Row:
    settings = bench_settings()
    backend = LlamaCppBackend(settings.llm, settings.cache)
    await backend.start()

    async def ask(_: int, messages: list[ChatMessage]) -> tuple[str, float, int, int, None]:
        t0 = time.perf_counter()
        ttft, parts, stream = None, [], backend.stream_chat(messages)
        async for piece in stream:
            ttft = ttft or time.perf_counter() - t0
            parts.append(piece)
        stats = stream.stats
        assert stats is not None
        return "".join(parts), ttft or stats.total_s, stats.prompt_tokens, \
            stats.cached_tokens, None

    try:
        return await run_workload(Row("in-process"), ask, conversations, turns,
                                  settings.llm.system_prompt)
    finally:
        await backend.close()


async def bare_server(url: str, slots: int, conversations: int, turns: int) -> Row:
    """A bare client: one streamed request per turn, conversation i on slot i % slots,
    the system prompt evaluated into every slot first."""
    system = home_system_prompt()
    # llama.cpp's server closes the connection after a streamed answer: a client that
    # reused it at once would find it closed, so each request asks for a fresh one.
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 headers={"Connection": "close"}) as client:

        async def request(slot: int, messages: list[ChatMessage],
                          max_tokens: int = MAX_TOKENS) -> tuple[str, float, int, int, float]:
            body = {"messages": [{"role": m.role, "content": m.content} for m in messages],
                    "stream": True, "max_tokens": max_tokens, "temperature": 0.0,
                    "cache_prompt": True, "id_slot": slot}
            t0 = time.perf_counter()
            ttft: float | None = None
            parts: list[str] = []
            timings: dict[str, Any] = {}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    timings = event.get("timings") or timings
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            ttft = ttft or time.perf_counter() - t0
                            parts.append(text)
            prompt_n, cache_n = int(timings.get("prompt_n", 0)), int(timings.get("cache_n", 0))
            return ("".join(parts), ttft or time.perf_counter() - t0, prompt_n + cache_n,
                    cache_n, float(timings.get("prompt_ms", 0)) / 1000)

        warm = [ChatMessage("system", system), ChatMessage("user", "Hello.")]
        await asyncio.gather(*(request(i, warm, 1) for i in range(slots)))

        async def ask(conv: int, messages: list[ChatMessage]
                      ) -> tuple[str, float, int, int, float | None]:
            return await request(conv % slots, messages)

        return await run_workload(Row(f"server {slots} slot{'s' if slots > 1 else ''}"),
                                  ask, conversations, turns, system)


async def through_jarvis(url: str, name: str, conversations: int, turns: int, *,
                         concurrent: bool = False) -> Row:
    backend = RemoteBackend(bench_settings(url).llm)
    await backend.start()
    print(f"  [{name}] remote backend ready in {backend.start_s:.2f} s "
          f"(system prompt {backend.persistence}, {backend.info()['slots']} slots)", flush=True)

    async def ask(_: int, messages: list[ChatMessage]
                  ) -> tuple[str, float, int, int, float | None]:
        t0 = time.perf_counter()
        ttft, parts, stream = None, [], backend.stream_chat(messages)
        async for piece in stream:
            ttft = ttft or time.perf_counter() - t0
            parts.append(piece)
        stats: GenerationStats | None = stream.stats
        assert stats is not None
        return ("".join(parts), ttft or stats.total_s, stats.prompt_tokens,
                stats.cached_tokens, stats.stages.get("server_prompt_eval"))

    try:
        return await run_workload(Row(name), ask, conversations, turns,
                                  home_system_prompt(), concurrent=concurrent)
    finally:
        await backend.close()


# --------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'way':<22} {'n':>3} {'ttft mean':>10} {'median':>8} {'p95':>8} "
            f"{'server ttft':>11} {'overhead':>9} {'ovh p95':>8} {'reuse':>6} {'hits':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def ms(key: str, r: dict[str, Any] = r) -> str:
            return f"{1000 * r[key]:.1f} ms" if key in r else "-"
        lines.append(
            f"{r['way']:<22} {r['requests']:>3} {r['ttft_mean_s']:>8.3f} s "
            f"{r['ttft_median_s']:>6.3f} s {r['ttft_p95_s']:>6.3f} s "
            f"{ms('server_ttft_mean_s'):>11} {ms('overhead_mean_s'):>9} "
            f"{ms('overhead_p95_s'):>8} "
            f"{(r['reuse'] or 0):>6.1%} {r['hit_rate']:>5.0%}")
    return "\n".join(lines)


def verdicts(by_way: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for way in ("jarvis → 1 slot", "jarvis → 4 slots"):
        row, bare = by_way.get(way), by_way.get(way.replace("jarvis →", "server"))
        if row is None or "overhead_mean_s" not in row:
            continue
        ok = row["overhead_mean_s"] <= OVERHEAD_TARGET_S
        ref = (f"; a bare client adds {1000 * bare['overhead_mean_s']:.1f} ms"
               if bare and "overhead_mean_s" in bare else "")
        out.append(f"[{'PASS' if ok else 'FAIL'}] {way}: adds "
                   f"{1000 * row['overhead_mean_s']:.1f} ms (mean; median "
                   f"{1000 * row['overhead_median_s']:.1f} ms) to the server's own time to "
                   f"first token (target <= {1000 * OVERHEAD_TARGET_S:.0f} ms){ref}")
    seq, conc = by_way.get("jarvis → 4 slots"), by_way.get("jarvis → 4 slots ×4")
    if seq and conc:
        ratio = conc["ttft_p95_s"] / seq["ttft_p95_s"]
        out.append(f"[{'PASS' if ratio <= CONCURRENCY_TARGET else 'FAIL'}] 4 concurrent "
                   f"conversations on 4 slots: p95 {conc['ttft_p95_s']:.3f} s = {ratio:.2f}× "
                   f"the sequential p95 {seq['ttft_p95_s']:.3f} s (target <= "
                   f"{CONCURRENCY_TARGET:g}×); whole workload {conc['wall_s']:.1f} s vs "
                   f"{seq['wall_s']:.1f} s")
    return out


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from jarvis.models import default_llm_path

    model, threads = default_llm_path(), THREADS
    c, t = args.conversations, args.turns
    rows = [(await in_process(c, t)).summary()]
    ways = [(1, "bare"), (1, "jarvis"), (4, "bare"), (4, "jarvis"), (4, "concurrent")]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (slots, mode) in enumerate(ways):  # a fresh server for each way
            suffix = "s" if slots > 1 else ""
            # --cache-ram 0: llama.cpp's host-memory prompt cache copies each idle slot's
            # state out (tens of ms before the next prompt, outside its prompt_ms) and
            # brought no reuse here: slots hold the conversations.
            server = LlamaServer(model, slots=slots, ctx_per_slot=4096, threads=threads, poll=0,
                                 cache_ram_mib=0, slot_save_path=Path(tmp) / f"slots{i}",
                                 log_file=Path(tmp) / "server.log")
            print(f"starting llama.cpp server: {slots} slot{suffix}", flush=True)
            url = server.start()
            try:
                if mode == "bare":
                    rows.append((await bare_server(url, slots, c, t)).summary())
                else:
                    name = f"jarvis → {slots} slot{suffix}" + (" ×4" if mode == "concurrent"
                                                                 else "")
                    rows.append((await through_jarvis(url, name, c, t,
                                                      concurrent=mode == "concurrent"))
                                .summary())
            finally:
                server.stop()
    return rows


def main() -> int:
    global THREADS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="threads for the in-process engine and the server (physical cores)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    args = p.parse_args()
    THREADS = args.threads
    rows = asyncio.run(run(args))
    print()
    print(f"Remote backend: {args.conversations} conversations × {args.turns} turns, "
          f"household system prompt, {MAX_TOKENS} tokens, greedy, {THREADS} threads")
    print(table(rows))
    for line in verdicts({r["way"]: r for r in rows}):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
