#!/usr/bin/env python3
"""Conversations that stay sane, and a dialogue-quality baseline, on the starter model
with the bundled household system prompt and the default sampling settings.

1. repetition  several 20-turn conversations (text turns through the real responder,
               each with its own conversation id) in which a quarter of the requests
               are deliberately misheard (``jarvis.evaluation.dialogues.garble``:
               "a good bedtime" -> "a good man time"). Reported: the share of replies
               whose opening (first 4 normalized words) repeats an earlier reply's
               opening in the same conversation, with the repetition guard on and off
               (same requests, same run), the guard's regenerations, and the mean time
               per turn each way. Target with the guard on: <= 10 %.
2. quality     20 questions with checkable answers (capitals, arithmetic, unit
               conversions, household facts from the system prompt) asked in one
               conversation, scored by keyword/number match
               (``jarvis.evaluation.quality``).

    python bench/dialogue_bench.py [--conversations 4] [--turns 20] [--max-tokens 48]
                                   [--verbose] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jarvis.config import Settings, load_settings
from jarvis.devices.device_map import DeviceMap
from jarvis.evaluation.dialogues import HOME_SYSTEM_PROMPT_FILE, garble, garbled_turns, session
from jarvis.evaluation.quality import QUESTIONS, is_correct, score
from jarvis.llm.base import LLMBackend
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.voice.assembly import make_responder
from jarvis.voice.events import Outcome, Source
from jarvis.voice.repetition import opening
from jarvis.voice.responder import Responder
from jarvis.voice.turn import Turn


@dataclass
class Way:
    """One way of answering (guard on or off) over all conversations."""

    name: str
    responder: Responder
    replies: int = 0
    repeats: int = 0
    repeats_after_garble: int = 0
    replies_after_garble: int = 0
    failed: int = 0
    seconds: list[float] = field(default_factory=list)
    openings: list[list[str]] = field(default_factory=list)
    """Per conversation, each reply's opening (or its text when shorter)."""

    @property
    def share(self) -> float:
        return self.repeats / self.replies if self.replies else 0.0


async def conversation(way: Way, index: int, turns: int, max_tokens: int,
                       verbose: bool) -> None:
    """Session ``index`` with its misheard turns, in conversation ``<way>-<index>``."""
    requests = session(index, turns)
    misheard = set(garbled_turns(index, turns))
    seen: set[tuple[str, ...]] = set()
    first_garble = min(misheard, default=turns)
    heads: list[str] = []
    for i, request in enumerate(requests):
        text = garble(request, index) if i in misheard else request
        turn = Turn(Source.CLI if index % 2 == 0 else Source.MQTT, f"{way.name}-{index}",
                    request=text, speak=False, max_tokens=max_tokens)
        result = await way.responder.respond(turn)
        if result.outcome is not Outcome.ANSWERED:
            way.failed += 1
            continue
        way.seconds.append(result.latency.get("total", 0.0))
        head = opening(result.reply)
        repeated = head is not None and head in seen
        if head is not None:
            seen.add(head)
        way.replies += 1
        way.repeats += repeated
        if i > first_garble:
            way.replies_after_garble += 1
            way.repeats_after_garble += repeated
        heads.append(" ".join(head) if head else result.reply.strip()[:30])
        if verbose:
            mark = "R" if repeated else ("g" if result.regenerated else " ")
            print(f"    {way.name:<3} {index}.{i:<2} {mark} {'*' if i in misheard else ' '} "
                  f"{text[:38]:<38} | {result.reply.strip()[:70]!r}", flush=True)
    way.openings.append(heads)


