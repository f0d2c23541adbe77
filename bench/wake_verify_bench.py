#!/usr/bin/env python3
"""Second-stage wake check on the wake-word bench's whole clips: is "hey jarvis" there?
Three ways side by side (issue 15):

1. ``transcript``: the check before the forced score. tiny.en transcribes the clip and
   :func:`~jarvis.voice.listening.wake_request` looks for the phrase.
2. ``forced >= -1``: ``WhisperAsr.transcribe(audio, wake_phrase="Hey Jarvis")`` makes
   whisper read " Hey Jarvis" (or " Hey, Jarvis") at the start of the clip
   (CTranslate2's ``align``, the word-timestamp machinery); the mean log-probability of
   those tokens (``wake_score``) must be at least ``WAKE_LOGPROB_MIN``.
3. ``pipeline``: what ``VoicePipeline`` decides,
   :func:`~jarvis.voice.listening.confirmed_request` on that transcript (the score
   alone, or a lower score with the free transcript agreeing).

The clips are whole: the piper wake phrases of ``bench/wakeword_bench.py`` (the bundled
voice at three speeds, and shifted x0.9 / x1.1), its near misses (piper and espeak-ng),
and ``--everyday`` of its ordinary piper sentences. Without noise, and without the
front end's segmentation, so the rates are for the check alone; section (d) of
``bench/wakeword_bench.py`` measures the pipeline in noise. The corpus comes from that
bench's cache (``~/.cache/jarvis-bench/wakeword``).

    python bench/wake_verify_bench.py [--everyday 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wakeword_bench as corpus_bench

from jarvis.config import load_settings
from jarvis.evaluation.wer import word_errors
from jarvis.speech.asr import WAKE_LOGPROB_MIN, WhisperAsr
from jarvis.voice.listening import confirmed_request, wake_request

PHRASE = "Hey Jarvis"
WAKE_GROUP = "wake phrases (piper, shifted)"
WAYS = ("transcript", f"forced >= {WAKE_LOGPROB_MIN:g}", "pipeline")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--everyday", type=int, default=60, help="ordinary sentences to add")
    args = p.parse_args()
    corpus = corpus_bench.Corpus(Path("~/.cache/jarvis-bench/wakeword").expanduser())
    negatives = corpus_bench.negatives(corpus, 1.0, 0)
    groups: dict[str, list[Any]] = {
        WAKE_GROUP: [c for c in corpus_bench.positives(corpus)
                                          if c.source != "espeak"],
        "near misses": [c for c in negatives if c.category == "near_miss"],
        "everyday": [c for c in negatives if c.category == "everyday"
                     and c.source == "piper"][:args.everyday],
    }
    asr = WhisperAsr(load_settings({"JARVIS_CACHE_DIR": ""}).asr)
    asr.load()
    passed: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    scores: dict[str, list[float]] = defaultdict(list)
    times: dict[str, list[tuple[float, float]]] = defaultdict(list)
    request_errors: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, clips in groups.items():
        for clip in clips:
            started = time.perf_counter()
            free = asr.transcribe(clip.audio)
            middle = time.perf_counter()
            woke = asr.transcribe(clip.audio, wake_phrase=PHRASE)
            times[name].append((middle - started, time.perf_counter() - middle))
            score = woke.wake_score if woke.wake_score is not None else -99.0
            scores[name].append(score)
            by_words, confirmed = wake_request(free.text, PHRASE), confirmed_request(woke, PHRASE)
            checks = (by_words is not None, woke.wake_heard, confirmed is not None)
            said = wake_request(clip.text, PHRASE) if name == WAKE_GROUP else None
            if said is not None:  # how well is the request after the wake phrase heard?
                for way, heard in (("transcript", by_words), ("pipeline", confirmed)):
                    errors, words = word_errors(said, heard if heard is not None else "")
                    request_errors[way][0] += errors
                    request_errors[way][1] += words
            for way, ok in zip(WAYS, checks, strict=True):
                if ok:
                    passed[name][way].append(clip.text)
    ways = list(WAYS)
    print(f"{'clips':<32} {'n':>4} " + "".join(f"{w:>18}" for w in ways)
          + "   forced score min / median / max")
    for name, clips in groups.items():
        s = np.asarray(scores[name])
        print(f"{name:<32} {len(clips):>4} "
              + "".join(f"{len(passed[name][w]):>12} "
                        f"{100 * len(passed[name][w]) / len(clips):4.0f}%" for w in ways)
              + f"   {s.min():.2f} / {np.median(s):.2f} / {s.max():.2f}")
    for name in groups:
        free_s, woke_s = (1000 * np.median(np.asarray(times[name])[:, i]) for i in (0, 1))
        print(f"time per clip, {name}: transcript {free_s:.0f} ms, with the wake phrase "
              f"{woke_s:.0f} ms ({woke_s - free_s:+.0f} ms; medians)")
    print("word error rate of the request after a wake phrase (a missed phrase counts as "
          "the whole request lost): " + ", ".join(
              f"{way} {100 * e / max(n, 1):.1f} % ({e}/{n})"
              for way, (e, n) in request_errors.items()))
    for way in ways:
        near = passed["near misses"][way]
        if near:
            counts: dict[str, int] = defaultdict(int)
            for text in near:
                counts[text] += 1
            print(f"near misses passing {way}: "
                  + "; ".join(f"{t!r} x{n}" for t, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
