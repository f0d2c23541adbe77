#!/usr/bin/env python3
"""Wake-word benchmark: the microWakeWord ``hey_jarvis`` model against synthesized speech,
alone and as the pipeline uses it (the model opens the gate, whisper must read the
wake phrase at the start of the utterance), and its CPU cost next to transcript
matching alone (Silero VAD + faster-whisper).

(a) Accept rate of the model alone (its own cut-off, 0.97): "Hey Jarvis, <request>"
    said by piper (the bundled voice at length_scale 0.8 / 1.0 / 1.2), by the same
    piper clips pitch/tempo-shifted (resampled by 0.9 and 1.1 and taken as 16 kHz: a
    longer or shorter vocal tract) and by espeak-ng (14 English voices and variants,
    140-220 words per minute), each clean and with pink, white or babble noise at
    20 dB and 10 dB SNR. Target >= 95 %.
(b) False accepts per hour of the model alone: at least an hour of speech without the
    wake phrase (household talk, TV lines, near misses such as "Hey Travis", "Jarvis is
    a name", jfk-16k-mono.wav) by both voices, plus stretches of noise, as one
    continuous stream with pauses, a third each clean / 20 dB / 10 dB. Target <= 0.5
    per hour.
(c) CPU: process CPU seconds per hour of audio (``time.process_time``, all threads) for
    the detector alone, for Silero VAD alone, for transcript matching alone (Silero
    endpointing + whisper on every utterance + ``WakePhrase``) on the first
    ``--asr-minutes`` of the same stream, scaled to an hour, and for the two-stage
    wake of (d): the front end (detector, Silero only while the gate is open) and
    whisper on what the gate lets through, on the whole stream.
(d) Two-stage wake, as the pipeline runs it, at cut-offs 0.97 / 0.9 / 0.8 / 0.6: every
    positive trial and the whole negative stream go through
    ``FrontEnd(Endpointer(settings.vad), detector=WakeWordDetector(cutoff=...))`` in
    512-sample chunks; the utterance that spans or follows a detection (it starts in
    the 1.5 s pre-roll) is transcribed by ``WhisperAsr`` with the wake phrase and must
    pass ``confirmed_request``: whisper reads "Hey Jarvis" at its start with a mean token
    log-probability of at least ``WAKE_LOGPROB_MIN`` (or ``WAKE_LOGPROB_CORROBORATED``
    when the free transcript has the phrase too). Beside it, in the same run, the
    check before it: ``wake_request(free transcript, "Hey Jarvis")``. Accepted = fired
    and confirmed; a false accept = a confirmed detection in the negative stream. Also
    counted: utterances without the wake word that start within ``AWAKE_S`` of a
    confirmed one, which the pipeline answers too ("hey jarvis ... what time is it").

The corpus is synthesized once and kept under ~/.cache/jarvis-bench/wakeword (one .npy
per clip), and so are the transcripts (transcripts.json, by the utterance's audio);
later runs take a few minutes. ``--clear`` makes both again.

    python bench/wakeword_bench.py [--hours 1] [--asr-minutes 10] [--no-asr] [--json [FILE]]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio import ASR_RATE, FloatArray, read_audio
from jarvis.config import AsrSettings, Settings, load_settings
from jarvis.evaluation import voices
from jarvis.evaluation.voices import (
    ESPEAK_VOICES,
    NEAR_MISSES,
    WAKE_PHRASE,
    WAKE_REQUESTS,
    cache_key,
    cached_audio,
    everyday_sentences,
)
from jarvis.speech.asr import (
    WAKE_LOGPROB_CORROBORATED,
    WAKE_LOGPROB_MIN,
    Transcript,
    WhisperAsr,
)
from jarvis.speech.silero import Endpointer
from jarvis.speech.tts import PiperTts
from jarvis.speech.vad import SpeechStarted, UtteranceEnded, VadEvent
from jarvis.speech.wakeword import WakeDetection, WakeWordDetector
from jarvis.voice.listening import (
    AWAKE_S,
    PREROLL_S,
    FrontEnd,
    confirmed_request,
    wake_request,
)

ROOT = Path(__file__).resolve().parent.parent
JFK = ROOT / "tests" / "data" / "jfk-16k-mono.wav"
CORPUS_VERSION = 1
CHUNK = 1280  # 80 ms, a typical microphone block
PIPER_SCALES = (0.8, 1.0, 1.2)
SHIFTS = (0.9, 1.1)  # piper resampled by these factors and taken as 16 kHz
CUTOFFS = (0.97, 0.9, 0.8, 0.6)  # the model's own first
FRONT_CHUNK = 512  # what the pipeline's microphone hands the front end (32 ms)
TRANSCRIPTS_VERSION = 1
CHECKS = ("forced", "transcript")
"""Second stages (d) compares: the pipeline's, and the transcript check before it."""
SOURCES = ("piper", "piper-shift", "espeak")
ESPEAK_SPEEDS = (140, 160, 180, 200, 220)
SNRS: tuple[float, ...] = (float("inf"), 20.0, 10.0)
NOISE_KINDS = ("pink", "white", "babble")


@dataclass
class Clip:
    category: str  # wake, everyday, near_miss, jfk, noise
    source: str  # piper, piper-shift, espeak, recording, noise
    voice: str
    speed: str
    text: str
    audio: FloatArray = field(repr=False)

    @property
    def seconds(self) -> float:
        return len(self.audio) / ASR_RATE

    def label(self) -> str:
        return f"{self.source} {self.voice} {self.speed}: {self.text!r}"


