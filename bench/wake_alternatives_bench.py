#!/usr/bin/env python3
"""Other second stages for the wake word, tried on the utterances the pipeline's own
front end lets through (issue 15): could anything bundled here lift the accept rate in
noise without letting a near miss through?

The utterances are those of section (d) of ``bench/wakeword_bench.py`` at cut-off 0.8:
every positive trial (piper, shifted piper and espeak-ng wake phrases, clean / 20 dB /
10 dB) and the 73-minute negative stream go through ``FrontEnd`` with the
``hey_jarvis`` gate, and each utterance that carried a detection is kept. Each is then
judged by

* ``shipped``: what ``VoicePipeline`` decides (``confirmed_request`` on
  ``WhisperAsr.transcribe(audio, wake_phrase="Hey Jarvis")``);
* ``noise suppression N``: the same after WebRTC's noise suppressor (``pywebrtc-audio``,
  already a dependency for echo cancellation) at level N (1 moderate, 3 very high);
* ``openWakeWord``: the ``hey_jarvis`` model of openWakeWord (``pyopen-wakeword``,
  optional: ``pip install pyopen-wakeword==1.1.0``), a second wake model trained on
  other data, as a booster (``shipped``, or its peak probability >= 0.5 with the forced
  score >= ``WAKE_LOGPROB_CORROBORATED``) and as a veto (``shipped`` and >= 0.5).

A trial is accepted when any of its utterances passes; a false accept is an utterance
of the negative stream that passes (shown with the pipeline's own transcript of it).
(The gate goes back to sleep after the shipped check fails, whatever the other rule
would have said: the trials are short, so this changes nothing that is counted.)
Transcripts come from the wake-word bench's cache and are added to it, so a rerun takes
a few minutes plus openWakeWord's.

    python bench/wake_alternatives_bench.py [--no-oww]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wakeword_bench as wb

from jarvis.audio import ASR_RATE, FloatArray
from jarvis.config import AsrSettings, load_settings
from jarvis.evaluation import voices
from jarvis.evaluation.voices import WAKE_PHRASE
from jarvis.speech.asr import WAKE_LOGPROB_CORROBORATED, Transcript
from jarvis.voice.listening import confirmed_request

CUTOFF = 0.8
OWW_MIN = 0.5
NS_LEVELS = (1, 3)


@dataclass
class Utterance:
    """One utterance that carried a detection: ``trial`` is the positive trial's index,
    or -1 for the negative stream."""

    trial: int
    audio: FloatArray
    transcript: Transcript
    verdicts: dict[str, bool] = field(default_factory=dict)


class Recording(wb.Transcripts):
    """The bench's transcript cache, keeping each utterance transcribed with the wake
    phrase (the ones that carried a detection)."""

    def __init__(self, directory: Path, settings: AsrSettings) -> None:
        super().__init__(directory, settings)
        self.trial = -1
        self.recording = True
        self.kept: list[Utterance] = []

    def __call__(self, audio: FloatArray, wake_phrase: str = "") -> tuple[Transcript, float]:
        transcript, cpu = super().__call__(audio, wake_phrase)
        if wake_phrase and self.recording:
            self.kept.append(Utterance(self.trial, np.array(audio, np.float32), transcript))
        return transcript, cpu


def suppressed(audio: FloatArray, level: int) -> FloatArray:
    """``audio`` through WebRTC's noise suppressor (10 ms frames, 16-bit)."""
    from pywebrtc_audio import NoiseSuppressor

    ns = NoiseSuppressor(ASR_RATE, 1, level)
    frames = len(audio) // 160 * 160
    pcm = (np.clip(audio[:frames], -1.0, 1.0) * 32767).astype(np.int16)
    return (np.asarray(ns.process(pcm), np.float32) / 32767).astype(np.float32)


