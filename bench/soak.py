#!/usr/bin/env python3
"""Memory soak: does resident memory stay within the models plus the configured caps
over hundreds of turns, and does it stay flat?

The real assistant (``build_assistant``: the starter LLM with its context cache and
persistence, faster-whisper, piper, the VAD) answers ``--asks`` text turns through the
one responder, round-robin over ``--conversations`` conversation ids as MQTT asks
arrive (``Turn(Source.MQTT, conversation_id, ...)``, history kept and trimmed as
configured), and every ``--voice-every`` asks one spoken request goes through the voice
pipeline (piper-synthesised speech as the microphone, real-time paced, the reply
written as a WAV).

Printed: resident memory (RSS) at the start (everything loaded and warmed, then the C
heap's free memory handed back to the OS so start-up leftovers do not inflate the
budget), the middle and the end, beside the model sizes and the configured caps; the
budget (what the process held at the start for everything but the context cache, plus
the cache's RAM cap) and by how much RSS ever went over it; how flat RSS was over the
second half; the context cache's own byte counter beside RSS; and latency p50/p95 of
all asks (median, p95, max: idle work must never hold an ask up; the targets are
p95 <= 2x the median and nothing over 2 s) and of the first and the last 50 asks, with
what made the slowest 5 % slow (asked twice by the repetition guard; history evaluated
again; ``--json`` has every ask's model stages). The
memory target: RSS never more than 10 % above the
budget, and within +/- 5 % over the second half.

    python bench/soak.py [--asks 300] [--conversations 4] [--voice-every 25]
                         [--max-cache-bytes 200MB] [--max-tokens 16] [--json FILE]

Settings come from the environment as usual (``--max-cache-bytes`` and
``--max-tokens`` override ``JARVIS_MAX_CACHE_BYTES`` and ``JARVIS_MAX_TOKENS``);
the context cache persists into a temporary ``JARVIS_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio.formats import ASR_RATE, to_float32
from jarvis.audio.resample import resample
from jarvis.config import Settings, load_settings
from jarvis.evaluation.dialogues import EVERYDAY, session
from jarvis.latency import percentile
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.voice.assembly import Assistant, build_assistant
from jarvis.voice.events import EventType, Outcome, Source, TurnEvent
from jarvis.voice.pipeline import spoken_turns
from jarvis.voice.sinks import WavReplySink
from jarvis.voice.turn import Turn

MB = 1024 * 1024


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_breakdown() -> dict[str, int]:
    """Anonymous vs file-backed resident memory (Linux ``smaps_rollup``), in bytes."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Anonymous", "Shared_Clean", "Private_Clean"):
                    out[name.lower()] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _libc() -> Any:
    """The C library's symbols (those of the running process)."""
    return ctypes.CDLL(None)


def malloc_info() -> dict[str, int]:
    """glibc's view of the heap (every arena): bytes in use, free but kept (resident
    unless trimmed), and in malloc's own mmapped blocks."""
    try:
        fn = _libc().mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = _MallInfo2
    info = fn()
    return {"heap_in_use": info.uordblks, "heap_free": info.fordblks, "mmapped": info.hblkhd}


def malloc_trim() -> float | None:
    """glibc ``malloc_trim(0)``: free heap memory back to the OS; seconds it took."""
    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    started = time.perf_counter()
    trim(0)
    return time.perf_counter() - started


def local(a: Assistant) -> LlamaCppBackend:
    """The in-process model backend (the soak measures the context cache's memory)."""
    if not isinstance(a.backend, LlamaCppBackend):
        raise SystemExit("bench/soak.py measures the in-process model: unset JARVIS_LLM_URL")
    return a.backend


def snapshot(a: Assistant) -> dict[str, Any]:
    """RSS and what accounts for it, right now."""
    stats = local(a).cache.stats()
    return {"rss": rss_bytes(), "cache_bytes": stats.bytes_held, "cache_entries": stats.entries,
            "evictions": stats.evictions, **rss_breakdown(), **malloc_info()}


# --------------------------------------------------------------------------- soak


