#!/usr/bin/env python3
"""Voice to voice through the remote backend vs in-process, on the same model, in the
same run (issue 13: the remote backend within 50 ms of in-process).

llama.cpp's own server (the ``xllamacpp`` wheel, :class:`LlamaServer`) is started as a
child process with the starter GGUF, one slot (one conversation), ``--cache-ram 0``
(as bench/remote_bench.py: with the conversation in its slot, llama.cpp's host-memory
prompt cache only copies the idle slot out before each prompt) and the in-process
engine's thread count. Two assistants are built in this process with
``build_assistant`` and the same settings (no wake word, greedy, a few tokens a reply,
the same system prompt): ``in-process`` (``JARVIS_LLM_URL`` empty) and ``remote``
(``JARVIS_LLM_URL`` = the server). Each has its own ASR, TTS, endpointer and cache
directory (a shared TTS phrase cache would hand the second path the first one's audio),
and one conversation, its microphone's.

The benchmark requests (the dialogues, synthesised by piper and resampled to 16 kHz,
as bench/voice_bench.py) are spoken to both pipelines in real time, one turn at a time:
each request goes through both paths back to back, the one going first alternating
from request to request (in-process first on even requests). A path's turn is its
request, silence until its TURN_END (the reply played in real time into a
``WavReplySink``), 0.8 s more silence; then, before the other path is spoken to, until
this process and the server have gone quiet (idle work after a turn, such as the
in-process engine's pre-evaluation, must not land on the other path's turn). So both
paths see the same machine state, and the same history turn for turn.

Voice to voice is the pipeline's own figure (``latency['voice_to_voice']`` in the
TURN_END event): from the last voiced sample of the request to the reply's first audio
handed to the speaker, endpoint silence included. Reported per path: median, p95, mean;
median stages (endpoint, asr, llm_ttft, tts_first); prompt and cached tokens (the
server's own counts for the remote path); and remote − in-process: the difference of the
medians (target <= +50 ms), the median of the per-request differences, and the ratio.

    python bench/remote_voice_bench.py [--requests 10] [--max-tokens 24]
        [--household-prompt] [--poll 0] [--json FILE]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from argparse import ArgumentParser, Namespace
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from voice_bench import speech, stats

from jarvis.audio.formats import ASR_RATE
from jarvis.config import Settings, load_settings
from jarvis.evaluation.dialogues import DIALOGUES, home_system_prompt
from jarvis.llm.remote_server import LlamaServer
from jarvis.voice.assembly import Assistant, build_assistant
from jarvis.voice.events import EventType, Outcome, TurnEvent
from jarvis.voice.pipeline import VoicePipeline, spoken_turns
from jarvis.voice.sinks import WavReplySink

TARGET_S = 0.050
"""Remote − in-process, difference of the voice-to-voice medians."""
STAGES = ("endpoint", "asr", "llm_ttft", "tts_first")
PATHS = ("in-process", "remote")
GAP_S = 0.8
"""Silence after a reply before the path's turn is over (spoken_turns' default)."""
QUIET = 0.15
"""CPU (in cores, this process and the server together) under which the machine counts
as quiet before the other path is spoken to."""
SETTLE_WINDOW_S = 0.2
SETTLE_TIMEOUT_S = 5.0


@dataclass
class Route:
    """One way of answering: the assistant, its pipeline and what its turns cost."""

    name: str
    assistant: Assistant
    sink: WavReplySink
    turns: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Request index → its first answered turn (latency, stats, transcript, reply)."""
    other: list[str] = field(default_factory=list)
    """Turns that were not answered, or a second turn for the same request."""
    settle_s: list[float] = field(default_factory=list)
    unsettled: int = 0
    request: int = -1
    """The request being spoken to this path."""

    @property
    def pipeline(self) -> VoicePipeline:
        return self.assistant.voice()

    def on_event(self, event: TurnEvent) -> None:
        if event.type is not EventType.TURN_END:
            return
        data = event.data
        if event.outcome is Outcome.ANSWERED and self.request not in self.turns:
            latency = {k: float(v) for k, v in data.get("latency", {}).items()}
            turn_stats = dict(data.get("stats", {}))
            self.turns[self.request] = {
                "request": self.request, "transcript": str(data.get("transcript", "")),
                "reply": event.text, "latency": latency,
                "prompt_tokens": int(turn_stats.get("prompt_tokens") or 0),
                "cached_tokens": int(turn_stats.get("cached_tokens") or 0),
                "speculative": bool(data.get("speculative"))}
            print(f"  [{self.name:<10} {self.request + 1:>2}] voice-to-voice "
                  f"{latency.get('voice_to_voice', float('nan')):.3f} s  (asr "
                  f"{latency.get('asr', 0):.3f}, llm ttft {latency.get('llm_ttft', 0):.3f}, "
                  f"tts first {latency.get('tts_first', 0):.3f}; "
                  f"{self.turns[self.request]['cached_tokens']}/"
                  f"{self.turns[self.request]['prompt_tokens']} tokens cached)", flush=True)
        else:
            outcome = ("a second answered turn" if event.outcome is Outcome.ANSWERED
                       else event.outcome.value if event.outcome is not None else "?")
            note = f"request {self.request + 1}: {outcome} {data.get('error') or ''}".rstrip()
            self.other.append(note)
            print(f"  [{self.name:<10} {self.request + 1:>2}] {note}", flush=True)