class Corpus:
    """Clips made once and cached as .npy."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made = 0
        self.made_s = 0.0
        self._tts: PiperTts | None = None

    def tts(self) -> PiperTts:
        if self._tts is None:
            self._tts = PiperTts(load_settings({"JARVIS_CACHE_DIR": ""}).tts)
            self._tts.load()
        return self._tts

    def _cached(self, key: tuple[object, ...], make: Any) -> FloatArray:
        def timed() -> FloatArray:
            started = time.perf_counter()
            audio: FloatArray = make()
            self.made += 1
            self.made_s += time.perf_counter() - started
            return audio

        return cached_audio(self.directory, cache_key(CORPUS_VERSION, *key), timed)

    def piper(self, category: str, text: str, scale: float) -> Clip:
        audio = self._cached(("piper", scale, text),
                             lambda: voices.piper_say(self.tts(), text, scale))
        return Clip(category, "piper", "joe-medium", f"x{scale}", text, audio)

    def piper_shifted(self, category: str, text: str, scale: float, factor: float) -> Clip:
        """The piper clip played ``factor`` times as fast (pitch and formants too)."""
        base = self.piper(category, text, scale)
        return Clip(category, "piper-shift", f"joe-medium@{factor}", f"x{scale}", text,
                    voices.shift_voice(base.audio, factor))

    def espeak(self, category: str, text: str, voice: str, wpm: int) -> Clip:
        audio = self._cached(("espeak", voice, wpm, text),
                             lambda: voices.espeak_say(text, voice, wpm))
        return Clip(category, "espeak", voice, f"{wpm}wpm", text, audio)


# --------------------------------------------------------------------------- corpus


def positives(corpus: Corpus) -> list[Clip]:
    """Piper: every request at every speed, and each of those shifted by each factor.
    espeak: every voice at every speed, two requests each (rotating). So 90 + 180 +
    140 clips."""
    clips = [corpus.piper("wake", f"{WAKE_PHRASE}, {request}.", scale)
             for scale in PIPER_SCALES for request in WAKE_REQUESTS]
    clips += [corpus.piper_shifted("wake", f"{WAKE_PHRASE}, {request}.", scale, factor)
              for factor in SHIFTS for scale in PIPER_SCALES for request in WAKE_REQUESTS]
    requests = itertools.cycle(WAKE_REQUESTS)
    for voice in ESPEAK_VOICES:
        for wpm in ESPEAK_SPEEDS:
            for _ in range(2):
                clips.append(corpus.espeak("wake", f"{WAKE_PHRASE}, {next(requests)}.",
                                           voice, wpm))
    return clips


def negatives(corpus: Corpus, hours: float, seed: int) -> list[Clip]:
    """At least ``hours`` of speech and noise without the wake phrase (with the pauses
    the stream adds, about 10 % more)."""
    rng = np.random.default_rng(seed)
    sentences = everyday_sentences(400, seed)
    clips: list[Clip] = []
    for i, text in enumerate(sentences):  # piper: every sentence once (about 15 minutes)
        clips.append(corpus.piper("everyday", text, PIPER_SCALES[i % 3]))
    for text in NEAR_MISSES:
        for scale in PIPER_SCALES:
            clips.append(corpus.piper("near_miss", text, scale))
        for k in range(5):
            voice = ESPEAK_VOICES[(hash_index(text) + 3 * k) % len(ESPEAK_VOICES)]
            clips.append(corpus.espeak("near_miss", text, voice, ESPEAK_SPEEDS[k]))
    jfk = read_audio(JFK).samples
    clips += [Clip("jfk", "recording", "kennedy", "x1", "jfk-16k-mono.wav", jfk)] * 3
    babble_source = np.concatenate([c.audio for c in clips[:60]])
    for i in range(12):  # six minutes of noise alone, at a moderate level
        kind = NOISE_KINDS[i % 3]
        audio = 0.03 * voices.noise(kind, 30 * ASR_RATE, seed=100 + i,
                                    source=babble_source if kind == "babble" else None)
        clips.append(Clip("noise", "noise", kind, "-", f"{kind} noise", audio))
    total = sum(c.seconds for c in clips)
    target = hours * 3600 / 1.1
    cycle = itertools.cycle(sentences)
    i = 0
    while total < target:  # espeak fills the rest
        text = next(cycle)
        voice = ESPEAK_VOICES[int(rng.integers(len(ESPEAK_VOICES)))]
        wpm = int(rng.integers(140, 221) // 10 * 10)
        clip = corpus.espeak("everyday", text, voice, wpm)
        clips.append(clip)
        total += clip.seconds
        i += 1
    return clips


def hash_index(text: str) -> int:
    return int(cache_key(text)[:8], 16)


def noisy(audio: FloatArray, snr: float, seed: int, babble: FloatArray) -> tuple[FloatArray, str]:
    if snr == float("inf"):
        return audio, "clean"
    kind = NOISE_KINDS[seed % 3]
    return (voices.add_noise(audio, snr, seed, kind, babble if kind == "babble" else None),
            kind)


def stream_segments(clips: list[Clip], seed: int,
                    babble: FloatArray) -> Iterator[tuple[int, Clip, FloatArray, str]]:
    """The negative stream, segment by segment: (index, clip, audio with its pause after,
    condition), shuffled; a third each clean / 20 dB / 10 dB (noise over the pause too)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    for n, index in enumerate(order):
        clip = clips[int(index)]
        gap = np.zeros(int(rng.uniform(0.3, 1.5) * ASR_RATE), np.float32)
        audio = np.concatenate([clip.audio, gap])
        snr = SNRS[n % 3] if clip.category != "noise" else float("inf")
        mixed, kind = noisy(audio, snr, n, babble)
        yield n, clip, mixed, "clean" if snr == float("inf") else f"{snr:.0f} dB {kind}"


# --------------------------------------------------------------------------- second stage


