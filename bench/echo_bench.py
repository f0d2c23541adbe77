#!/usr/bin/env python3
"""Echo cancellation benchmark: WebRTC AEC3 with the estimated delay
(``jarvis.audio.echo``) against the plain microphone, on real piper speech played
through the synthetic room of ``jarvis/evaluation/room.py``.

A two-sentence reply goes to the speaker in piper's own pieces (int16 at 22050 Hz,
pushed into the reference 0.2 s before each plays); the microphone hears it through
the room (delay, RT60 0.3 or 0.6 s, the echo 0, 6 or 12 dB under what was played,
noise at -70 dBFS) and is captured in 512-sample chunks. Per room:

- ``ERLE``       echo energy over residual energy from 2 s after playback starts to its
                 end, AEC3 with the delay estimate (no gate) and with the residual echo
                 gate (the default); the plain microphone is 0 dB;
- ``delay``      the estimate minus the true delay (the room's direct path), and
                 ``est s`` when it was first accepted (after playback started);
- ``conv s``     when, after the echo starts, AEC3 (no gate) has converged for good:
                 every 500 ms window from then on has 15 dB of ERLE or more;
- ``Silero``     32 ms frames Silero VAD scores over 0.5: the raw microphone (the plain
                 approach, no AEC), AEC3, AEC3 + gate;
- ``onsets / barge-ins``  what the default endpointer makes of the same: onsets pause
                 the speaker, confirmed speech cancels the reply (with barge-in on);
- ``near``       near-end speech ("Hey Jarvis, ...") over the echo 4 s into the reply:
                 correlation with the clean speech, raw -> residual; its level change
                 through the canceller; its Silero speech frames residual / clean; when
                 the endpointer confirms it (the barge-in), after it starts; the
                 summary gives the same without the gate.

Then delays AEC3 cannot find alone (300-900 ms): AEC3 with no delay estimate against
the canceller with it (no gate). CPU is the canceller's thread CPU time per second of
audio (% of one core): AEC3, the delay estimator and the gate together.

    python bench/echo_bench.py [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio import ASR_RATE, FloatArray, resample
from jarvis.audio.echo import EchoCanceller, EchoReference, echo_cancel_unavailable
from jarvis.config import load_settings
from jarvis.evaluation.room import (
    Playback,
    Room,
    best_lag,
    erle_db,
    level_db,
    play_through,
)
from jarvis.speech.silero import FRAME, Endpointer, SileroVad
from jarvis.speech.tts import PiperTts
from jarvis.speech.vad import SegmenterConfig, SpeechOnset, SpeechStarted

FAR_TEXT = ("The weather today will be mostly sunny with a high of twenty three degrees. "
            "In the evening a light breeze comes from the west, and tomorrow looks much "
            "the same.")
NEAR_TEXT = "Hey Jarvis, turn off the kitchen lights please."
NEAR_AT_S = 4.0
SETTLE_S = 2.0
Chunks = list[tuple[np.ndarray, int]]


def speech_frames(vad: SileroVad, audio: FloatArray) -> np.ndarray:
    vad.reset()
    whole = len(audio) // FRAME * FRAME
    return np.asarray(vad.score(audio[:whole]) > 0.5)


def far_end(playback: Playback) -> int:
    return int(np.nonzero(playback.far)[0][-1]) + 1


def convergence_s(playback: Playback, room: Room) -> float | None:
    """When, after the echo reaches the microphone, AEC3 has converged for good: the
    start of the first 500 ms window (100 ms steps) after which every window up to
    the end of playback has 15 dB of ERLE or more. None when the last one has not."""
    step, span = ASR_RATE // 10, ASR_RATE // 2
    echo_start = playback.far_start + round(room.delay_ms * ASR_RATE / 1000)
    end = min(far_end(playback), len(playback.residual))
    starts = list(range(echo_start, end - span + 1, step))
    bad = [start for start in starts
           if erle_db(playback.mic[start:start + span], playback.residual[start:start + span])
           < 15.0]
    if not bad:
        return 0.0
    if bad[-1] == starts[-1]:
        return None
    return (bad[-1] + step - echo_start) / ASR_RATE


def barge_ins(endpointer: Endpointer, audio: FloatArray) -> list[tuple[str, int]]:
    """("onset" | "started", sample at which it fired) for each :class:`SpeechOnset`
    (the speaker pauses) and :class:`SpeechStarted` (the reply is cancelled) that the
    default endpointer raises on ``audio`` fed in 512-sample chunks."""
    endpointer.reset()
    out: list[tuple[str, int]] = []
    for pos in range(0, len(audio) // FRAME * FRAME, FRAME):
        for event in endpointer.process(audio[pos:pos + FRAME]):
            if isinstance(event, SpeechOnset):
                out.append(("onset", pos + FRAME))
            elif isinstance(event, SpeechStarted):
                out.append(("started", pos + FRAME))
    return out


def run(room: Room, chunks: Chunks, *, max_delay_ms: int = 500, gate: bool = True,
        near: FloatArray | None = None) -> tuple[Playback, EchoCanceller, float | None]:
    """The reply through ``room`` into a fresh canceller; also when (s after playback
    started) the delay estimate was first accepted."""
    reference = EchoReference()
    canceller = EchoCanceller(reference, max_delay_ms=max_delay_ms)
    if not gate:
        canceller.residual_gate_db = None
    first: list[float] = []

    class Watch:
        def process(self, mic: FloatArray) -> FloatArray:
            out = canceller.process(mic)
            if not first and canceller.delay_ms is not None:
                first.append(canceller.stats()["audio_s"])
            return out

    playback = play_through(room, chunks, canceller=Watch(), reference=reference,
                            near=near, near_at_s=NEAR_AT_S)
    found = first[0] - playback.far_start / ASR_RATE if first else None
    return playback, canceller, found


def measure_room(room: Room, chunks: Chunks, near: FloatArray, vad: SileroVad,
                 endpointer: Endpointer) -> dict[str, Any]:
    row: dict[str, Any] = {"room": room.label(), "delay_ms": room.delay_ms,
                           "rt60_s": room.rt60_s, "gain_db": room.gain_db}
    for name, gate in (("aec3", False), ("gated", True)):
        playback, canceller, found = run(room, chunks, gate=gate)
        n = len(playback.residual)
        settled = slice(playback.far_start + int(SETTLE_S * ASR_RATE), far_end(playback))
        from_start = slice(playback.far_start, far_end(playback))
        stats = canceller.stats()
        events = barge_ins(endpointer, playback.residual)
        row[name] = {
            "erle_db": erle_db(playback.mic[settled], playback.residual[settled]),
            "erle_all_db": erle_db(playback.mic[from_start], playback.residual[from_start]),
            "silero": int(speech_frames(vad, playback.residual).sum()),
            "onsets": sum(kind == "onset" for kind, _ in events),
            "barge_ins": sum(kind == "started" for kind, _ in events),
            "cpu_pct": 100.0 * stats["cpu_s"] / stats["audio_s"],
        }
        if not gate:
            row["delay_est_ms"] = canceller.delay_ms
            row["delay_error_ms"] = (None if canceller.delay_ms is None
                                     else canceller.delay_ms - room.delay_ms)
            row["delay_found_s"] = found
            row["convergence_s"] = convergence_s(playback, room)
            raw = playback.mic[:n]
            events = barge_ins(endpointer, raw)
            row["plain"] = {"silero": int(speech_frames(vad, raw).sum()),
                            "onsets": sum(kind == "onset" for kind, _ in events),
                            "barge_ins": sum(kind == "started" for kind, _ in events)}
    talk_play, _, _ = run(room, chunks, near=near)
    at = int(NEAR_AT_S * ASR_RATE)
    talk = slice(at, at + len(near))
    row["near_corr_raw"] = best_lag(talk_play.near[talk], talk_play.mic[talk])[1]
    row["near_corr_residual"] = best_lag(talk_play.near[talk], talk_play.residual[talk])[1]
    row["near_level_db"] = level_db(talk_play.residual[talk]) - level_db(talk_play.near[talk])
    row["near_silero_clean"] = int(speech_frames(vad, talk_play.near[talk]).sum())
    frames = speech_frames(vad, talk_play.residual)
    row["near_silero_residual"] = int(frames[at // FRAME:(at + len(near)) // FRAME].sum())
    started = [pos for kind, pos in barge_ins(endpointer, talk_play.residual)
               if kind == "started" and pos >= at]
    row["barge_in_ms"] = 1000.0 * (started[0] - at) / ASR_RATE if started else None
    bare, _, _ = run(room, chunks, near=near, gate=False)
    frames = speech_frames(vad, bare.residual)
    row["near_silero_residual_nogate"] = int(frames[at // FRAME:(at + len(near)) // FRAME].sum())
    row["near_corr_residual_nogate"] = best_lag(bare.near[talk], bare.residual[talk])[1]
    started = [pos for kind, pos in barge_ins(endpointer, bare.residual)
               if kind == "started" and pos >= at]
    row["barge_in_ms_nogate"] = 1000.0 * (started[0] - at) / ASR_RATE if started else None
    return row


def measure_long(delay_ms: float, chunks: Chunks, vad: SileroVad) -> dict[str, Any]:
    room = Room(delay_ms=delay_ms, rt60_s=0.3, gain_db=-6.0)
    row: dict[str, Any] = {"delay_ms": delay_ms}
    for name, max_delay in (("aec3", 0), ("estimated", 1000)):
        playback, canceller, _ = run(room, chunks, max_delay_ms=max_delay, gate=False)
        settled = slice(playback.far_start + int(4 * ASR_RATE), far_end(playback))
        stats = canceller.stats()
        row[name] = {
            "erle_db": erle_db(playback.mic[settled], playback.residual[settled]),
            "silero": int(speech_frames(vad, playback.residual).sum()),
            "delay_est_ms": canceller.delay_ms,
            "shift_ms": canceller.reference_shift_ms,
            "convergence_s": convergence_s(playback, room),
            "cpu_pct": 100.0 * stats["cpu_s"] / stats["audio_s"],
        }
    return row


def fmt(value: float | None, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--quick", action="store_true",
                        help="one RIR, delays 20 and 80 ms only (a smoke run)")
    args = parser.parse_args(argv)
    problem = echo_cancel_unavailable()
    if problem is not None:
        print(problem)
        return 1
    settings = load_settings({"JARVIS_CACHE_DIR": ""})
    tts = PiperTts(settings.tts, deterministic=True)
    tts.load()
    vad = SileroVad()
    chunks: Chunks = [(c.samples, c.sample_rate) for c in tts.sentence_parts(FAR_TEXT)]
    near = resample(tts.synthesize(NEAR_TEXT), tts.sample_rate, ASR_RATE)
    far_s = sum(len(c) / r for c, r in chunks)
    print(f"echo bench · {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} · "
          f"reply {far_s:.1f} s in {len(chunks)} pieces at {chunks[0][1]} Hz, "
          f"near end {len(near) / ASR_RATE:.1f} s at {NEAR_AT_S:g} s · "
          f"mic chunks of 512 samples, noise -70 dBFS")

    delays = (20.0, 80.0) if args.quick else (20.0, 40.0, 60.0, 80.0)
    rt60s = (0.3,) if args.quick else (0.3, 0.6)
    gains = (0.0, -6.0, -12.0)
    started = time.perf_counter()
    endpointer = Endpointer(SegmenterConfig(), model=vad)
    rows: list[dict[str, Any]] = []
    for seed, rt60 in enumerate(rt60s):
        for delay in delays:
            for gain in gains:
                rows.append(measure_room(Room(delay_ms=delay, rt60_s=rt60, gain_db=gain,
                                              seed=seed), chunks, near, vad, endpointer))

    print("\n                    |   ERLE dB   | delay   est  conv | Silero frames | onsets / "
          "barge-ins |          near end over the echo (gated)")
    print(" delay RT60 echo    | AEC3  +gate | err ms   s     s | raw AEC3 gate |"
          " raw AEC3 gate | corr raw->res  level  frames   barge-in")
    for r in rows:
        p, a, g = r["plain"], r["aec3"], r["gated"]
        print(f"{r['delay_ms']:3.0f} ms {r['rt60_s']:.1f} s {r['gain_db']:+3.0f} dB |"
              f" {a['erle_db']:4.1f}  {g['erle_db']:4.1f} |"
              f" {fmt(r['delay_error_ms'], '+5.2f', '  n/a')}"
              f" {fmt(r['delay_found_s'], '4.2f', ' n/a')}"
              f"  {fmt(r['convergence_s'], '4.2f', ' n/a')} |"
              f" {p['silero']:3d}  {a['silero']:3d}  {g['silero']:3d} |"
              f" {p['onsets']}/{p['barge_ins']}  {a['onsets']}/{a['barge_ins']}  "
              f"{g['onsets']}/{g['barge_ins']}  |"
              f"  {r['near_corr_raw']:.2f}->{r['near_corr_residual']:.2f}"
              f"  {r['near_level_db']:+5.1f} dB  {r['near_silero_residual']:2d}/"
              f"{r['near_silero_clean']:2d}  {fmt(r['barge_in_ms'], '4.0f', 'none')} ms")

    long_rows = [measure_long(d, chunks, vad) for d in (300.0, 600.0, 900.0)]
    print("\nlong delays (RT60 0.3 s, echo -6 dB, no gate): AEC3 alone vs with the delay "
          "estimate (max_delay_ms=1000)")
    print(" delay   | AEC3 alone: ERLE  conv s  Silero | estimated: delay  shift   ERLE  conv s"
          "  Silero")
    for r in long_rows:
        a, e = r["aec3"], r["estimated"]
        print(f"{r['delay_ms']:5.0f} ms |            {a['erle_db']:5.1f}"
              f"    {fmt(a['convergence_s'], '4.1f', ' n/a')}   {a['silero']:5d}"
              f" |            {fmt(e['delay_est_ms'], '4.0f', ' n/a')}  {e['shift_ms']:5.0f}"
              f"  {e['erle_db']:5.1f}    {fmt(e['convergence_s'], '4.1f', ' n/a')}  "
              f"{e['silero']:5d}")

    def total(way: str, key: str) -> int:
        return sum(int(r[way][key]) for r in rows)

    errors = [abs(r["delay_error_ms"]) for r in rows if r["delay_error_ms"] is not None]
    latencies = [r["barge_in_ms"] for r in rows if r["barge_in_ms"] is not None]
    summary: dict[str, Any] = {
        "rooms": len(rows),
        "erle_db_median": statistics.median(r["aec3"]["erle_db"] for r in rows),
        "erle_db_min": min(r["aec3"]["erle_db"] for r in rows),
        "erle_gated_db_median": statistics.median(r["gated"]["erle_db"] for r in rows),
        "delay_found": len(errors),
        "delay_error_ms_max": max(errors) if errors else None,
        "delay_found_s_median": statistics.median(
            r["delay_found_s"] for r in rows if r["delay_found_s"] is not None),
        "convergence_s_max": max((r["convergence_s"] for r in rows
                                  if r["convergence_s"] is not None), default=None),
        "converged": sum(r["convergence_s"] is not None for r in rows),
        **{f"{way}_{key}": total(way, key) for way in ("plain", "aec3", "gated")
           for key in ("silero", "onsets", "barge_ins")},
        "near_corr_residual_min": min(r["near_corr_residual"] for r in rows),
        "near_level_db_min": min(r["near_level_db"] for r in rows),
        "near_silero_kept": sum(r["near_silero_residual"] for r in rows)
        / max(1, sum(r["near_silero_clean"] for r in rows)),
        "near_silero_kept_nogate": sum(r["near_silero_residual_nogate"] for r in rows)
        / max(1, sum(r["near_silero_clean"] for r in rows)),
        "near_corr_residual_nogate_min": min(r["near_corr_residual_nogate"] for r in rows),
        "barge_in_detected_nogate": sum(r["barge_in_ms_nogate"] is not None for r in rows),
        "barge_in_ms_median_nogate": statistics.median(
            r["barge_in_ms_nogate"] for r in rows if r["barge_in_ms_nogate"] is not None),
        "barge_in_detected": len(latencies),
        "barge_in_ms_median": statistics.median(latencies) if latencies else None,
        "cpu_pct_median": statistics.median(r["gated"]["cpu_pct"] for r in rows),
        "cpu_pct_aec3_alone": statistics.median(r["aec3"]["cpu_pct"] for r in long_rows),
    }
    print(f"\nplain microphone (no AEC): ERLE 0 dB; Jarvis's own voice gives "
          f"{summary['plain_silero']} Silero speech frames, {summary['plain_onsets']} onsets "
          f"(speaker paused), {summary['plain_barge_ins']} barge-ins in {len(rows)} rooms")
    ways = (("aec3", "AEC3 + delay estimate:   "), ("gated", "+ residual echo gate:    "))
    for way, label in ways:
        erle = summary["erle_db_median" if way == "aec3" else "erle_gated_db_median"]
        print(f"{label} ERLE median {erle:.1f} dB; {summary[f'{way}_silero']} Silero frames, "
              f"{summary[f'{way}_onsets']} onsets, {summary[f'{way}_barge_ins']} barge-ins")
    print(f"delay: found in {summary['delay_found']}/{len(rows)} rooms, worst error "
          f"{fmt(summary['delay_error_ms_max'], '.2f')} ms, median "
          f"{summary['delay_found_s_median']:.2f} s after playback starts; AEC3 converged "
          f"(15 dB ERLE in every 500 ms from then on) in {summary['converged']}/{len(rows)} "
          f"rooms, at most "
          f"{fmt(summary['convergence_s_max'], '.1f')} s after the echo starts")
    print(f"near end over the echo:    correlation >= {summary['near_corr_residual_min']:.2f},"
          f" level >= {summary['near_level_db_min']:+.1f} dB, "
          f"{100 * summary['near_silero_kept']:.0f} % of its speech frames still speech, "
          f"barge-in in {summary['barge_in_detected']}/{len(rows)} rooms "
          f"({fmt(summary['barge_in_ms_median'], '.0f')} ms median after it starts)")
    print(f"  without the gate:        correlation >= "
          f"{summary['near_corr_residual_nogate_min']:.2f}, "
          f"{100 * summary['near_silero_kept_nogate']:.0f} % of its speech frames still speech, "
          f"barge-in in {summary['barge_in_detected_nogate']}/{len(rows)} rooms "
          f"({summary['barge_in_ms_median_nogate']:.0f} ms median)")
    print(f"CPU: {summary['cpu_pct_median']:.2f} % of one core per second of audio "
          f"(AEC3 alone {summary['cpu_pct_aec3_alone']:.2f} %) · bench "
          f"{time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "long_delays": long_rows,
                                         "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
