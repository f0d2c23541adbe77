#!/usr/bin/env python3
"""Benchmark Jarvis's LLM latency on a realistic voice-assistant workload.

    python scripts/test_latency.py [MODEL_PATH] [--iterations N] [--concurrent]
                                   [--clients N] [--json FILE]

The workload: a ~600-token household system prompt, multi-turn follow-ups, short
spoken-style requests (``jarvis.evaluation.dialogues``). First one *cold* request (empty context,
empty cache: what a restart without the cache would pay), then the measured run:

* sequential (default): ``--clients`` conversations (default 1), ``--iterations``
  turns each, one request at a time, conversations interleaved round-robin;
* ``--concurrent``: the same conversations (default 4) as simultaneous clients. In the
  same process a sequential run of the same workload is measured first, and the
  p95 ratio printed (skip it with ``--no-baseline``).

Progress is printed per request; the latency tracker's report at the end, and with
``--json FILE`` as JSON. Configuration comes from the usual ``JARVIS_*`` variables;
MODEL_PATH overrides ``JARVIS_MODEL_PATH``. Persistence is off here so "cold" is cold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from jarvis.config import Settings, load_settings
from jarvis.errors import JarvisError
from jarvis.evaluation.dialogues import home_system_prompt, turn
from jarvis.latency import LatencySummary, LatencyTracker, RequestRecord
from jarvis.llm.base import ChatMessage
from jarvis.llm.dialogue import Conversation
from jarvis.llm.llama_cpp import LlamaCppBackend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="GGUF file (default: JARVIS_MODEL_PATH or starter)")
    p.add_argument("--iterations", type=int, default=5, help="turns per conversation (5)")
    p.add_argument("--concurrent", action="store_true", help="clients ask simultaneously")
    p.add_argument("--clients", type=int, default=None,
                   help="conversations (default 1 sequential, 4 concurrent)")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --concurrent: skip the sequential baseline run")
    p.add_argument("--system-prompt-file", type=Path, default=None,
                   help="system prompt to use instead of the bundled household prompt")
    args = p.parse_args(argv)
    if args.iterations < 1:
        p.error("--iterations must be at least 1")
    if args.clients is None:
        args.clients = 4 if args.concurrent else 1
    if args.clients < 1:
        p.error("--clients must be at least 1")
    return args


def load(args: argparse.Namespace) -> Settings:
    env = dict(os.environ)
    if args.model:
        env["JARVIS_MODEL_PATH"] = args.model
    env["JARVIS_CACHE_DIR"] = ""  # no persistence: the cold request must really be cold
    settings = load_settings(env)
    prompt = (args.system_prompt_file.read_text(encoding="utf-8").strip()
              if args.system_prompt_file else home_system_prompt())
    return replace(settings, llm=replace(settings.llm, system_prompt=prompt))


class Run:
    """One measured phase: conversations, a tracker, progress output."""

    def __init__(self, name: str, backend: LlamaCppBackend, settings: Settings,
                 clients: int, iterations: int) -> None:
        self.name = name
        self.backend = backend
        self.iterations = iterations
        self.tracker = LatencyTracker(spike_threshold_s=settings.latency.spike_threshold_s)
        self.conversations = [Conversation(settings.llm.system_prompt) for _ in range(clients)]
        self.done = 0
        self.total = clients * iterations
        self.tokens = 0
        self.wall_s = 0.0

    async def ask(self, client: int, index: int) -> None:
        conv = self.conversations[client]
        text = turn(client, index)
        try:
            reply, stats = await self.backend.complete(conv.messages(text))
        except JarvisError as exc:
            self.tracker.record(RequestRecord(total_s=0.0, error=str(exc), label=f"c{client}"))
            print(f"  [{self.name}] client {client} turn {index + 1}: ERROR {exc}", flush=True)
            return
        conv.add_turn(text, reply)
        self.tracker.record(stats.to_record(label=f"c{client}"))
        self.done += 1
        self.tokens += stats.completion_tokens
        print(f"  [{self.name} {self.done:>3}/{self.total}] client {client} turn {index + 1}: "
              f"ttft {stats.ttft_s or 0:.3f} s  total {stats.total_s:.3f} s  "
              f"queue {stats.queue_s:.3f} s  prompt {stats.prompt_tokens} "
              f"({stats.cached_tokens} cached)  {stats.completion_tokens} tok", flush=True)

    async def sequential(self) -> None:
        t = time.perf_counter()
        for index in range(self.iterations):
            for client in range(len(self.conversations)):
                await self.ask(client, index)
        self.wall_s = time.perf_counter() - t

    async def concurrent(self) -> None:
        async def client_loop(client: int) -> None:
            for index in range(self.iterations):
                await self.ask(client, index)

        t = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(len(self.conversations))))
        self.wall_s = time.perf_counter() - t

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole phase, all clients together."""
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