class Transcripts:
    """``WhisperAsr.transcribe`` of utterances, kept in ``transcripts.json`` by the hash
    of the audio and the ASR settings that change the text, with the process CPU time
    each took when it was made (so the cost can be reported on a rerun too). Whisper
    is loaded only when something is missing."""

    def __init__(self, directory: Path, settings: AsrSettings) -> None:
        self.settings = settings
        self.path = directory / "transcripts.json"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}
        self._prefix = cache_key(TRANSCRIPTS_VERSION, settings.model, settings.language,
                                 settings.compute_type, settings.beam_size,
                                 settings.trim_padding)[:8]
        self._asr: WhisperAsr | None = None
        self.label = WhisperAsr(settings).model_label
        self.made = 0
        self.made_s = 0.0
        self.used = 0

    def __call__(self, audio: FloatArray, wake_phrase: str = "") -> tuple[Transcript, float]:
        """The transcript (with ``wake_phrase``: as the pipeline makes it after a wake-word
        detection, with the phrase's forced-alignment score), and the CPU seconds it took."""
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        key = self._prefix + hashlib.sha1(samples.tobytes()).hexdigest()[:24]
        if wake_phrase:
            key += f"|wake:{wake_phrase}"
        self.used += 1
        entry = self.entries.get(key)
        if entry is None:
            if self._asr is None:
                self._asr = WhisperAsr(self.settings)
                self._asr.load()
            started, wall = time.process_time(), time.perf_counter()
            made = self._asr.transcribe(samples, wake_phrase=wake_phrase)
            entry = {"text": made.text, "cpu_s": round(time.process_time() - started, 5),
                     "audio_s": round(len(samples) / ASR_RATE, 3),
                     "wake_score": made.wake_score, "wake_prefix": made.wake_prefix}
            self.entries[key] = entry
            self.made += 1
            self.made_s += time.perf_counter() - wall
            if self.made % 200 == 0:
                self.save()
        score = entry.get("wake_score")
        return Transcript(str(entry["text"]), "en", float(entry["audio_s"]), 0.0,
                          wake_score=None if score is None else float(score),
                          wake_prefix=str(entry.get("wake_prefix", ""))), float(entry["cpu_s"])

    def save(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)


@dataclass
class Woken:
    """A detection, and the utterance that carried it to the transcript check."""

    at: int  # stream sample of the detection
    probability: float
    text: str | None = None  # None: no utterance ended after it
    confirmed: bool = False


@dataclass
class FollowOn:
    """An utterance without the wake word that the pipeline answers all the same: it
    started within ``AWAKE_S`` of a confirmed wake word ("hey jarvis ... what time is
    it"). (After a reply the follow-up window would also let speech through; there are
    no replies here.)"""

    at: int  # stream sample where it ended
    text: str | None  # None: not transcribed (positive trials)


class Gate:
    """The pipeline's front end (wake-word gate + Silero endpointer, no echo
    cancellation) at one cut-off, and a second stage: the utterance that spans or
    follows a detection (``FrontEnd.claim_wake``) is transcribed and checked, with
    ``check="forced"`` as ``VoicePipeline`` does it (:func:`confirmed_request` on a
    transcript made with the wake phrase: whisper must read it at the start), with
    ``check="transcript"`` the way it was before (:func:`wake_request` on the free
    transcript). A failed check puts the gate back to sleep; another utterance is
    answered only if it started within ``AWAKE_S`` of a confirmed one."""

    def __init__(self, cutoff: float, settings: Settings, transcripts: Transcripts, *,
                 follow_ons: bool, check: str = "forced") -> None:
        if check not in CHECKS:
            raise ValueError(f"check={check!r}: one of {', '.join(CHECKS)}")
        self.cutoff = cutoff
        self.check = check
        self.key = f"{cutoff:g}" + ("" if check == "forced" else " transcript")
        """The row's name: the cut-off, with " transcript" for the check before."""
        self.detector = WakeWordDetector("hey_jarvis", cutoff=cutoff)
        self.front = FrontEnd(Endpointer(settings.vad), detector=self.detector)
        self.transcripts = transcripts
        self.transcribe_follow_ons = follow_ons
        self.front_cpu = 0.0
        self.asr_cpu = 0.0
        self.transcribed = 0
        self.position = 0
        self.detections: list[WakeDetection] = []
        self.woken: list[Woken] = []
        self.follow_ons: list[FollowOn] = []
        self._started = 0
        self._awake_until = -1
        self._last_wake = Woken(0, 0.0)

    def start(self) -> None:
        """A new stream (one positive trial)."""
        self.front.reset()
        self.position = 0
        self.detections, self.woken, self.follow_ons = [], [], []
        self._started, self._awake_until = 0, -1

    def feed(self, audio: FloatArray) -> None:
        for s in range(0, len(audio), FRONT_CHUNK):
            chunk = audio[s:s + FRONT_CHUNK]
            started = time.process_time()
            heard = self.front.process(chunk)
            self.front_cpu += time.process_time() - started
            self.position += len(chunk)
            self._heard(heard.wake, heard.events)

    def finish(self) -> None:
        """End of the stream: the pipeline flushes the front end."""
        started = time.process_time()
        events = self.front.flush()
        self.front_cpu += time.process_time() - started
        self._heard(None, events)

    def _heard(self, wake: WakeDetection | None, events: list[VadEvent]) -> None:
        if wake is not None:
            self.detections.append(wake)
            self._last_wake = Woken(wake.sample, wake.probability)
        for event in events:
            if isinstance(event, SpeechStarted):
                self._started = self.position
            if not isinstance(event, UtteranceEnded):
                continue
            woke = self.front.claim_wake(event.end_sample)
            answered_anyway = not woke and self._started < self._awake_until
            if not woke and not self.transcribe_follow_ons:
                if answered_anyway:
                    self.follow_ons.append(FollowOn(self.position, None))
                continue  # transcribed by the pipeline, then ignored: CPU only
            phrase = WAKE_PHRASE if woke and self.check == "forced" else ""
            transcript, cpu = self.transcripts(event.audio, phrase)
            text = transcript.text
            self.asr_cpu += cpu
            self.transcribed += 1
            if not woke:
                if answered_anyway:
                    self.follow_ons.append(FollowOn(self.position, text))
                continue
            woken = self._last_wake
            woken.text = text
            woken.confirmed = (confirmed_request(transcript, WAKE_PHRASE) if phrase
                               else wake_request(text, WAKE_PHRASE)) is not None
            self.woken.append(woken)
            if woken.confirmed:
                self._awake_until = self.position + int(AWAKE_S * ASR_RATE)
            else:
                self.front.sleep()

    @property
    def confirmed(self) -> bool:
        return any(w.confirmed for w in self.woken)


