#!/usr/bin/env python3
"""Speech benchmark: ASR word error rate and latency, TTS time to first audio, VAD cost.

All in one process on the bundled models (faster-whisper tiny.en int8, piper
en_US-joe-medium, Silero VAD v6), so every comparison is made in the same run.

ASR, on jfk-16k-mono.wav and on the home commands of tests/data/commands.txt spoken
by piper and framed the way the endpointer delivers them (0.3 s pre-roll, 0.4 s of
trailing silence):

- ``reference``   faster-whisper's ``WhisperModel.transcribe`` with its defaults
                  (beam 5, timestamps, temperature fallback, 30 s of padding);
- ``padded``      Jarvis's decode (greedy, no timestamps, fixed language), 30 s padding;
- ``trimmed``     the same with trimmed padding (``JARVIS_ASR_TRIM_PADDING``, default):
                  the real length encoded, the padding's encoder output precomputed;
- ``naive trim``  the real length encoded and nothing else (shows why the cached
                  padding output is needed: the decoder then loops).

TTS: time to the first audio chunk of replies whose first sentence is at most 40
characters, streaming (sentence by sentence, fed word by word like LLM tokens) versus
synthesising the whole reply first; phrase cache off (and one cached reply for scale).

    python bench/speech_bench.py [--json FILE]
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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio import ASR_RATE, FloatArray, read_audio, resample
from jarvis.config import load_settings
from jarvis.evaluation.wer import word_errors
from jarvis.speech.asr import Transcript, WhisperAsr
from jarvis.speech.silero import FRAME, SileroVad
from jarvis.speech.tts import PhraseCache, PiperTts, split_sentences

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
)
REPLIES = [
    "Okay, the kitchen lights are on. Anything else I can do for you?",
    "Done. I set a timer for ten minutes and I will remind you when it ends.",
    "The front door is locked. The garage door is also closed.",
    "It is twenty one degrees inside. Outside it is a bit colder, about twelve degrees.",
    "Sure, playing some jazz in the bedroom. Tell me if you want it louder.",
    "Good night! I turned off all the lights downstairs and set the alarm.",
    "Your next meeting starts at three. It is a call with the design team.",
    "I added milk to the shopping list. You now have five items on it.",
    "Tomorrow will be sunny and warm. There is no rain expected until Sunday.",
    "The robot vacuum has started. It should be done in about forty minutes.",
]


def median_ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):7.1f} ms" if values else "      n/a"


def p90_ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]:.1f} ms"


# --------------------------------------------------------------------------- ASR


def naive_trim(asr: WhisperAsr, samples: FloatArray) -> Transcript:
    """Encode only the real frames and decode from that alone (the ablation)."""
    started = time.perf_counter()
    model: Any = asr._model  # measurement code: reuses the engine's internals
    features = model.feature_extractor(samples)
    frames = features.shape[-1] + features.shape[-1] % 2
    padded = np.zeros((features.shape[0], frames), dtype=np.float32)
    padded[:, :features.shape[-1]] = features
    text, no_speech, logprob = asr._decode(asr._encode(padded), "en", len(samples) / ASR_RATE)
    return Transcript(text, "en", len(samples) / ASR_RATE, time.perf_counter() - started,
                      "naive", no_speech, logprob)


def run_asr(asr: WhisperAsr, clips: list[tuple[str, FloatArray]]) -> dict[str, Any]:
    ways: dict[str, Callable[[FloatArray], Transcript]] = {
        "reference": asr.transcribe_reference,
        "padded": lambda a: asr.transcribe(a, trim_padding=False),
        "trimmed": lambda a: asr.transcribe(a, trim_padding=True),
        "naive trim": lambda a: naive_trim(asr, a),
    }
    for way in ways.values():  # warm every path once
        way(clips[0][1])
    results: dict[str, Any] = {}
    for name, way in ways.items():
        errors = words = 0
        latencies: list[float] = []
        wrong: list[tuple[str, str]] = []
        for reference, audio in clips:
            result = way(audio)
            e, n = word_errors(reference, result.text)
            errors, words = errors + e, words + n
            latencies.append(result.latency_s)
            if e:
                wrong.append((reference, result.text))
        results[name] = {"wer": errors / words, "errors": errors, "words": words,
                         "latencies": latencies, "wrong": wrong}
    return results


def print_asr(title: str, results: dict[str, Any], durations: list[float]) -> None:
    print(f"\n{title}  ({len(durations)} clip(s), {min(durations):.2f}-{max(durations):.2f} s)")
    print(f"  {'way':<11} {'WER':>7} {'errors':>9} {'median':>10} {'p90':>10}")
    for name, r in results.items():
        print(f"  {name:<11} {100 * r['wer']:6.1f}% {r['errors']:>4}/{r['words']:<4} "
              f"{median_ms(r['latencies']):>10} {p90_ms(r['latencies']):>10}")
    ref = statistics.median(results["reference"]["latencies"])
    ours = statistics.median(results["trimmed"]["latencies"])
    print(f"  reference / trimmed median latency: {ref / ours:.1f}x")
    for name in ("reference", "trimmed"):
        for reference, heard in results[name]["wrong"]:
            print(f"    {name:<9} {reference!r} -> {heard[:70]!r}")
    naive = results["naive trim"]["wrong"]
    if naive:
        print(f"    naive trim: {len(naive)} clip(s) wrong, e.g. {naive[0][1][:70]!r}...")


# --------------------------------------------------------------------------- TTS


async def word_tokens(text: str) -> AsyncIterator[str]:
    words = text.split(" ")
    for i, word in enumerate(words):
        yield word if i == 0 else " " + word


async def time_to_first_audio(tts: PiperTts, text: str, play_all: bool = False) -> float:
    """Seconds until the first piece of audio; the rest is dropped unless ``play_all``
    (a sentence enters the phrase cache only once all of it has been produced)."""
    started = time.perf_counter()
    stream = tts.stream(word_tokens(text))
    await stream.__anext__()
    elapsed = time.perf_counter() - started
    if play_all:
        async for _ in stream:
            pass
    await stream.aclose()
    return elapsed


def run_tts(tts: PiperTts, rounds: int) -> dict[str, Any]:
    asyncio.run(time_to_first_audio(tts, "Warming up the stream."))
    first: list[float] = []
    whole: list[float] = []
    for _ in range(rounds):
        for reply in REPLIES:
            first.append(asyncio.run(time_to_first_audio(tts, reply)))
            started = time.perf_counter()
            tts.synthesize(reply)
            whole.append(time.perf_counter() - started)
    return {"first": first, "whole": whole}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tts-rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    settings = load_settings({"JARVIS_CACHE_DIR": ""})

    print(f"speech bench · {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} · "
          f"{settings.asr.threads} ASR threads · ASR {settings.asr.compute_type}, "
          f"beam {settings.asr.beam_size}, language {settings.asr.language or 'auto'}")
    asr = WhisperAsr(settings.asr)
    asr.load()
    tts = PiperTts(settings.tts)  # no phrase cache: every reply is synthesised
    tts.load()
    print(f"load + warm-up: ASR {asr.load_s:.2f} s ({asr.model_label}), "
          f"TTS {tts.load_s:.2f} s ({tts.voice_path.name if tts.voice_path else '?'})")

    commands = [line.strip() for line in (DATA / "commands.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    pre, post = np.zeros(int(0.3 * ASR_RATE), np.float32), np.zeros(int(0.4 * ASR_RATE),
                                                                     np.float32)
    command_clips = [
        (c, np.concatenate([pre, resample(tts.synthesize(c.capitalize() + "."),
                                          tts.sample_rate, ASR_RATE), post]))
        for c in commands
    ]
    jfk = read_audio(DATA / "jfk-16k-mono.wav").samples
    jfk_results = run_asr(asr, [(JFK_TEXT, jfk)])
    print_asr("ASR · jfk-16k-mono.wav", jfk_results, [len(jfk) / ASR_RATE])
    cmd_results = run_asr(asr, command_clips)
    durations = [len(a) / ASR_RATE for _, a in command_clips]
    print_asr("ASR · home commands spoken by piper", cmd_results, durations)

    tts_results = run_tts(tts, args.tts_rounds)
    firsts = [len(split_sentences(r)[0]) for r in REPLIES]
    first_s, whole_s = tts_results["first"], tts_results["whole"]
    print(f"\nTTS · {len(REPLIES)} replies x {args.tts_rounds}, first sentence "
          f"{min(firsts)}-{max(firsts)} characters, replies {min(map(len, REPLIES))}-"
          f"{max(map(len, REPLIES))} characters")
    print(f"  streaming, time to first audio {median_ms(first_s)} median, "
          f"p90 {p90_ms(first_s)}")
    print(f"  whole reply first              {median_ms(whole_s)} median, "
          f"p90 {p90_ms(whole_s)}")
    print(f"  whole / streaming: {statistics.median(whole_s) / statistics.median(first_s):.1f}x")
    with tempfile.TemporaryDirectory() as tmp:  # the phrase cache, for scale
        tts.cache = PhraseCache(Path(tmp), settings.tts.phrase_cache_bytes, "bench")
        miss = asyncio.run(time_to_first_audio(tts, "OK, done.", play_all=True))
        hits = [asyncio.run(time_to_first_audio(tts, "OK, done.")) for _ in range(5)]
        assert tts.cache.hits >= 5
        tts.close()
    print(f"  phrase cache: 'OK, done.' first {1000 * miss:.1f} ms, then "
          f"{median_ms(hits).strip()} median from the cache")

    vad = SileroVad()
    frames = jfk[: len(jfk) // FRAME * FRAME]
    started = time.perf_counter()
    for i in range(0, len(frames), FRAME):
        vad.score(frames[i:i + FRAME])
    per_frame = (time.perf_counter() - started) / (len(frames) // FRAME)
    print(f"\nVAD · Silero v6, one 32 ms frame at a time: {1000 * per_frame:.2f} ms per frame "
          f"({per_frame / 0.032 * 100:.1f} % of real time)")

    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other work on the machine "
          "inflates every latency above)")
    if args.json:
        args.json.write_text(json.dumps({
            "asr_jfk": {k: {kk: vv for kk, vv in v.items() if kk != "wrong"}
                        for k, v in jfk_results.items()},
            "asr_commands": {k: {kk: vv for kk, vv in v.items() if kk != "wrong"}
                             for k, v in cmd_results.items()},
            "tts": tts_results,
            "vad_ms_per_frame": 1000 * per_frame,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