async def cold_request(backend: LlamaCppBackend, settings: Settings) -> RequestRecord:
    """One request on an empty context and cache: the cost the cache removes."""
    messages = [ChatMessage("system", settings.llm.system_prompt),
                ChatMessage("user", "Hello Jarvis, are you there?")]
    _, stats = await backend.complete(messages)
    print(f"  [cold] ttft {stats.ttft_s or 0:.3f} s  total {stats.total_s:.3f} s  "
          f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} cached)", flush=True)
    return stats.to_record(label="cold", warmup=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = load(args)
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=False)
    t = time.perf_counter()
    await backend.start()
    info = backend.info()
    print(f"model {settings.llm.model_path.name} · {info['gpu']} · {settings.llm.n_threads} "
          f"threads · context cache {'on' if settings.cache.enabled else 'off'} · system prompt "
          f"{info['system_prompt_tokens']} tokens · ready in {time.perf_counter() - t:.2f} s",
          flush=True)
    try:
        cold = await cold_request(backend, settings)
        baseline: LatencySummary | None = None
        base: Run | None = None
        if args.concurrent and not args.no_baseline:
            print(f"sequential baseline: {args.clients} conversations x {args.iterations} turns",
                  flush=True)
            base = Run("seq", backend, settings, args.clients, args.iterations)
            await base.sequential()
            baseline = base.tracker.summary()
        mode = "concurrent" if args.concurrent else "sequential"
        print(f"{mode}: {args.clients} conversation(s) x {args.iterations} turns", flush=True)
        run = Run("conc" if args.concurrent else "seq", backend, settings, args.clients,
                  args.iterations)
        run.tracker.record(cold)
        await (run.concurrent() if args.concurrent else run.sequential())
        cache_stats = backend.cache.stats()
    finally:
        await backend.close()

    summary = run.tracker.summary()
    print()
    print(summary.format_table())
    warm_ttft = summary.ttft.mean if summary.ttft else None
    report: dict[str, Any] = summary.to_dict()
    report.update(
        iterations=args.iterations,
        concurrent=args.concurrent,
        clients=args.clients,
        model=str(settings.llm.model_path),
        cold_ttft_s=cold.ttft_s,
        warm_ttft_mean_s=warm_ttft,
        warm_over_cold=ratio(warm_ttft, cold.ttft_s),
        context_cache=cache_stats.to_dict(),
    )
    over_5s = sum(1 for r in run.tracker.records() if not r.warmup and r.total_s > 5.0)
    report.update(requests_over_5s=over_5s, aggregate_tokens_per_s=run.tokens_per_s,
                  parallel=info.get("parallel"))
    print(f"\ncold first turn ttft {cold.ttft_s or 0:.3f} s; warm turns ttft mean "
          f"{warm_ttft or 0:.3f} s: warm/cold = {report['warm_over_cold'] or 0:.3f} "
          f"(target <= 0.100)")
    if baseline is not None and baseline.total is not None and summary.total is not None:
        report["baseline"] = baseline.to_dict()
        report["p95_over_sequential"] = ratio(summary.total.p95, baseline.total.p95)
        assert base is not None
        report["sequential_tokens_per_s"] = base.tokens_per_s
        report["throughput_over_sequential"] = ratio(run.tokens_per_s, base.tokens_per_s)
        print(f"concurrent p95 {summary.total.p95:.3f} s vs sequential p95 "
              f"{baseline.total.p95:.3f} s: ratio {report['p95_over_sequential']:.2f} "
              f"(target <= 1.80); requests over 5 s: {over_5s}; errors {summary.errors}, "
              f"answered {run.done}/{run.total}")
        print(f"generated tokens/s, all clients together: {run.tokens_per_s:.1f} concurrent "
              f"vs {base.tokens_per_s:.1f} one at a time: "
              f"{report['throughput_over_sequential'] or 0:.2f}x (target >= 2.00); "
              f"JARVIS_PARALLEL={info.get('parallel')}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = asyncio.run(main_async(args))
    except JarvisError as exc:
        print(f"test_latency: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