def oww_scorer() -> Callable[[FloatArray], float] | None:
    """The peak probability of openWakeWord's ``hey_jarvis`` over an utterance, or None
    when ``pyopen-wakeword`` is not installed."""
    try:
        from pyopen_wakeword import (  # type: ignore[import-not-found, unused-ignore]
            Model,
            OpenWakeWord,
            OpenWakeWordFeatures,
        )
    except ImportError:
        return None
    model = OpenWakeWord.from_builtin(Model.HEY_JARVIS)
    features = OpenWakeWordFeatures.from_builtin()

    def score(audio: FloatArray) -> float:
        model.reset()
        features.reset()
        tail = np.zeros(ASR_RATE // 2, np.float32)  # its window ends after the phrase
        pcm = (np.clip(np.concatenate([audio, tail]), -1.0, 1.0) * 32767).astype(np.int16)
        return max((float(p) for f in features.process_streaming(pcm.tobytes())
                    for p in model.process_streaming(f)), default=0.0)

    return score


def collect(transcripts: Recording, corpus: wb.Corpus) -> tuple[list[str], float]:
    """Run the gate over the positive trials and the negative stream; each trial's
    source (piper, piper-shift, espeak) and the stream's length in hours."""
    settings = load_settings({"JARVIS_CACHE_DIR": ""})
    other = wb.negatives(corpus, 1.0, 0)
    babble = wb.talkers(other)
    gate = wb.Gate(CUTOFF, settings, transcripts, follow_ons=False)
    sources = []
    for trial, (clip, _, audio, _) in enumerate(wb.trials(wb.positives(corpus), babble)):
        transcripts.trial = trial
        sources.append(clip.source)
        gate.start()
        gate.feed(audio)
        gate.finish()
    transcripts.trial = -1
    gate.transcribe_follow_ons = True
    stream = wb.false_accepts(other, 0, babble, [gate])
    transcripts.save()
    transcripts.recording = False
    return sources, stream["stream_s"] / 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-oww", action="store_true", help="leave openWakeWord out")
    args = parser.parse_args()
    directory = voices.cache_dir("wakeword")
    settings = load_settings({"JARVIS_CACHE_DIR": ""})
    transcripts = Recording(directory, settings.asr)
    started = time.perf_counter()
    sources, hours = collect(transcripts, wb.Corpus(directory))
    kept = transcripts.kept
    print(f"wake second stages · cut-off {CUTOFF:g} · {len(kept)} utterances carried a "
          f"detection ({time.perf_counter() - started:.0f} s)", flush=True)
    phrase = WAKE_PHRASE
    for u in kept:
        u.verdicts["shipped"] = confirmed_request(u.transcript, phrase) is not None
    for level in NS_LEVELS:
        started = time.perf_counter()
        for u in kept:
            transcript, _ = transcripts(suppressed(u.audio, level), phrase)
            u.verdicts[f"noise suppression {level}"] = (
                confirmed_request(transcript, phrase) is not None)
        print(f"  noise suppression {level}: {time.perf_counter() - started:.0f} s", flush=True)
    transcripts.save()
    score = None if args.no_oww else oww_scorer()
    if score is None and not args.no_oww:
        print("  openWakeWord left out: pip install pyopen-wakeword==1.1.0")
    if score is not None:
        cpu = time.process_time()
        peaks = [score(u.audio) for u in kept]
        audio_s = sum(len(u.audio) for u in kept) / ASR_RATE
        print(f"  openWakeWord: {time.process_time() - cpu:.0f} CPU s for {audio_s:.0f} s "
              "of audio")
        for u, peak in zip(kept, peaks, strict=True):
            forced = u.transcript.wake_score
            corroborated = forced is not None and forced >= WAKE_LOGPROB_CORROBORATED
            u.verdicts[f"openWakeWord booster (>= {OWW_MIN:g})"] = (
                u.verdicts["shipped"] or (peak >= OWW_MIN and corroborated))
            u.verdicts[f"openWakeWord veto (>= {OWW_MIN:g})"] = (
                u.verdicts["shipped"] and peak >= OWW_MIN)
    report(kept, sources, hours)
    return 0


def report(kept: list[Utterance], sources: list[str], hours: float) -> None:
    trials = {"piper+shift": [t for t, s in enumerate(sources) if s != "espeak"],
              "espeak": [t for t, s in enumerate(sources) if s == "espeak"]}
    print(f"\n{'second stage':36s}" + "".join(f"{n:>22s}" for n in trials)
          + f"   false accepts ({hours * 60:.1f} min)")
    for rule in kept[0].verdicts if kept else []:
        accepted = {u.trial for u in kept if u.trial >= 0 and u.verdicts[rule]}
        cells = "".join(
            f"{sum(t in accepted for t in ts):>9d}/{len(ts):<4d}"
            f"{100 * sum(t in accepted for t in ts) / len(ts):6.1f} %" for ts in trials.values())
        false = [u for u in kept if u.trial < 0 and u.verdicts[rule]]
        print(f"{rule:36s}{cells}   {len(false)} = {len(false) / hours:.2f}/h"
              + "".join(f"\n{'':40s}transcript {u.transcript.text!r}" for u in false))


if __name__ == "__main__":
    sys.exit(main())
