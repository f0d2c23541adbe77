#!/usr/bin/env python3
"""Second-stage wake check, two ways, on the wake-word bench's clips: is "hey jarvis"
there? (a probe for issue 15; nothing in Jarvis uses the forced score yet)

1. ``transcript``: what the pipeline does today. tiny.en transcribes the clip and
   :func:`~jarvis.voice.listening.wake_request` looks for the phrase.
2. ``forced``: whisper is made to read " Hey Jarvis" (or " Hey, Jarvis") at the start
   of the clip (CTranslate2's ``align``, the word-timestamp machinery). The score is
   the mean log-probability of those tokens; the check passes at ``ln 0.5`` per token
   (each token more likely than not), and, for comparison, at -1.0.

The clips are whole: the piper wake phrases of ``bench/wakeword_bench.py`` (the bundled
voice at three speeds, and shifted x0.9 / x1.1), its near misses (piper and espeak-ng),
and ``--everyday`` of its ordinary piper sentences. Without noise, and without the
front end's segmentation, so the rates are for the check alone, not for the pipeline.
The corpus comes from that bench's cache (``~/.cache/jarvis-bench/wakeword``).

    python bench/wake_verify_bench.py [--everyday 60]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wakeword_bench as corpus_bench

from jarvis.config import load_settings
from jarvis.speech.asr import WhisperAsr
from jarvis.voice.listening import wake_request

PHRASES = (" Hey Jarvis", " Hey, Jarvis")
THRESHOLDS = (math.log(0.5), -1.0)


def forced_score(asr: WhisperAsr, audio: np.ndarray) -> float:
    """Mean log-probability per token of the best of :data:`PHRASES` read at the start."""
    import ctranslate2

    # A probe: the aligner is not part of WhisperAsr's API yet, so this uses its model,
    # its padded encoder pass and its tokenizer directly.
    model: Any = asr._model
    tokenizer = asr._tokenizer("en")
    features = model.feature_extractor(audio)
    encoded = ctranslate2.StorageView.from_array(
        np.ascontiguousarray(asr._encode_features(features, False)))
    frames = min(features.shape[-1], 3000)
    best = -math.inf
    for phrase in PHRASES:
        result = model.model.align(encoded, tokenizer.sot_sequence, [tokenizer.encode(phrase)],
                                   frames // 2)
        probs = result[0].text_token_probs
        best = max(best, sum(math.log(max(p, 1e-9)) for p in probs) / len(probs))
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--everyday", type=int, default=60, help="ordinary sentences to add")
    args = p.parse_args()
    corpus = corpus_bench.Corpus(Path("~/.cache/jarvis-bench/wakeword").expanduser())
    negatives = corpus_bench.negatives(corpus, 1.0, 0)
    groups: dict[str, list[Any]] = {
        "wake phrases (piper, shifted)": [c for c in corpus_bench.positives(corpus)
                                          if c.source != "espeak"],
        "near misses": [c for c in negatives if c.category == "near_miss"],
        "everyday": [c for c in negatives if c.category == "everyday"
                     and c.source == "piper"][:args.everyday],
    }
    asr = WhisperAsr(load_settings({"JARVIS_CACHE_DIR": ""}).asr)
    asr.load()
    passed: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    scores: dict[str, list[float]] = defaultdict(list)
    for name, clips in groups.items():
        for clip in clips:
            text = asr.transcribe(clip.audio).text
            if wake_request(text, "Hey Jarvis") is not None:
                passed[name]["transcript"].append(clip.text)
            score = forced_score(asr, clip.audio)
            scores[name].append(score)
            for threshold in THRESHOLDS:
                if score >= threshold:
                    passed[name][f"forced >= {threshold:.2f}"].append(clip.text)
    ways = ["transcript", *(f"forced >= {t:.2f}" for t in THRESHOLDS)]
    print(f"{'clips':<32} {'n':>4} " + "".join(f"{w:>18}" for w in ways)
          + "   forced score min / median / max")
    for name, clips in groups.items():
        s = np.asarray(scores[name])
        print(f"{name:<32} {len(clips):>4} "
              + "".join(f"{len(passed[name][w]):>12} "
                        f"{100 * len(passed[name][w]) / len(clips):4.0f}%" for w in ways)
              + f"   {s.min():.2f} / {np.median(s):.2f} / {s.max():.2f}")
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