def soak_settings(args: argparse.Namespace, cache_dir: Path) -> Settings:
    # The spoken requests carry no wake word: everything heard is answered.
    env = {"JARVIS_WAKE_WORD": "off", **os.environ, "JARVIS_CACHE_DIR": str(cache_dir),
           "JARVIS_MAX_TOKENS": str(args.max_tokens)}
    if args.max_cache_bytes:
        env["JARVIS_MAX_CACHE_BYTES"] = args.max_cache_bytes
    return load_settings(env)


async def ask(a: Assistant, conversation: str, text: str) -> tuple[float, float | None, bool]:
    """One text turn as an MQTT ask with a conversation id: (total s, ttft s, answered)."""
    turn = Turn(Source.MQTT, conversation, request=text, speak=False)
    started = time.monotonic()
    result = await a.responder.respond(turn)
    return (time.monotonic() - started, turn.latency.get("llm_ttft"),
            result.outcome is Outcome.ANSWERED)


class LastStats:
    """The model's statistics of the last turn that ended (from its ``TURN_END`` event):
    why a slow ask was slow."""

    def __init__(self, a: Assistant) -> None:
        self.stats: dict[str, Any] = {}
        a.responder.bus.subscribe(self)

    def __call__(self, event: TurnEvent) -> None:
        if event.type is EventType.TURN_END:
            self.stats = dict(event.data.get("stats", {}))
            self.stats["regenerated"] = bool(event.data.get("regenerated"))

    def record(self, index: int, conversation: str, total: float) -> dict[str, Any]:
        s = self.stats
        return {"ask": index + 1, "conversation": conversation, "total": total,
                "prompt_tokens": s.get("prompt_tokens", 0),
                "cached_tokens": s.get("cached_tokens", 0),
                "completion_tokens": s.get("completion_tokens", 0),
                "queue": s.get("queue_s", 0.0), "stages": s.get("stages", {}),
                "regenerated": bool(s.get("regenerated"))}


async def voice_turn(a: Assistant, audio: np.ndarray, out: Path) -> tuple[str, float | None]:
    """One spoken request through the voice pipeline: how its turn ended (or "unheard")
    and its voice-to-voice latency (None when no reply audio was produced)."""
    pipeline = a.voice()
    ends: list[tuple[str, float | None]] = []

    def on_event(event: TurnEvent) -> None:
        if event.type is EventType.TURN_END and event.source is Source.MICROPHONE \
                and event.outcome is not None:
            value = event.data.get("latency", {}).get("voice_to_voice")
            ends.append((event.outcome.value, None if value is None else float(value)))

    unsubscribe = pipeline.responder.bus.subscribe(on_event)
    try:
        await pipeline.run(spoken_turns(pipeline, [audio], gap_s=0.3), WavReplySink(out))
    finally:
        unsubscribe()
    return ends[-1] if ends else ("unheard", None)


def model_sizes(settings: Settings, a: Assistant) -> dict[str, int]:
    """Bytes on disk of the loaded models, and the live KV context at full length."""
    sizes: dict[str, int] = {}
    sizes["llm_file"] = settings.llm.model_path.stat().st_size
    if a.tts is not None and a.tts.voice_path is not None:
        sizes["tts_voice"] = Path(a.tts.voice_path).stat().st_size
    if a.asr is not None:
        model_dir = getattr(a.asr, "model_path", None)
        if model_dir is not None and Path(model_dir).is_dir():
            sizes["asr_model"] = sum(p.stat().st_size for p in Path(model_dir).rglob("*")
                                     if p.is_file())
    engine = local(a).engine
    system = len(engine.system_prefix)
    system_state = local(a).cache.stats().bytes_held
    if system and system_state:
        sizes["kv_context"] = int(system_state / system * engine.n_ctx)
    return sizes


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jarvis-soak-") as tmp:
        settings = soak_settings(args, Path(tmp) / "cache")
        a = await build_assistant(settings)
        try:
            return await soak(args, settings, a, Path(tmp))
        finally:
            await a.close()


