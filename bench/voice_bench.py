#!/usr/bin/env python3
"""Voice-to-voice latency: from the last voiced sample of a spoken request to the
first sample of the spoken reply, endpoint silence included, on the starter models.

20 spoken requests (the benchmark dialogues, synthesised by piper and resampled to
16 kHz) are fed to the pipeline as a live microphone would deliver them (real-time
pacing), each after the previous reply has finished. The pipeline runs as configured
(turns start speculatively at the likely end, ``JARVIS_VAD_SPECULATE_MS``) and, with
``--compare-endpoint``, once more starting only at the endpoint. In the same run the
plain sequential approach answers the same requests: wait for the endpoint, transcribe
the 30 s-padded utterance with faster-whisper's defaults, wait for the whole reply,
synthesise all of it, then play. Each way's transcripts are scored against the text
that was spoken (word error rate). Then a few barge-ins: how long stopping takes.

    python bench/voice_bench.py [--requests 20] [--barge-ins 3] [--compare-endpoint]
                                [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio.formats import ASR_RATE, to_float32
from jarvis.audio.resample import resample
from jarvis.config import Settings, load_settings
from jarvis.evaluation.dialogues import DIALOGUES
from jarvis.evaluation.wer import word_error_rate
from jarvis.latency import percentile
from jarvis.llm.dialogue import Conversation
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.silero import Endpointer
from jarvis.speech.tts import PiperTts
from jarvis.speech.vad import SegmenterConfig
from jarvis.voice.assembly import Assistant, build_assistant, make_responder
from jarvis.voice.events import EventType, Outcome, TurnEvent
from jarvis.voice.pipeline import VoicePipeline, file_chunks, spoken_turns
from jarvis.voice.sinks import WavReplySink


def engines(a: Assistant) -> tuple[WhisperAsr, PiperTts, VoicePipeline]:
    """The assistant's ASR, TTS and voice pipeline (built with speech)."""
    assert a.asr is not None and a.tts is not None
    return a.asr, a.tts, a.voice()


def speech(a: Assistant, text: str) -> np.ndarray:
    _, tts, _ = engines(a)
    return resample(to_float32(tts.synthesize(text)), tts.sample_rate, ASR_RATE)


def new_pipeline(a: Assistant, settings: Settings, endpointer: Endpointer | None = None,
                 *, barge_in: bool | None = None) -> VoicePipeline:
    """A pipeline with its own responder (a fresh conversation) over the assistant's
    engines and device map, with ``endpointer`` instead of the assistant's if given."""
    asr, tts, voice = engines(a)
    responder, _ = make_responder(a.backend, settings, a.devices.devices, tts)
    pipeline_settings = voice.settings
    if barge_in is not None:
        pipeline_settings = dataclasses.replace(pipeline_settings, barge_in=barge_in)
    return VoicePipeline(responder, asr, pipeline_settings,
                         endpointer=endpointer or voice.endpointer,
                         silence_ms=int(voice.silence_s * 1000))


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    mean = statistics.fmean(values)
    std = statistics.pstdev(values)
    return {"n": len(values), "mean_s": mean, "median_s": percentile(ordered, 50),
            "p95_s": percentile(ordered, 95), "std_s": std, "std_over_mean": std / mean}


def wer(texts: list[str], heard: list[str]) -> float:
    """Word error rate of everything heard against everything said."""
    return word_error_rate(" ".join(texts), " ".join(heard))


async def ours(a: Assistant, settings: Settings, texts: list[str], audios: list[np.ndarray],
               out: Path, endpointer: Endpointer | None = None, label: str = "pipeline"
               ) -> tuple[list[float], list[dict[str, float]], dict[str, Any]]:
    """The pipeline, with ``endpointer`` instead of the assistant's if given."""
    pipeline = new_pipeline(a, settings, endpointer)
    results: list[dict[str, float]] = []
    heard: list[str] = []

    def on_event(event: TurnEvent) -> None:
        if event.type is EventType.TRANSCRIPT:
            heard.append(event.text)
        if event.type is EventType.TURN_END and event.outcome is Outcome.ANSWERED:
            latency = {k: float(v) for k, v in event.data.get("latency", {}).items()}
            results.append(latency)
            spec = " speculative" if event.data.get("speculative") else ""
            print(f"  [{label:<8} {len(results):>2}/{len(texts)}] voice-to-voice "
                  f"{latency.get('voice_to_voice', float('nan')):.3f} s  "
                  f"(asr {latency.get('asr', 0):.3f}, llm ttft "
                  f"{latency.get('llm_ttft', 0):.3f}, first audio after ttft "
                  f"{latency.get('tts_first', 0):.3f}){spec}", flush=True)
        elif event.type is EventType.TURN_END and event.outcome is not None:
            error = event.data.get("error") or ""
            print(f"  [{label:<8}] turn {event.turn_id} {event.outcome.value} {error}".rstrip(),
                  flush=True)

    pipeline.subscribe(on_event)
    await pipeline.run(spoken_turns(pipeline, audios), WavReplySink(out))
    info = {"wer": wer(texts, heard), "utterances": len(heard), **pipeline.speculations}
    return [r["voice_to_voice"] for r in results if "voice_to_voice" in r], results, info