# --------------------------------------------------------------------------- (a)


def talkers(clips: list[Clip]) -> FloatArray:
    """The talkers of the babble noise: the first 80 piper clips of ``clips``."""
    return np.concatenate([c.audio for c in clips if c.source == "piper"][:80])


def trials(clips: list[Clip], babble: FloatArray
           ) -> Iterator[tuple[Clip, float, FloatArray, str]]:
    """The positive trials: each wake phrase padded, clean and at each SNR (the noise
    kind turns with the clip): (clip, snr, audio, noise kind)."""
    for i, clip in enumerate(clips):
        padded = voices.pad(clip.audio, 0.5, 1.0)
        for snr in SNRS:
            audio, kind = noisy(padded, snr, i, babble)
            yield clip, snr, audio, kind


def accept_rates(clips: list[Clip], babble: FloatArray,
                 gates: list[Gate] | None = None) -> dict[str, Any]:
    """The detector alone (its own cut-off), and each gate (two-stage, see (d)) on the
    same trials."""
    detector = WakeWordDetector("hey_jarvis")
    rows = []
    for clip, snr, audio, kind in trials(clips, babble):
        detector.reset()
        found = [d for s in range(0, len(audio), CHUNK)
                 for d in detector.detections(audio[s:s + CHUNK])]
        stages: dict[str, dict[str, Any]] = {}
        for gate in gates or []:
            gate.start()
            gate.feed(audio)
            gate.finish()
            stages[gate.key] = {
                "fired": bool(gate.detections), "confirmed": gate.confirmed,
                "answered": gate.confirmed or bool(gate.detections and gate.follow_ons),
                "heard": [w.text for w in gate.woken]}
        rows.append({"source": clip.source, "voice": clip.voice, "speed": clip.speed,
                     "snr": "clean" if snr == float("inf") else f"{snr:.0f} dB",
                     "noise": kind, "accepted": bool(found), "detections": len(found),
                     "text": clip.text, "stages": stages})
    return {"rows": rows}


def rate(rows: list[dict[str, Any]]) -> tuple[float, int]:
    return (100.0 * sum(r["accepted"] for r in rows) / len(rows) if rows else 0.0, len(rows))


