"""Audio of short, frequent replies ("OK.", "Done.") kept on disk, so they are heard
without synthesis (``JARVIS_TTS_PHRASE_CACHE_BYTES``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from jarvis.audio.formats import Int16Array
from jarvis.speech.errors import TtsError

log = logging.getLogger(__name__)


def phrase_cache_dir(cache_dir: Path | None) -> Path | None:
    """Where the phrase cache lives: inside ``JARVIS_CACHE_DIR``, or nowhere."""
    return cache_dir / "phrases" if cache_dir is not None else None


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