async def repetition(settings: Settings, backend: LLMBackend, args: argparse.Namespace
                     ) -> dict[str, Any]:
    ways = []
    for name, guard in (("on", True), ("off", False)):
        responder, _ = make_responder(backend, settings, DeviceMap())
        responder.repetition_guard = guard
        ways.append(Way(name, responder))
    for index in range(args.conversations):
        t0 = time.monotonic()
        for way in ways:  # same requests each way, one after the other
            await conversation(way, index, args.turns, args.max_tokens, args.verbose)
        print(f"  conversation {index + 1}/{args.conversations} done in "
              f"{time.monotonic() - t0:.0f} s ({len(garbled_turns(index, args.turns))} of "
              f"{args.turns} requests misheard)", flush=True)
    on, off = ways
    print()
    print(f"repetition: {args.conversations} conversations x {args.turns} turns, "
          f"a quarter misheard, max {args.max_tokens} tokens, temperature "
          f"{settings.llm.temperature:g}")
    print(f"{'guard':<6} {'replies':>7} {'repeat opening':>15} {'after 1st garble':>17} "
          f"{'regenerated':>12} {'failed':>7} {'mean s/turn':>12} {'median':>7}")
    for way in ways:
        after = (way.repeats_after_garble / way.replies_after_garble
                 if way.replies_after_garble else 0.0)
        print(f"{way.name:<6} {way.replies:>7} {way.repeats:>5} = {way.share:>6.1%} "
              f"{after:>17.1%} {way.responder.regenerated:>12} {way.failed:>7} "
              f"{statistics.fmean(way.seconds) if way.seconds else 0.0:>11.2f}s "
              f"{statistics.median(way.seconds) if way.seconds else 0.0:>6.2f}s")
    ratio = on.share / off.share if off.share else float("nan")
    time_ratio = (statistics.fmean(on.seconds) / statistics.fmean(off.seconds)
                  if on.seconds and off.seconds else float("nan"))
    print(f"guard on / off: repeated openings {ratio:.2f}x, time per turn {time_ratio:.2f}x; "
          f"target with the guard on <= 10 %: {'met' if on.share <= 0.10 else 'NOT met'}")
    return {w.name: {"replies": w.replies, "repeats": w.repeats, "share": w.share,
                     "regenerated": w.responder.regenerated, "failed": w.failed,
                     "mean_s": statistics.fmean(w.seconds) if w.seconds else None,
                     "openings": w.openings} for w in ways}


async def quality(settings: Settings, backend: LLMBackend, args: argparse.Namespace
                  ) -> dict[str, Any]:
    responder, _ = make_responder(backend, settings, DeviceMap())
    replies: list[str] = []
    print()
    print(f"dialogue quality: {len(QUESTIONS)} questions in one conversation "
          f"({settings.llm.model_path.name})")
    print(f"{'#':>2} {'category':<10} {'ok':<3} {'question':<46} reply")
    for i, question in enumerate(QUESTIONS):
        result = await responder.respond(Turn(Source.CLI, "quality", request=question.text,
                                              speak=False, max_tokens=args.max_tokens))
        reply = " ".join(result.reply.split())
        replies.append(reply)
        ok = "yes" if is_correct(question, reply) else "no"
        print(f"{i + 1:>2} {question.category:<10} {ok:<3} {question.text[:46]:<46} "
              f"{reply[:70]}", flush=True)
    result_score = score(QUESTIONS, replies)
    parts = " · ".join(f"{c} {r}/{t}" for c, (r, t) in result_score.by_category.items())
    print(f"score: {result_score.right}/{result_score.total} = {result_score.share:.0%} "
          f"({parts})")
    return {"right": result_score.right, "total": result_score.total,
            "by_category": result_score.by_category, "replies": replies}


async def main_async(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    t0 = time.monotonic()
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=True)
    await backend.start()
    print(f"model {settings.llm.model_path.name} ready in {time.monotonic() - t0:.1f} s; "
          f"system prompt {HOME_SYSTEM_PROMPT_FILE.name}, history "
          f"{settings.pipeline.history_turns} turns\n", flush=True)
    try:
        report: dict[str, Any] = {"repetition": await repetition(settings, backend, args),
                  "quality": await quality(settings, backend, args)}
    finally:
        await backend.close()
    report["seconds"] = time.monotonic() - t0
    print(f"\ntotal {report['seconds']:.0f} s")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--verbose", action="store_true", help="print every turn")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jarvis-dialogue-bench-") as tmp:
        empty = Path(tmp) / "empty.env"
        empty.touch()
        env = {k: v for k, v in os.environ.items() if k.startswith("JARVIS_")}
        if "JARVIS_SYSTEM_PROMPT" not in env:
            env.setdefault("JARVIS_SYSTEM_PROMPT_FILE", str(HOME_SYSTEM_PROMPT_FILE))
        env.setdefault("JARVIS_MAX_TOKENS", str(args.max_tokens))
        env.setdefault("JARVIS_SEED", "1234")
        env["JARVIS_CACHE_DIR"] = str(Path(tmp) / "ctx")
        settings = load_settings(env, env_file=empty)
        report = asyncio.run(main_async(args, settings))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