def print_accept(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    summary: dict[str, Any] = {}
    overall, n = rate(rows)
    print(f"\n(a) accept rate on {n // 3} wake phrases x 3 conditions = {n} trials: "
          f"{overall:.1f} % (target >= 95 %)")
    summary["overall"] = overall
    summary["trials"] = n
    for source in SOURCES:
        sub = [r for r in rows if r["source"] == source]
        pct, count = rate(sub)
        by_snr = {s: rate([r for r in sub if r["snr"] == s])[0]
                  for s in ("clean", "20 dB", "10 dB")}
        print(f"  {source:11s} {pct:5.1f} % of {count:4d}  ·  " +
              "  ".join(f"{s} {v:5.1f} %" for s, v in by_snr.items()))
        summary[source] = {"percent": pct, "trials": count, "by_snr": by_snr}
    by_speed = {sp: rate([r for r in rows if r["source"] == "piper" and r["speed"] == sp])[0]
                for sp in (f"x{s}" for s in PIPER_SCALES)}
    print("  piper by length_scale: " + "  ".join(f"{k} {v:.1f} %" for k, v in by_speed.items()))
    summary["piper_by_length_scale"] = by_speed
    by_shift = {f"x{f}": rate([r for r in rows if r["source"] == "piper-shift"
                              and r["voice"].endswith(f"@{f}")])[0] for f in SHIFTS}
    print("  piper shifted by:      " + "  ".join(f"{k} {v:.1f} %" for k, v in by_shift.items()))
    summary["piper_by_shift"] = by_shift
    espeak = [r for r in rows if r["source"] == "espeak"]
    by_wpm = {f"{w}wpm": rate([r for r in espeak if r["speed"] == f"{w}wpm"])[0]
              for w in ESPEAK_SPEEDS}
    print("  espeak by speed:       " + "  ".join(f"{k} {v:.0f} %" for k, v in by_wpm.items()))
    summary["espeak_by_speed"] = by_wpm
    by_voice = {v: rate([r for r in espeak if r["voice"] == v])[0] for v in ESPEAK_VOICES}
    print("  espeak by voice (clean + noisy):")
    for chunk in _batched(sorted(by_voice.items(), key=lambda kv: -kv[1]), 3):
        print("    " + "  ".join(f"{v:18s} {p:5.1f} %" for v, p in chunk))
    summary["espeak_by_voice"] = by_voice
    doubles = sum(r["detections"] > 1 for r in rows)
    print(f"  trials with more than one detection: {doubles}")
    summary["double_detections"] = doubles
    missed_piper = Counter(r["text"] for r in rows if r["source"] == "piper"
                           and not r["accepted"])
    if missed_piper:
        print("  piper misses: " + "; ".join(f"{t!r} x{c}" for t, c in
                                              missed_piper.most_common(8)))
    summary["piper_misses"] = dict(missed_piper)
    return summary


def _batched(items: list[tuple[str, float]], n: int) -> Iterator[list[tuple[str, float]]]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


# --------------------------------------------------------------------------- (b), (c)


@dataclass(frozen=True)
class Segment:
    start: int  # stream sample
    clip: Clip
    condition: str

    @property
    def snr(self) -> str:
        return self.condition.rsplit(" ", 1)[0] if self.condition != "clean" else "clean"


def false_accepts(clips: list[Clip], seed: int, babble: FloatArray,
                  gates: list[Gate] | None = None) -> dict[str, Any]:
    """The detector alone over the negative stream (1280-sample chunks, timed), and each
    gate over the same stream (512-sample chunks, timed separately)."""
    detector = WakeWordDetector("hey_jarvis")
    cpu = 0.0
    seconds: dict[str, float] = defaultdict(float)
    hits: list[dict[str, Any]] = []
    segments: list[Segment] = []
    before = {}
    for gate in gates or []:
        gate.start()
        before[gate.key] = (gate.front_cpu, gate.asr_cpu, gate.transcribed)
    for _, clip, audio, condition in stream_segments(clips, seed, babble):
        segments.append(Segment(detector.position, clip, condition))
        started = time.process_time()
        found = [d for s in range(0, len(audio), CHUNK)
                 for d in detector.detections(audio[s:s + CHUNK])]
        cpu += time.process_time() - started
        seconds[clip.category] += len(audio) / ASR_RATE
        for d in found:
            hits.append({"category": clip.category, "clip": clip.label(),
                         "condition": condition, "probability": round(d.probability, 3),
                         "at_s": round(d.sample / ASR_RATE, 1)})
        for gate in gates or []:
            gate.feed(audio)
    gate_cpu = {}
    for gate in gates or []:
        gate.finish()
        front, asr, count = before[gate.key]
        gate_cpu[gate.key] = {"front_cpu_s": gate.front_cpu - front,
                                 "asr_cpu_s": gate.asr_cpu - asr,
                                 "transcribed": gate.transcribed - count}
    return {"seconds": dict(seconds), "cpu_s": cpu, "hits": hits,
            "stream_s": detector.position / ASR_RATE, "segments": segments,
            "gate_cpu": gate_cpu}


def print_false_accepts(result: dict[str, Any]) -> dict[str, Any]:
    hours = result["stream_s"] / 3600
    hits = result["hits"]
    per_hour = len(hits) / hours
    ordinary = [h for h in hits if h["category"] != "near_miss"]
    ordinary_h = (result["stream_s"] - result["seconds"].get("near_miss", 0.0)) / 3600
    print(f"\n(b) false accepts on {60 * hours:.1f} minutes without the wake phrase "
          f"(one stream, pauses included): {len(hits)} = {per_hour:.2f} per hour "
          f"(target <= 0.5)")
    print("  minutes by kind: " + ", ".join(f"{k} {v / 60:.1f}"
                                            for k, v in sorted(result["seconds"].items())))
    print(f"  without the near misses: {len(ordinary)} in {60 * ordinary_h:.1f} minutes = "
          f"{len(ordinary) / ordinary_h:.2f} per hour")
    for h in hits:
        print(f"    fired at {h['at_s']:7.1f} s, p={h['probability']}, {h['condition']}: "
              f"{h['clip']}")
    return {"hours": hours, "false_accepts": len(hits), "per_hour": per_hour,
            "per_hour_without_near_misses": len(ordinary) / ordinary_h, "hits": hits,
            "minutes_by_kind": {k: v / 60 for k, v in result["seconds"].items()}}


# --------------------------------------------------------------------------- (d)


def _pct(rows: list[dict[str, Any]], cutoff: str, key: str) -> float:
    return (100.0 * sum(r["stages"][cutoff][key] for r in rows) / len(rows)) if rows else 0.0


def print_two_stage(accept: dict[str, Any], stream: dict[str, Any], gates: list[Gate],
                    asr_label: str) -> dict[str, Any]:
    rows = accept["rows"]
    cutoffs = [g.key for g in gates]
    groups: dict[str, list[dict[str, Any]]] = {
        "all": rows,
        "piper": [r for r in rows if r["source"] == "piper"],
        **{f"shift {f}": [r for r in rows if r["voice"].endswith(f"@{f}")] for f in SHIFTS},
        "espeak": [r for r in rows if r["source"] == "espeak"],
        "piper+shift": [r for r in rows if r["source"] != "espeak"],
    }
    print(f"\n(d) two-stage wake as the pipeline runs it: FrontEnd (gate + Silero endpointer, "
          f"{FRONT_CHUNK}-sample chunks); the first utterance ending after a detection "
          f"(from the {PREROLL_S:.1f} s pre-roll on) transcribed by {asr_label} and checked. "
          f"Rows '<cut-off>': the pipeline's check, {asr_label} reads {WAKE_PHRASE!r} at "
          f"the start with a forced-alignment score >= {WAKE_LOGPROB_MIN:g}, or >= "
          f"{WAKE_LOGPROB_CORROBORATED:g} with the free transcript agreeing "
          f"(confirmed_request); rows '<cut-off> transcript': the check before, "
          f"wake_request(free transcript, {WAKE_PHRASE!r})")
    out: dict[str, Any] = {"cutoffs": {}}
    print(f"  accept rate, model alone -> + second stage ({len(rows)} trials; "
          + ", ".join(f"{k} {len(v)}" for k, v in groups.items() if k != "all") + "):")
    print("    cut-off " + "".join(f"{k:>17s}" for k in groups))
    for c in cutoffs:
        cells = [f"{_pct(v, c, 'fired'):5.1f} -> {_pct(v, c, 'confirmed'):5.1f} %"
                 for v in groups.values()]
        print(f"    {c:<13s} " + "".join(f"{x:>17s}" for x in cells))
        out["cutoffs"][c] = {"accept": {k: {"model": _pct(v, c, "fired"),
                                            "two_stage": _pct(v, c, "confirmed"),
                                            "answered": _pct(v, c, "answered"),
                                            "trials": len(v)} for k, v in groups.items()}}
    print("  answered by the pipeline all the same (confirmed, or a later utterance of the "
          "trial started within 5 s of a confirmed wake word):")
    for c in cutoffs:
        print(f"    {c:<13s} " + "".join(f"{_pct(v, c, 'answered'):15.1f} %"
                                        for v in groups.values()))
    print("  accept rate by noise, + second stage (model alone in brackets):")
    for c in cutoffs:
        cells = []
        by_snr = {}
        for snr in ("clean", "20 dB", "10 dB"):
            sub = [r for r in rows if r["snr"] == snr]
            both = {k: {"model": _pct([r for r in v if r["snr"] == snr], c, "fired"),
                        "two_stage": _pct([r for r in v if r["snr"] == snr], c, "confirmed")}
                    for k, v in groups.items()}
            by_snr[snr] = both
            cells.append(f"{snr} {_pct(sub, c, 'confirmed'):5.1f} % "
                         f"({_pct(sub, c, 'fired'):5.1f})")
        print(f"    {c:<13s} " + "   ".join(cells))
        out["cutoffs"][c]["accept_by_snr"] = by_snr
    espeak = groups["espeak"]
    print("  espeak by voice, model alone -> + second stage, at cut-offs " + " / ".join(cutoffs)
          + ":")
    deaf = []
    by_voice: dict[str, dict[str, dict[str, float]]] = {}
    for voice in ESPEAK_VOICES:
        sub = [r for r in espeak if r["voice"] == voice]
        by_voice[voice] = {c: {"model": _pct(sub, c, "fired"),
                               "two_stage": _pct(sub, c, "confirmed")} for c in cutoffs}
        if not any(r["stages"][c]["fired"] for r in sub for c in cutoffs):
            deaf.append(voice)
        print(f"    {voice:15s}" + "".join(
            f"{by_voice[voice][c]['model']:6.1f} ->{by_voice[voice][c]['two_stage']:5.1f}"
            for c in cutoffs))
    out["espeak_by_voice"] = by_voice
    out["voices_never_heard"] = deaf
    lowest = cutoffs[-1]
    print(f"  not heard at all (no detection in any of their {len(espeak) // len(ESPEAK_VOICES)}"
          f" trials, even at cut-off {lowest}): " + (", ".join(deaf) if deaf else "none"))
    weak = [v for v in ESPEAK_VOICES if v not in deaf
            and by_voice[v][lowest]["model"] < 50.0]
    if weak:
        print(f"  heard in under half their trials even at {lowest}: "
              + ", ".join(f"{v} {by_voice[v][lowest]['model']:.0f} %" for v in weak))
    for c in cutoffs:  # what whisper made of detections the check turned down
        lost = Counter(h if h is not None else "<no utterance ended>"
                       for r in rows if r["stages"][c]["fired"] and not r["stages"][c]["confirmed"]
                       for h in (r["stages"][c]["heard"] or [None]))
        if lost:
            print(f"  fired but not confirmed at {c}: {sum(lost.values())}; heard: "
                  + "; ".join(f"{t!r} x{n}" if n > 1 else repr(t)
                              for t, n in lost.most_common(5)))
        out["cutoffs"][c]["rejected_positives"] = sum(lost.values())

    # Negatives.
    segments: list[Segment] = stream["segments"]
    starts = [seg.start for seg in segments]
    stream_s = stream["stream_s"]
    lengths = [(b - a) / ASR_RATE for a, b in
               zip(starts, [*starts[1:], int(stream_s * ASR_RATE)], strict=True)]
    hours_by: dict[str, float] = defaultdict(float)
    for seg, length in zip(segments, lengths, strict=True):
        hours_by["near misses" if seg.clip.category == "near_miss" else "ordinary"] += length / 3600
        hours_by[seg.snr] += length / 3600
        hours_by[seg.clip.source] += length / 3600
    hours = stream_s / 3600

    def where(sample: int) -> Segment:
        return segments[max(0, bisect.bisect_right(starts, sample) - 1)]

    print(f"  false accepts per hour on the {60 * hours:.1f}-minute stream of (b), model alone "
          "-> + second stage; last column: utterances answered without the wake word because "
          "they started within 5 s of a confirmed one:")
    kinds = ("ordinary", "near misses", "clean", "20 dB", "10 dB", "piper", "espeak")
    print("    cut-off " + f"{'all (count)':>25s}" + "".join(f"{k:>15s}" for k in kinds)
          + f"{'follow-ons':>12s}")
    for gate in gates:
        c = gate.key
        fired: Counter[str] = Counter()
        confirmed: Counter[str] = Counter()
        for d in gate.detections:
            seg = where(d.sample)
            for k in ("near misses" if seg.clip.category == "near_miss" else "ordinary",
                      seg.snr, seg.clip.source):
                fired[k] += 1
        for w in gate.woken:
            if w.confirmed:
                seg = where(w.at)
                for k in ("near misses" if seg.clip.category == "near_miss" else "ordinary",
                          seg.snr, seg.clip.source):
                    confirmed[k] += 1
        n_fired, n_conf = len(gate.detections), sum(w.confirmed for w in gate.woken)
        cells = [f"{fired[k] / hours_by[k]:.1f}->{confirmed[k] / hours_by[k]:.1f}"
                 if hours_by[k] else "-" for k in kinds]
        pair = f"{n_fired / hours:.2f} -> {n_conf / hours:.2f}/h ({n_fired}->{n_conf})"
        print(f"    {c:<13s} {pair:>25s}" + "".join(f"{x:>15s}" for x in cells)
              + f"{len(gate.follow_ons) / hours:9.2f}/h")
        out["cutoffs"][c]["false_accepts"] = {
            "model_per_hour": n_fired / hours, "two_stage_per_hour": n_conf / hours,
            "model": n_fired, "two_stage": n_conf,
            "by_kind_per_hour": {k: {"model": fired[k] / hours_by[k],
                                     "two_stage": confirmed[k] / hours_by[k]}
                                 for k in kinds if hours_by[k]},
            "follow_ons_per_hour": len(gate.follow_ons) / hours,
            "confirmed": [{"clip": where(w.at).clip.label(),
                           "condition": where(w.at).condition, "heard": w.text,
                           "at_s": round(w.at / ASR_RATE, 1)}
                          for w in gate.woken if w.confirmed],
            "follow_ons": [{"clip": where(f.at).clip.label(), "heard": f.text,
                            "at_s": round(f.at / ASR_RATE, 1)} for f in gate.follow_ons]}
    print("    (minutes: " + ", ".join(f"{k} {60 * hours_by[k]:.1f}" for k in kinds) + ")")
    for gate in gates:
        c = gate.key
        fa = out["cutoffs"][c]["false_accepts"]
        for item in fa["confirmed"]:
            print(f"    {c}: confirmed at {item['at_s']:7.1f} s, {item['condition']}, heard "
                  f"{item['heard']!r}: {item['clip']}")
    for gate in gates[:1] + gates[-1:]:
        c = gate.key
        follow = out["cutoffs"][c]["false_accepts"]["follow_ons"]
        if follow:
            print(f"    {c}: follow-ons answered: "
                  + "; ".join(repr(f["heard"]) for f in follow[:6])
                  + (f" (+{len(follow) - 6} more)" if len(follow) > 6 else ""))

    # The recommendation: among the rows with the second stage under 0.5 false
    # accepts per hour, the best accept rate over everything.
    fits = [c for c in cutoffs
            if out["cutoffs"][c]["false_accepts"]["two_stage_per_hour"] <= 0.5]
    best = max(fits, key=lambda c: (out["cutoffs"][c]["accept"]["all"]["two_stage"],
                                    float(c.split()[0])), default=None)
    for c in cutoffs:
        acc = out["cutoffs"][c]["accept"]
        fa = out["cutoffs"][c]["false_accepts"]
        print(f"  headline {c:<5s}: piper + shifted piper "
              f"{acc['piper+shift']['two_stage']:5.1f} %, "
              f"everything {acc['all']['two_stage']:5.1f} % "
              f"(espeak {acc['espeak']['two_stage']:5.1f} %), "
              f"false accepts {fa['two_stage_per_hour']:.2f}/h "
              f"(+ {fa['follow_ons_per_hour']:.2f}/h follow-ons)"
              + ("  <- best with <= 0.5/h" if c == best else ""))
    if best is None:
        print("  no row stays at or under 0.5 false accepts per hour with its second "
              "stage on this stream (a false accept is one event in "
              f"{60 * hours:.0f} minutes = {1 / hours:.2f}/h)")
    out["best_cutoff"] = best
    return out


def transcript_matching(clips: list[Clip], seed: int, babble: FloatArray,
                        minutes: float) -> dict[str, Any]:
    """Today's approach on the first ``minutes`` of the same stream."""
    from jarvis.speech.asr import WhisperAsr
    from jarvis.speech.silero import Endpointer, SileroVad
    from jarvis.speech.vad import UtteranceEnded
    from jarvis.voice.wake import WakePhrase

    settings = load_settings({"JARVIS_CACHE_DIR": ""})
    asr = WhisperAsr(settings.asr)
    asr.load()
    endpointer = Endpointer(settings.vad, SileroVad())
    wake = WakePhrase("hey jarvis", follow_up_s=0.0)
    vad_cpu = asr_cpu = 0.0
    audio_s = 0.0
    utterances = 0
    matched: list[str] = []
    endpointer.reset()
    for _, _clip, audio, _ in stream_segments(clips, seed, babble):
        for s in range(0, len(audio), CHUNK):
            started = time.process_time()
            events = endpointer.process(audio[s:s + CHUNK])
            vad_cpu += time.process_time() - started
            for event in events:
                if isinstance(event, UtteranceEnded):
                    started = time.process_time()
                    text = asr.transcribe(event.audio).text
                    _, heard = wake.request(text)
                    asr_cpu += time.process_time() - started
                    utterances += 1
                    if heard:
                        matched.append(text)
        audio_s += len(audio) / ASR_RATE
        if audio_s >= 60 * minutes:
            break
    return {"audio_s": audio_s, "vad_cpu_s": vad_cpu, "asr_cpu_s": asr_cpu,
            "utterances": utterances, "matched": matched, "asr_threads": settings.asr.threads,
            "asr_model": asr.model_label}


def print_cpu(detector: dict[str, Any], whisper: dict[str, Any] | None,
              asr_label: str = "") -> dict[str, Any]:
    hours = detector["stream_s"] / 3600
    per_hour = detector["cpu_s"] / hours
    print("\n(c) CPU per hour of audio (process CPU time, all threads; 100 % = one core busy)")
    print(f"  wake-word detector        {per_hour:8.1f} s/h = {per_hour / 36:6.2f} % of a core "
          f"(measured on all {detector['stream_s'] / 60:.0f} minutes)")
    out: dict[str, Any] = {"detector_cpu_s_per_hour": per_hour,
                           "detector_core_percent": per_hour / 36}
    if detector.get("gate_cpu"):
        print(f"  two-stage wake on the same {detector['stream_s'] / 60:.0f} minutes: front end "
              "(detector + Silero while the gate is open) + whisper on what it lets "
              f"through ({asr_label}; CPU per transcription as measured when it was made):")
        stages = {}
        for cutoff, g in detector["gate_cpu"].items():
            front_h, asr_h = g["front_cpu_s"] / hours, g["asr_cpu_s"] / hours
            total = front_h + asr_h
            print(f"    {cutoff:<15s}  front end {front_h:6.1f} s/h + whisper "
                  f"{asr_h:6.1f} s/h "
                  f"({g['transcribed'] / hours:5.1f} utterances/h) = {total:6.1f} s/h = "
                  f"{total / 36:5.2f} % of a core")
            stages[cutoff] = {"front_end_cpu_s_per_hour": front_h,
                                     "whisper_cpu_s_per_hour": asr_h,
                                     "utterances_per_hour": g["transcribed"] / hours,
                                     "total_cpu_s_per_hour": total,
                                     "core_percent": total / 36}
        out["two_stage"] = stages
    if whisper is None:
        return out
    scale = 3600 / whisper["audio_s"]
    vad_h = whisper["vad_cpu_s"] * scale
    both_h = (whisper["vad_cpu_s"] + whisper["asr_cpu_s"]) * scale
    minutes = whisper["audio_s"] / 60
    print(f"  Silero VAD alone          {vad_h:8.1f} s/h = {vad_h / 36:6.2f} % of a core "
          f"(measured on {minutes:.1f} minutes, scaled)")
    print(f"  VAD + whisper + matching  {both_h:8.1f} s/h = {both_h / 36:6.2f} % of a core "
          f"(measured on {minutes:.1f} minutes, scaled; {whisper['utterances']} utterances, "
          f"{whisper['asr_model']}, {whisper['asr_threads']} threads)")
    print(f"  transcript matching alone / detector: {both_h / per_hour:.0f}x")
    print(f"  transcript matching on those {minutes:.1f} minutes: {len(whisper['matched'])} "
          "false wake(s)" + (": " + "; ".join(repr(t) for t in whisper["matched"][:5])
                             if whisper["matched"] else ""))
    out.update({"vad_cpu_s_per_hour": vad_h, "vad_core_percent": vad_h / 36,
                "transcript_cpu_s_per_hour": both_h, "transcript_core_percent": both_h / 36,
                "transcript_measured_minutes": minutes, "transcript_utterances":
                whisper["utterances"], "transcript_false_wakes": whisper["matched"]})
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=1.0,
                        help="audio without the wake phrase, at least (default 1)")
    parser.add_argument("--asr-minutes", type=float, default=10.0,
                        help="minutes of the stream run through VAD + whisper (default 10)")
    parser.add_argument("--no-asr", action="store_true", help="skip today's approach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clear", action="store_true",
                        help="synthesize the corpus and transcribe the utterances again")
    parser.add_argument("--cutoffs", default=",".join(f"{c:g}" for c in CUTOFFS),
                        help="detector cut-offs for (d), comma-separated (default "
                             "%(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the numbers as JSON to FILE (- or none: stdout)")
    args = parser.parse_args(argv)
    try:
        cutoffs = [float(c) for c in args.cutoffs.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--cutoffs {args.cutoffs!r}: expected numbers such as 0.97,0.8")
    if not cutoffs or not all(0 < c < 1 for c in cutoffs):
        parser.error("--cutoffs: each between 0 and 1")

    directory = voices.cache_dir("wakeword")
    if args.clear:
        shutil.rmtree(directory)
        directory.mkdir(parents=True)
    if not voices.espeak_available():
        print("espeak-ng is not installed: apt-get install espeak-ng", file=sys.stderr)
        return 2
    print(f"wake-word bench · hey_jarvis · {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} · corpus cache {directory}")
    corpus = Corpus(directory)
    started = time.perf_counter()
    wake_clips = positives(corpus)
    other_clips = negatives(corpus, args.hours, args.seed)
    print(f"corpus: {len(wake_clips)} wake phrases, {len(other_clips)} other clips; "
          f"{corpus.made} synthesized now in {corpus.made_s:.0f} s, the rest from the cache "
          f"({time.perf_counter() - started:.0f} s)")
    babble = talkers(other_clips)

    settings = load_settings({"JARVIS_CACHE_DIR": ""})
    transcripts = Transcripts(directory, settings.asr)
    gates = [Gate(c, settings, transcripts, follow_ons=False, check=check)
             for c in cutoffs for check in CHECKS]
    started = time.perf_counter()
    accept_raw = accept_rates(wake_clips, babble, gates)
    accept = print_accept(accept_raw)
    for gate in gates:  # in the stream, later utterances in an awake window count too
        gate.transcribe_follow_ons = True
    fa_raw = false_accepts(other_clips, args.seed, babble, gates)
    transcripts.save()
    fa = print_false_accepts(fa_raw)
    print(f"\n[(a), (b) and (d) took {time.perf_counter() - started:.0f} s; "
          f"{transcripts.used} transcripts used, {transcripts.made} made now in "
          f"{transcripts.made_s:.0f} s]")
    whisper = None if args.no_asr else transcript_matching(other_clips, args.seed, babble,
                                                          args.asr_minutes)
    cpu = print_cpu(fa_raw, whisper, transcripts.label)
    two_stage = print_two_stage(accept_raw, fa_raw, gates, transcripts.label)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        payload = json.dumps({"accept": accept, "false_accepts": fa, "cpu": cpu,
                              "two_stage": two_stage}, indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
