#!/usr/bin/env python3
"""Barge-in and echo cancellation in a simulated room, on the real voice loop.

Each trial is one spoken exchange through :mod:`jarvis.evaluation.loopback`: the person
says "hey jarvis, ..." (piper), the wake-word model wakes the pipeline, the starter
model answers, piper speaks, and the reply's own sound reaches the microphone through
a room (20-80 ms delay, RT60 0.3/0.6 s, -6/-12 dB). Speaker and microphone share one
sample clock, so everything is measured from the audio:

- **false barge-ins**: replies cut with nobody speaking over them (and false pauses:
  the speaker paused for something that was not speech, then went on);
- **true barge-ins**: the person talks over the reply 1 s in; detected if the reply
  went quiet after the true onset of that speech;
- **stop time**: from the true onset (first 10 ms at -40 dBFS in the clean recording)
  to the speaker going quiet, the VAD's own detection delay included;
- the canceller's echo return loss enhancement (ERLE) while only the far end spoke.

The plain approaches run in the same session: no echo cancellation (echo-only
replies), and barge-in as it was (the reply stops once speech is confirmed, after
``JARVIS_VAD_MIN_SPEECH_MS``, instead of pausing on the first speech frame).

    python bench/barge_in_bench.py [--trials 20] [--plain-trials 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio.formats import ASR_RATE, to_float32
from jarvis.audio.resample import resample
from jarvis.config import load_settings
from jarvis.evaluation.barge import Trial, exchange
from jarvis.evaluation.room import Room
from jarvis.speech.silero import Endpointer
from jarvis.voice.assembly import Assistant, build_assistant, make_responder
from jarvis.voice.listening import FrontEnd
from jarvis.voice.pipeline import VoicePipeline

TOPICS = ["the history of lighthouses", "how bees make honey", "the planet Mars",
          "why the sky is blue", "how bread rises", "the first airplanes",
          "how tides work", "the moons of Jupiter", "how rainbows form", "old sailing ships"]
INTERRUPTIONS = ["Stop. What time is it?", "Wait, turn on the kitchen light.",
                 "Okay, that's enough.", "Hold on, what's the weather tomorrow?",
                 "Stop please, set a timer for ten minutes."]


def rooms() -> list[Room]:
    return [Room(delay_ms=d, rt60_s=t, gain_db=g, seed=i)
            for i, (d, t, g) in enumerate([(20, 0.3, -6.0), (40, 0.6, -6.0), (60, 0.3, -12.0),
                                           (80, 0.6, -6.0), (50, 0.3, -6.0)])]


def speech(a: Assistant, text: str) -> np.ndarray:
    assert a.tts is not None
    return resample(to_float32(a.tts.synthesize(text)), a.tts.sample_rate, ASR_RATE)


async def trials(a: Assistant, count: int, *, interrupt: bool, echo_cancel: bool,
                 pause: bool, tmp: Path, label: str) -> list[Trial]:
    settings = load_settings({"JARVIS_CACHE_DIR": str(tmp), "JARVIS_MAX_TOKENS": "24",
                              "JARVIS_WAKE_WORD": "hey_jarvis"})

    def build(front: FrontEnd) -> VoicePipeline:
        responder, _ = make_responder(a.backend, settings, a.devices.devices, a.tts)
        assert a.asr is not None
        return VoicePipeline(responder, a.asr, settings.pipeline, front_end=front,
                             silence_ms=settings.vad.silence_ms, barge_in=True)

    out: list[Trial] = []
    all_rooms = rooms()
    for i in range(count):
        room = all_rooms[i % len(all_rooms)]
        request = speech(a, f"Hey Jarvis, tell me about {TOPICS[i % len(TOPICS)]}.")
        interruption = speech(a, INTERRUPTIONS[i % len(INTERRUPTIONS)]) if interrupt else None
        trial = await exchange(build, room, request, interruption=interruption,
                               echo_cancel=echo_cancel, pause=pause,
                               endpointer=Endpointer(settings.vad))
        out.append(trial)
        stop = f"{trial.stop_ms:.0f} ms" if trial.stop_ms is not None else "-"
        print(f"  {label} {i + 1:>2}/{count} [{room.label()}] answered={trial.answered} "
              f"false pauses={trial.false_pauses} false barge-in={trial.false_barge_in} "
              f"stop={stop} "
              f"erle={trial.canceller.get('erle_db', float('nan')):.1f} dB", flush=True)
    return out


def summary(name: str, ts: list[Trial]) -> dict[str, Any]:
    answered = [t for t in ts if t.answered]
    stops = [t.stop_ms for t in answered if t.stop_ms is not None]
    interrupted = [t for t in answered if t.onset is not None]
    erle = [t.canceller["erle_db"] for t in answered
            if "erle_db" in t.canceller and t.onset is None]  # echo alone: no double talk
    return {
        "per_trial": [{"false_pauses": t.false_pauses, "false_barge_in": t.false_barge_in,
                       "barge_ins": len(t.barge_ins), "stop_ms": t.stop_ms,
                       "erle_db": t.canceller.get("erle_db")} for t in ts],
        "name": name, "trials": len(ts), "answered": len(answered),
        "false_barge_ins": sum(t.false_barge_in for t in answered),
        "false_pauses": sum(t.false_pauses for t in answered),
        "true_barge_ins": (sum(bool(t.barge_ins) and t.stop_ms is not None
                               and not t.false_barge_in for t in interrupted)
                           if interrupted else None),
        "interrupted": len(interrupted),
        "stop_ms_median": float(np.median(stops)) if stops else None,
        "stop_ms_p90": float(np.percentile(stops, 90)) if stops else None,
        "stop_ms_max": max(stops) if stops else None,
        "erle_db_median": float(np.median(erle)) if erle else None,
    }


def fmt(v: object) -> str:
    return "-" if v is None else (f"{v:.0f}" if isinstance(v, float) else str(v))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings({"JARVIS_WAKE_WORD": "hey_jarvis", **os.environ,
                                  "JARVIS_CACHE_DIR": tmp})
        a = await build_assistant(settings)
        try:
            t = Path(tmp)
            rows = [
                summary("AEC + pause, echo only", await trials(
                    a, args.trials, interrupt=False, echo_cancel=True, pause=True, tmp=t,
                    label="echo")),
                summary("AEC + pause, talked over", await trials(
                    a, args.trials, interrupt=True, echo_cancel=True, pause=True, tmp=t,
                    label="barge")),
                summary("plain: no AEC, echo only", await trials(
                    a, args.plain_trials, interrupt=False, echo_cancel=False, pause=True,
                    tmp=t, label="no-aec")),
                summary("plain: AEC, stop at confirmed speech", await trials(
                    a, args.plain_trials, interrupt=True, echo_cancel=True, pause=False,
                    tmp=t, label="no-pause")),
            ]
        finally:
            await a.close()
    print(f"\n{'':38} {'trials':>6} {'false':>6} {'pauses':>6} {'true':>9} {'stop p50':>9} "
          f"{'p90':>5} {'max':>5} {'ERLE dB':>8}")
    for r in rows:
        true = (f"{r['true_barge_ins']}/{r['interrupted']}" if r["true_barge_ins"] is not None
                else "-")
        print(f"{r['name']:38} {r['answered']:>6} {r['false_barge_ins']:>6} "
              f"{r['false_pauses']:>6} {true:>9} "
              f"{fmt(r['stop_ms_median']):>9} {fmt(r['stop_ms_p90']):>5} "
              f"{fmt(r['stop_ms_max']):>5} {fmt(r['erle_db_median']):>8}")
    new, old = rows[1]["stop_ms_median"], rows[3]["stop_ms_median"]
    if new and old:
        print(f"\nstop time, pause on the first speech frame vs stop at confirmed speech: "
              f"{new:.0f} ms vs {old:.0f} ms ({old / new:.2f}x faster)")
    return {"rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--plain-trials", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
