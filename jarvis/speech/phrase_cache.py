"""Audio of short, frequent replies ("OK.", "Done.") kept on disk, so they are heard
without synthesis (``JARVIS_TTS_PHRASE_CACHE_BYTES``)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from jarvis.audio.formats import Int16Array
from jarvis.diskstore import (
    CorruptStoreError,
    DiskStore,
    MissingFileError,
    StoreError,
    StoreUnavailable,
    UnsafeRecordError,
)
from jarvis.speech.errors import TtsError

log = logging.getLogger(__name__)

_DIGEST = 32
"""Each value is the SHA-256 of the audio, then the audio (int16, native order)."""


def phrase_cache_dir(cache_dir: Path | None) -> Path | None:
    """Where the phrase cache lives: inside ``JARVIS_CACHE_DIR``, or nowhere."""
    return cache_dir / "phrases" if cache_dir is not None else None


class PhraseCache:
    """Audio of short sentences on disk, least recently used evicted past ``max_bytes``.

    The key includes the voice (file, size, modification time) and the length scale,
    so changing either never plays stale audio. Each value carries a SHA-256 of its
    audio, so a damaged one is never played. The directory heals like the context
    cache's (:class:`~jarvis.diskstore.DiskStore`: a corrupt database is moved aside and
    rebuilt, a deleted file is a miss, nothing is unpickled). Any other failure is
    logged and ignored: speech must not stop because of the cache.
    """

    def __init__(self, directory: Path, max_bytes: int, voice_key: str) -> None:
        self.directory = directory
        self.voice_key = voice_key
        self.hits = 0
        self.misses = 0
        try:
            self._store = DiskStore(directory, what="TTS phrase cache", size_limit=max_bytes,
                                    cull_limit=100)
        except StoreUnavailable as exc:
            raise TtsError(f"{directory}: cannot open the TTS phrase cache ({exc})") from None

    def _key(self, text: str) -> str:
        return f"{self.voice_key}\x00{' '.join(text.lower().split())}"

    def get(self, text: str) -> Int16Array | None:
        key = self._key(text)
        problem = ""
        try:
            raw = self._store.get(key)
        except CorruptStoreError:  # healed and reported by the store
            raw = None
        except (MissingFileError, UnsafeRecordError) as exc:
            raw, problem = None, str(exc)
        except Exception as exc:
            log.warning("phrase cache read failed (%s); synthesising instead", exc)
            return None
        if raw is not None and (
            not isinstance(raw, bytes) or len(raw) < _DIGEST or (len(raw) - _DIGEST) % 2
            or hashlib.sha256(raw[_DIGEST:]).digest() != raw[:_DIGEST]
        ):
            raw, problem = None, "checksum mismatch (corrupt or from an older version)"
            self._forget(key)
        if problem:
            log.warning("TTS phrase cache: ignoring the saved audio of %r: %s; it will be "
                        "synthesised again", text[:80], problem)
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(raw, dtype=np.int16, offset=_DIGEST)

    def _forget(self, key: str) -> None:
        try:
            self._store.delete(key)
        except Exception as exc:
            log.debug("phrase cache: could not delete a bad entry (%s)", exc)

    def put(self, text: str, audio: Int16Array) -> None:
        data = np.ascontiguousarray(audio, dtype=np.int16).tobytes()
        try:
            self._store.set(self._key(text), hashlib.sha256(data).digest() + data)
        except CorruptStoreError:
            pass  # healed and reported by the store; the next put is kept
        except (StoreError, OSError, ValueError, TypeError) as exc:
            log.warning("phrase cache write failed (%s)", exc)

    def volume(self) -> int:
        """Bytes the cache holds on disk (values and index)."""
        return self._store.volume()

    def __len__(self) -> int:
        return len(self._store)

    def close(self) -> None:
        self._store.close()