async def soak(args: argparse.Namespace, settings: Settings, a: Assistant,
               tmp: Path) -> dict[str, Any]:
    assert a.tts is not None
    voice_texts = [EVERYDAY[i % len(EVERYDAY)] for i in range(args.asks // args.voice_every
                                                              + 1)]
    voice_audio = [resample(to_float32(a.tts.synthesize(t)), a.tts.sample_rate, ASR_RATE)
                   for t in voice_texts]
    conversations = [f"room-{i}" for i in range(args.conversations)]
    requests = [session(i, args.asks // args.conversations + 1) for i in range(args.conversations)]
    sizes = model_sizes(settings, a)
    cap = settings.cache.max_bytes
    loaded = rss_bytes()
    malloc_trim()  # what loading left in the C heap is not the models' due
    start = snapshot(a)
    engines_bytes = start["rss"] - start["cache_bytes"]
    budget = engines_bytes + cap
    print(f"soak: {args.asks} asks over {args.conversations} conversations + a voice turn "
          f"every {args.voice_every}; JARVIS_MAX_TOKENS={settings.llm.max_tokens}, "
          f"JARVIS_HISTORY_TURNS={settings.pipeline.history_turns}", flush=True)
    print("models: " + ", ".join(f"{k} {v / MB:.0f} MiB" for k, v in sizes.items()), flush=True)
    print(f"caps: JARVIS_MAX_CACHE_BYTES {cap / MB:.0f} MiB, JARVIS_MAX_CACHE_SIZE "
          f"{settings.cache.max_entries} entries, JARVIS_DISK_CACHE_BYTES "
          f"{settings.cache.disk_max_bytes / MB:.0f} MiB (disk), JARVIS_TTS_PHRASE_CACHE_BYTES "
          f"{settings.tts.phrase_cache_bytes / MB:.0f} MiB (disk)", flush=True)
    print(f"start: RSS {loaded / MB:.0f} MiB loaded and warmed, {start['rss'] / MB:.0f} MiB "
          "once the C heap's free memory is returned to the OS (malloc_trim)", flush=True)
    print(f"budget: {engines_bytes / MB:.0f} MiB held at start for everything but the context "
          f"cache + {cap / MB:.0f} MiB cap = {budget / MB:.0f} MiB", flush=True)

    samples: list[dict[str, Any]] = [start]
    totals: list[float] = []
    ttfts: list[float] = []
    voice: list[float] = []
    outcomes: dict[str, int] = {}
    failed = 0
    per_ask: list[dict[str, Any]] = []
    model_stats = LastStats(a)
    middle: dict[str, Any] = start
    for i in range(args.asks):
        conv = i % args.conversations
        text = requests[conv][i // args.conversations]
        total, ttft, answered = await ask(a, conversations[conv], text)
        failed += not answered
        totals.append(total)
        if ttft is not None:
            ttfts.append(ttft)
        per_ask.append(model_stats.record(i, conversations[conv], total))
        if (i + 1) % args.voice_every == 0:
            outcome, v2v = await voice_turn(a, voice_audio[(i + 1) // args.voice_every - 1],
                                            tmp / "replies")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if v2v is not None:
                voice.append(v2v)
        samples.append(snapshot(a))
        if i + 1 == args.asks // 2:
            middle = samples[-1]
        if (i + 1) % args.report_every == 0:
            s = samples[-1]
            print(f"  ask {i + 1:>4}: RSS {s['rss'] / MB:7.1f} MiB  cache "
                  f"{s['cache_bytes'] / MB:6.1f} MiB in {s['cache_entries']:>3} entries  "
                  f"evictions {s['evictions']:>4}  "
                  f"heap in use {s.get('heap_in_use', 0) / MB:6.1f} MiB free "
                  f"{s.get('heap_free', 0) / MB:6.1f} MiB  mmapped "
                  f"{s.get('mmapped', 0) / MB:6.1f} MiB  last {total:.2f} s", flush=True)
    end = samples[-1]
    peak = max(s["rss"] for s in samples)
    second = [s["rss"] for s in samples[len(samples) // 2:]]
    mid_rss = middle["rss"]
    drift_low, drift_high = min(second) / mid_rss - 1, max(second) / mid_rss - 1
    over = peak / budget - 1

    def lat(values: list[float]) -> str:
        ordered = sorted(values)
        return f"p50 {percentile(ordered, 50):.3f} s  p95 {percentile(ordered, 95):.3f} s"

    print()
    print(f"{'':<8} {'RSS':>9} {'cache counter':>14} {'RSS - counter':>14} {'entries':>8}")
    for name, s in (("start", start), ("middle", middle), ("end", end)):
        print(f"{name:<8} {s['rss'] / MB:>6.1f} MiB {s['cache_bytes'] / MB:>11.1f} MiB "
              f"{(s['rss'] - s['cache_bytes']) / MB:>11.1f} MiB {s['cache_entries']:>8}")
    print(f"peak RSS {peak / MB:.1f} MiB = budget {budget / MB:.0f} MiB {over:+.1%} "
          f"(target <= +10 %)")
    print(f"second half: RSS {drift_low:+.1%} .. {drift_high:+.1%} of the middle "
          f"(target within +/- 5 %)")
    first, last = totals[:50], totals[-50:]
    ordered = sorted(totals)
    median, p95, worst = (percentile(ordered, 50), percentile(ordered, 95), ordered[-1])
    print(f"all {len(totals)} asks: median {median:.3f} s  p95 {p95:.3f} s "
          f"({p95 / median:.2f}x the median; target <= 2x)  max {worst:.3f} s "
          f"(target <= 2 s); {sum(t > 2.0 for t in totals)} over 2 s")
    by_time = sorted(per_ask, key=lambda r: r["total"])
    print("slowest asks: " + "; ".join(
        f"#{r['ask']} {r['total']:.2f} s ({r['prompt_tokens'] - r['cached_tokens']}"
        f" tokens evaluated, {r['completion_tokens']} generated"
        + (", asked twice" if r["regenerated"] else "") + ")" for r in by_time[-5:]))
    top = by_time[len(by_time) - max(1, len(by_time) // 20):]
    print(f"the slowest 5 % ({len(top)} asks): "
          f"{sum(r['regenerated'] for r in top)} asked twice (the repetition guard threw "
          f"the first reply away; {sum(r['regenerated'] for r in per_ask)} of all "
          f"{len(per_ask)}), {sum(r['prompt_tokens'] - r['cached_tokens'] > 60 for r in top)} "
          "evaluated over 60 prompt tokens (history that no cached state served)")
    print(f"asks 1-50:   total {lat(first)}   ttft {lat(ttfts[:50])}")
    print(f"asks {len(totals) - len(last) + 1}-{len(totals)}: total {lat(last)}   "
          f"ttft {lat(ttfts[-50:])}")
    if outcomes:
        print(f"voice turns: {sum(outcomes.values())} ("
              + ", ".join(f"{n} {name}" for name, n in sorted(outcomes.items())) + ")"
              + (f", voice-to-voice {lat(voice)}" if voice else ""))
    trim_s = malloc_trim()
    if trim_s is not None:
        print(f"malloc_trim at the end: {trim_s * 1000:.1f} ms, RSS then "
              f"{rss_bytes() / MB:.1f} MiB")
    cache = local(a).cache.stats()
    print(f"context cache: hit rate {cache.hit_rate or 0:.1%}, {cache.evictions} evictions, "
          f"{cache.rejected} rejected; failed asks {failed}")
    return {"asks": len(totals), "failed": failed, "models": sizes, "cap": cap,
            "budget": budget, "peak_rss": peak, "over_budget": over,
            "second_half_drift": [drift_low, drift_high],
            "start": start, "middle": middle, "end": end,
            "total_median": median, "total_p95": p95, "total_max": worst,
            "first50_total_p50": percentile(sorted(first), 50),
            "first50_total_p95": percentile(sorted(first), 95),
            "last50_total_p50": percentile(sorted(last), 50),
            "last50_total_p95": percentile(sorted(last), 95),
            "voice_to_voice": voice, "voice_outcomes": outcomes,
            "rss_series": [s["rss"] for s in samples], "per_ask": per_ask}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asks", type=int, default=300)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--voice-every", type=int, default=25,
                   help="a spoken request after every N asks")
    p.add_argument("--max-cache-bytes", default="",
                   help="JARVIS_MAX_CACHE_BYTES for this run (default: as configured)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--report-every", type=int, default=25)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    report = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