async def plain(a: Assistant, texts: list[str], audios: list[np.ndarray],
                silence_s: float) -> tuple[list[float], dict[str, Any]]:
    """Endpoint, padded transcription, whole reply, whole synthesis, then play."""
    asr, tts, _ = engines(a)
    conversation = Conversation(a.responder.conversations.system_prompt)
    totals = []
    heard: list[str] = []
    for i, audio in enumerate(audios):
        t0 = time.monotonic()
        transcript = await asyncio.to_thread(asr.transcribe_reference, audio)
        heard.append(transcript.text)
        reply, _ = await a.backend.complete(conversation.messages(transcript.text))
        conversation.add_turn(transcript.text, reply)
        if reply.strip():
            await asyncio.to_thread(tts.synthesize, reply)
        totals.append(silence_s + time.monotonic() - t0)
        print(f"  [plain    {i + 1:>2}/{len(audios)}] voice-to-voice {totals[-1]:.3f} s",
              flush=True)
    return totals, {"wer": wer(texts, heard), "utterances": len(heard)}


async def barge_ins(a: Assistant, settings: Settings, count: int, out: Path) -> list[float]:
    story = speech(a, "Tell me a long story about a brave little dragon.")
    interrupt = speech(a, "What time is it now?")
    stops: list[float] = []
    for _ in range(count):
        pipeline = new_pipeline(a, settings, barge_in=True)
        playing = asyncio.Event()

        def on_event(e: TurnEvent, p: asyncio.Event = playing) -> None:
            if e.type is EventType.FIRST_AUDIO:
                p.set()
            elif e.type is EventType.BARGE_IN:
                stops.append(e.data["stop_s"])

        pipeline.subscribe(on_event)

        async def source(p: asyncio.Event = playing) -> AsyncIterator[np.ndarray]:
            async for chunk in file_chunks(story, realtime=True, tail_silence_s=0.0):
                yield chunk
            while not p.is_set():
                yield np.zeros(512, dtype=np.float32)
                await asyncio.sleep(0.032)
            async for chunk in file_chunks(np.concatenate([np.zeros(8000, np.float32),
                                                           interrupt]), realtime=True):
                yield chunk

        await pipeline.run(source(), WavReplySink(out, realtime=True))
    return stops


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        # The spoken requests carry no wake word: everything heard is answered.
        settings = load_settings({"JARVIS_WAKE_WORD": "off", **os.environ})
        a = await build_assistant(settings)
        try:
            texts = [t for dialogue in DIALOGUES for t in dialogue][: args.requests]
            audios = [np.concatenate([speech(a, t), np.zeros(int(0.3 * ASR_RATE), np.float32)])
                      for t in texts]
            print(f"{len(texts)} spoken requests; endpoint silence {settings.vad.silence_ms} ms; "
                  f"assistant ready in {a.ready_s:.1f} s", flush=True)
            mine, details, info = await ours(a, settings, texts, audios, Path(tmp) / "ours")
            ways: dict[str, tuple[list[float], dict[str, Any]]] = {"pipeline": (mine, info)}
            endpointer = a.voice().endpointer
            if args.compare_endpoint and endpointer is not None:
                at_end = dataclasses.replace(SegmenterConfig.from_settings(settings.vad),
                                             pause_ms=0)
                times, _, end_info = await ours(
                    a, settings, texts, audios, Path(tmp) / "endpoint",
                    Endpointer(at_end, endpointer.model), "endpoint")
                ways["endpoint"] = (times, end_info)
            ways["plain"] = await plain(a, texts, audios, settings.vad.silence_ms / 1000)
            stops = await barge_ins(a, settings, args.barge_ins, Path(tmp) / "barge")
        finally:
            await a.close()
    rows = {name: {**stats(times), **extra} for name, (times, extra) in ways.items()}
    p, b = rows["pipeline"], rows["plain"]
    stages = {k: statistics.median(d[k] for d in details if k in d)
              for k in ("endpoint", "asr", "llm_ttft", "tts_first")}
    report: dict[str, Any] = {**rows, "barge_in_stop_s": stops, "stages": stages}
    print()
    print(f"{'approach':<12} {'n':>3} {'median':>8} {'mean':>8} {'p95':>8} {'std':>8} "
          f"{'std/mean':>9} {'WER':>6}")
    for name, row in rows.items():
        print(f"{name:<12} {row['n']:>3} {row['median_s']:>7.3f}s {row['mean_s']:>7.3f}s "
              f"{row['p95_s']:>7.3f}s {row['std_s']:>7.3f}s {row['std_over_mean']:>8.1%} "
              f"{row['wer']:>6.1%}")
    print(f"\nplain / pipeline median: {b['median_s'] / p['median_s']:.2f}x")
    if "endpoint" in rows:
        print(f"endpoint-only / pipeline median: "
              f"{rows['endpoint']['median_s'] / p['median_s']:.2f}x")
    print(f"speculative turns: {p['started']} started at a likely end, {p['committed']} "
          f"committed, {p['abandoned']} abandoned when speech resumed; "
          f"{p['utterances']} utterances for {len(texts)} requests")
    print("pipeline median stages: " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                 for k, v in stages.items()))
    print("targets: median <= 0.800 s, p95 <= 1.200 s, std < 25 % of mean")
    if stops:
        print(f"barge-in: playback stopped {', '.join(f'{s * 1000:.0f} ms' for s in stops)} "
              "after speech onset was detected (target <= 100 ms)")
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--barge-ins", type=int, default=3)
    p.add_argument("--compare-endpoint", action="store_true",
                   help="also run the pipeline without speculation (starting at the endpoint)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