class Baton:
    """Whose turn it is: positions in the schedule of (path, request), one at a time."""

    def __init__(self) -> None:
        self.position = 0
        self._changed = asyncio.Condition()

    async def wait_for(self, position: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.position == position)

    async def advance(self) -> None:
        async with self._changed:
            self.position += 1
            self._changed.notify_all()


def schedule(requests: int) -> list[tuple[int, int]]:
    """(path, request) in the order spoken: each request through both paths back to
    back, in-process first on even requests, remote first on odd ones."""
    return [(path if i % 2 == 0 else 1 - path, i) for i in range(requests) for path in (0, 1)]


def _cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by this process and by ``pid`` (the server)."""
    total = time.process_time()
    if pid is not None:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def settle(server_pid: int | None) -> tuple[float, bool]:
    """Wait until this process and the server use under :data:`QUIET` cores over
    :data:`SETTLE_WINDOW_S`; (how long it took, whether it got quiet in time)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_TIMEOUT_S:
        before = _cpu_s(server_pid)
        await asyncio.sleep(SETTLE_WINDOW_S)
        if (_cpu_s(server_pid) - before) / SETTLE_WINDOW_S < QUIET:
            return time.monotonic() - t0, True
    return time.monotonic() - t0, False


async def speak(paths: list[Route], audios: list[npt.NDArray[np.float32]],
                server_pid: int | None) -> None:
    """Both pipelines listening at once, each to its own microphone, which speaks only
    when the baton says it is that path's turn."""
    order = schedule(len(audios))
    baton = Baton()

    async def microphone(k: int) -> AsyncIterator[npt.NDArray[np.float32]]:
        path = paths[k]
        for position, (who, i) in enumerate(order):
            if who != k:
                continue
            await baton.wait_for(position)
            path.request = i
            async for chunk in spoken_turns(path.pipeline, [audios[i]], gap_s=GAP_S):
                yield chunk
            took, quiet = await settle(server_pid)
            path.settle_s.append(took)
            path.unsettled += not quiet
            await baton.advance()

    tasks = [asyncio.create_task(p.pipeline.run(microphone(k), p.sink))
             for k, p in enumerate(paths)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # a failed pipeline fails the run
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- setup


def path_settings(cache_dir: Path, url: str, args: Namespace) -> Settings:
    """The same settings for both paths but the backend and the cache directory."""
    env = {**os.environ, "JARVIS_WAKE_WORD": "off", "JARVIS_TEMPERATURE": "0",
           "JARVIS_MAX_TOKENS": str(args.max_tokens), "JARVIS_CACHE_DIR": str(cache_dir),
           "JARVIS_LLM_URL": url, "JARVIS_LLM_FALLBACK": "none"}
    settings = load_settings(env)
    if args.household_prompt:
        settings = replace(settings, llm=replace(settings.llm,
                                                 system_prompt=home_system_prompt()))
    return settings


async def main_async(args: Namespace, url: str, server_pid: int | None, tmp: Path
                     ) -> dict[str, Any]:
    paths: list[Route] = []
    texts = [t for dialogue in DIALOGUES for t in dialogue][: args.requests]
    try:
        for name, backend_url in zip(PATHS, ("", url), strict=True):
            settings = path_settings(tmp / name, backend_url, args)
            assistant = await build_assistant(settings)
            path = Route(name, assistant, WavReplySink(tmp / name / "replies", realtime=True))
            path.pipeline.subscribe(path.on_event)
            paths.append(path)
            info = assistant.backend.info()
            detail = (f"system prompt {info.get('system_prompt_state')}, "
                      f"{info.get('slots')} slot(s)" if name == "remote"
                      else f"{info.get('n_threads')} threads")
            print(f"{name}: assistant ready in {assistant.ready_s:.1f} s ({detail})",
                  flush=True)
        audios = [np.concatenate([speech(paths[0].assistant, t),
                                  np.zeros(int(0.3 * ASR_RATE), np.float32)]) for t in texts]
        s = paths[0].assistant.voice()
        print(f"{len(texts)} spoken requests, each through both paths; endpoint silence "
              f"{int(s.silence_s * 1000)} ms", flush=True)
        await speak(paths, audios, server_pid)
    finally:
        for path in paths:
            with contextlib.suppress(Exception):
                await path.assistant.close()
    return report(paths, texts, args)


# --------------------------------------------------------------------------- report


def summary(path: Route) -> dict[str, Any]:
    turns = [path.turns[i] for i in sorted(path.turns)]
    v2v = [t["latency"]["voice_to_voice"] for t in turns if "voice_to_voice" in t["latency"]]
    prompt = sum(t["prompt_tokens"] for t in turns)
    cached = sum(t["cached_tokens"] for t in turns)
    return {
        **(stats(v2v) if v2v else {"n": 0}),
        "stages_median_s": {k: statistics.median(vals) for k in STAGES
                            if (vals := [t["latency"][k] for t in turns if k in t["latency"]])},
        "prompt_tokens": prompt, "cached_tokens": cached,
        "reuse": cached / prompt if prompt else None,
        "cache_hits": sum(t["cached_tokens"] > 0 for t in turns),
        "not_answered": path.other, "settle_median_s": (statistics.median(path.settle_s)
                                                        if path.settle_s else None),
        "unsettled": path.unsettled, "turns": turns,
    }


def report(paths: list[Route], texts: list[str], args: Namespace) -> dict[str, Any]:
    rows = {p.name: summary(p) for p in paths}
    local, remote = rows["in-process"], rows["remote"]
    out: dict[str, Any] = {
        "requests": len(texts), "max_tokens": args.max_tokens,
        "system_prompt": "household" if args.household_prompt else "default",
        "server": {"slots": 1, "cache_ram_mib": 0, "poll": args.poll,
                   "threads": args.threads}, **rows}
    print()
    head = (f"{'path':<11} {'n':>3} {'median':>8} {'p95':>8} {'mean':>8} "
            + " ".join(f"{k:>9}" for k in STAGES) + f" {'cached/prompt':>14}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        if not r["n"]:
            print(f"{name:<11}   0 (no answered turns)")
            continue
        stages = r["stages_median_s"]
        print(f"{name:<11} {r['n']:>3} {r['median_s']:>7.3f}s {r['p95_s']:>7.3f}s "
              f"{r['mean_s']:>7.3f}s "
              + " ".join(f"{1000 * stages[k]:>6.0f} ms" if k in stages else f"{'-':>9}"
                         for k in STAGES)
              + f" {r['cached_tokens']:>6}/{r['prompt_tokens']:<7}")
    if local["n"] and remote["n"]:
        diff = remote["median_s"] - local["median_s"]
        pairs = [(paths[1].turns[i], paths[0].turns[i])
                 for i in sorted(set(paths[0].turns) & set(paths[1].turns))]
        paired = [r["latency"]["voice_to_voice"] - o["latency"]["voice_to_voice"]
                  for r, o in pairs]
        same = sum(r["reply"] == o["reply"] for r, o in pairs)
        out["difference"] = {
            "median_diff_s": diff, "ratio": remote["median_s"] / local["median_s"],
            "paired_median_diff_s": statistics.median(paired) if paired else None,
            "paired_diffs_s": paired, "same_replies": same, "pairs": len(pairs),
            "pass": diff <= TARGET_S}
        print(f"\nremote − in-process: median {1000 * diff:+.0f} ms (per request: median "
              f"{1000 * statistics.median(paired) if paired else float('nan'):+.0f} ms), "
              f"ratio {out['difference']['ratio']:.3f}× · "
              f"[{'PASS' if diff <= TARGET_S else 'FAIL'}] target <= "
              f"+{1000 * TARGET_S:.0f} ms")
        print(f"the same reply on both paths for {same} of {len(pairs)} requests")
    reuse = remote["reuse"]
    print(f"remote turns: {remote['cached_tokens']} of {remote['prompt_tokens']} prompt "
          f"tokens cached by the server ({(reuse or 0):.1%}), {remote['cache_hits']} of "
          f"{len(remote['turns'])} turns hit")
    settles = [p.settle_s for p in paths]
    waited = [s for ss in settles for s in ss]
    if waited:
        print(f"waited for quiet before handing over: median {statistics.median(waited):.2f} "
              f"s, max {max(waited):.2f} s; not quiet within {SETTLE_TIMEOUT_S:g} s "
              f"{sum(p.unsettled for p in paths)} times")
    for p in paths:
        if p.other:
            print(f"{p.name}: {len(p.other)} turn(s) not counted: {'; '.join(p.other)}")
    return out


def main() -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    limit = sum(len(d) for d in DIALOGUES)
    p.add_argument("--requests", type=int, default=10,
                   help=f"spoken requests, each through both paths (at most {limit})")
    p.add_argument("--max-tokens", type=int, default=24, help="JARVIS_MAX_TOKENS")
    p.add_argument("--household-prompt", action="store_true",
                   help="the ~1,100-token household system prompt instead of the configured "
                        "one")
    p.add_argument("--poll", type=int, default=0,
                   help="the server's --poll (0-100; 0 as bench/remote_bench.py: cores "
                        "are shared)")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    args = p.parse_args()
    if not 1 <= args.requests <= limit:
        p.error(f"--requests: 1 to {limit}")
    # SIGTERM stops the run as Ctrl-C does: the assistants are closed, the server stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="remote-voice-bench-") as tmp_name:
        tmp = Path(tmp_name)
        llm = path_settings(tmp / "probe", "", args).llm
        args.threads = llm.n_threads
        # --cache-ram 0 as bench/remote_bench.py; the per-slot context and the threads
        # as the in-process engine's.
        server = LlamaServer(llm.model_path, slots=1, ctx_per_slot=llm.context_window,
                             threads=llm.n_threads, poll=args.poll, cache_ram_mib=0,
                             slot_save_path=tmp / "slots", log_file=tmp / "server.log")
        try:
            print(f"starting llama.cpp server: {llm.model_path.name}, 1 slot, "
                  f"{llm.n_threads} threads", flush=True)
            try:
                url = server.start()
            except RuntimeError:
                log = tmp / "server.log"
                if log.exists():
                    sys.stderr.write(log.read_text(errors="replace")[-4000:])
                raise
            pid = server.process.pid if server.process is not None else None
            result = asyncio.run(main_async(args, url, pid, tmp))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        finally:
            server.stop()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
