"""The context cache: saved KV states of evaluated prompt prefixes, found by longest
common token prefix, held under an entry cap and a byte cap, with the system-prompt
state (and recent conversations) persisted to disk across restarts.

This module knows nothing of llama.cpp: a state is an opaque byte buffer produced and
consumed by the backend. It owns three things:

* :class:`~jarvis.llm.prefix_store.PrefixStore` in RAM (radix tree over token ids, LRU,
  redundant prefixes evicted first, entries in use never evicted). The byte cap counts
  what the process really holds: each state's own memory map (whole pages, see
  :mod:`~jarvis.llm.records`) plus the token bookkeeping, and room is made *before* a
  snapshot is taken, so the cap holds at every moment, not just after an insert;
* a ``diskcache`` directory (:class:`~jarvis.diskstore.DiskStore`: raw bytes only,
  never pickle; a corrupt database is moved aside and rebuilt) keyed by a
  *fingerprint* of everything that makes a saved state valid (model file, context
  size, KV type, chat template, library version). Each record is bytes with a header
  and a SHA-256 checked before anything in it is parsed, so a corrupt, truncated,
  tampered or mismatched record is a miss with a warning, never a wrong answer;
* the counters behind the hit rate in the latency report and ``jarvis cache stats``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jarvis.config import CacheSettings
from jarvis.diskstore import CorruptStoreError, DiskStore, StoreError, StoreUnavailable
from jarvis.heap import trim_heap
from jarvis.llm.prefix_store import Entry, Match, PrefixStore
from jarvis.llm.records import PAGE, RecordError, RecordWriter, State, held_bytes, read_record

log = logging.getLogger(__name__)

__all__ = ["CacheStats", "ContextCache", "State", "disk_usage", "file_identity",
           "fingerprint", "state_nbytes"]

_PER_TOKEN_OVERHEAD = 48
"""Bytes of Python bookkeeping per cached token: the entry's tuple of ids (8 bytes a
slot and a 32-byte int object per id) and the radix tree's edge labels (8 bytes)."""
_PER_ENTRY_OVERHEAD = 1024
_KEY_RE = re.compile(r"ctx:[0-9a-f]{32}:[0-9a-f]{32}")
_MAX_WRITE_FAILURES = 3
_TRIM_EVERY_S = 5.0
"""Ask the C allocator to return its free memory to the OS at most this often."""


@dataclass(frozen=True)
class CacheStats:
    """Counters since start (or ``clear``); ``hit_rate`` and ``reuse_rate`` are derived."""

    enabled: bool
    queries: int
    hits: int
    partial_hits: int
    """Hits whose saved state went beyond the new prompt and had to be cut back."""
    prompt_tokens: int
    reused_tokens: int
    restores: int
    saves: int
    evictions: int
    rejected: int
    entries: int
    bytes_held: int
    max_entries: int
    max_bytes: int
    save_s: float
    restore_s: float
    disk_hits: int
    disk_misses: int
    disk_errors: int
    disk_writes: int

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries else None

    @property
    def reuse_rate(self) -> float | None:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hit_rate"] = self.hit_rate
        data["reuse_rate"] = self.reuse_rate
        return data


def state_nbytes(tokens: Sequence[int], state: State) -> int:
    """Bytes an entry really holds: the state's allocation plus its token bookkeeping."""
    return held_bytes(state) + _PER_TOKEN_OVERHEAD * len(tokens) + _PER_ENTRY_OVERHEAD


def snapshot_nbytes(n_tokens: int, state_size: int) -> int:
    """What :func:`state_nbytes` will be for a snapshot of ``state_size`` bytes taken
    into its own memory map (:func:`~jarvis.llm.records.new_state_buffer`)."""
    pages = -(-max(state_size, 1) // PAGE) * PAGE
    return pages + _PER_TOKEN_OVERHEAD * n_tokens + _PER_ENTRY_OVERHEAD


def fingerprint(**facts: Any) -> str:
    """Stable digest of the facts that make a saved state valid for this model run."""
    text = repr(sorted(facts.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def file_identity(path: Path) -> str:
    """Content identity of a model file: its size and hashes of its first and last MiB
    (reading the whole multi-GB file at every start would cost seconds)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


class ContextCache:
    """RAM prefix store + disk persistence + metrics. Thread-safe."""

    def __init__(self, settings: CacheSettings, fingerprint: str = "") -> None:
        self.settings = settings
        self.fingerprint = fingerprint
        self._lock = threading.RLock()
        self._store: PrefixStore[State] = PrefixStore(
            settings.max_entries, settings.max_bytes, on_evict=self._on_evict
        )
        self._disk: DiskStore | None = None
        self._persisted: set[str] = set()
        """Keys of records known to be sound on disk in this process (written or read)."""
        self._failures: dict[str, int] = {}
        """Failed writes per key (a full disk is not retried after every turn)."""
        self._trimmed_at: float | None = None
        self._counters: dict[str, float] = {}
        self._reset_counters()
        if settings.enabled and settings.dir is not None:
            self._open_disk(settings.dir)

    # ------------------------------------------------------------------ RAM

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def lookup(self, tokens: Sequence[int]) -> Match[State] | None:
        """The saved state serving the most leading ``tokens`` (marks it recently used)."""
        if not self.enabled or not tokens:
            return None
        with self._lock:
            return self._store.longest_prefix(tokens)

    def covers(self, tokens: Sequence[int]) -> bool:
        """True when an entry already holds a state for all of ``tokens``."""
        if not self.enabled or not tokens:
            return True
        with self._lock:
            match = self._store.longest_prefix(tokens, touch=False)
        return match is not None and match.length == len(tokens)

    @contextmanager
    def using(self, entry: Entry[State]) -> Iterator[Entry[State]]:
        """Hold ``entry`` so no eviction removes it while its state is being restored."""
        with self._lock:
            self._store.acquire(entry)
        try:
            yield entry
        finally:
            with self._lock:
                self._store.release(entry)

    def make_room(self, tokens: Sequence[int], state_size: int) -> bool:
        """Evict what storing a snapshot of ``state_size`` bytes for ``tokens`` would
        evict, *before* the snapshot is taken, so the process never holds the cap plus
        one state. False (nothing evicted) when such a snapshot could not be stored."""
        if not self.enabled or not tokens:
            return False
        with self._lock:
            return self._store.make_room(tokens, snapshot_nbytes(len(tokens), state_size))

    def release_memory(self) -> float | None:
        """Hand the C heap's free memory back to the OS: at the first call (what loading
        the models left behind), then at most every 5 s (a few ms each time here). The
        backend calls it after each turn's housekeeping, outside the engine lock.
        Returns the seconds it took, None when it did nothing.

        The cache's own states never need it (each is a memory map of its own); this is
        for the rest of the process (the speech engines, the Python heap), whose freed
        memory glibc otherwise keeps in its arenas for good.
        """
        now = time.monotonic()
        with self._lock:
            if self._trimmed_at is not None and now - self._trimmed_at < _TRIM_EVERY_S:
                return None
            self._trimmed_at = now
        started = time.perf_counter()
        if not trim_heap():
            return None
        spent = time.perf_counter() - started
        log.debug("returned free heap memory to the OS in %.1f ms", spent * 1000)
        return spent

    def store(
        self, tokens: Sequence[int], state: State, *, pinned: bool = False, save_s: float = 0.0
    ) -> Entry[State] | None:
        """Keep ``state`` (the KV of exactly ``tokens``); None if it exceeds the byte cap."""
        if not self.enabled or not tokens:
            return None
        with self._lock:
            self._counters["saves"] += 1
            self._counters["save_s"] += save_s
            return self._insert(tokens, state, pinned)

    def _insert(self, tokens: Sequence[int], state: State, pinned: bool) -> Entry[State] | None:
        with self._lock:
            return self._store.insert(
                tuple(tokens), state, state_nbytes(tokens, state), pinned=pinned
            )

    def record_query(self, prompt_tokens: int, reused: int, *, partial: bool = False) -> None:
        """Count one request: a hit when at least one prompt token was reused."""
        with self._lock:
            self._counters["queries"] += 1
            self._counters["prompt_tokens"] += prompt_tokens
            self._counters["reused_tokens"] += reused
            if reused > 0:
                self._counters["hits"] += 1
                if partial:
                    self._counters["partial_hits"] += 1

    def record_restore(self, seconds: float) -> None:
        with self._lock:
            self._counters["restores"] += 1
            self._counters["restore_s"] += seconds

    def recent_entries(self, limit: int, *, pinned: bool = False) -> list[Entry[State]]:
        """Most recently used entries first (pinned or not)."""
        with self._lock:
            entries = [e for e in self._store if e.pinned == pinned]
        entries.sort(key=lambda e: e.last_used, reverse=True)
        return entries[:limit]

    def stats(self) -> CacheStats:
        with self._lock:
            c = self._counters
            store = self._store.stats
            return CacheStats(
                enabled=self.enabled,
                queries=int(c["queries"]),
                hits=int(c["hits"]),
                partial_hits=int(c["partial_hits"]),
                prompt_tokens=int(c["prompt_tokens"]),
                reused_tokens=int(c["reused_tokens"]),
                restores=int(c["restores"]),
                saves=int(c["saves"]),
                evictions=int(c["evictions"]),
                rejected=store.rejected,
                entries=store.entries,
                bytes_held=store.nbytes,
                max_entries=self.settings.max_entries,
                max_bytes=self.settings.max_bytes,
                save_s=c["save_s"],
                restore_s=c["restore_s"],
                disk_hits=int(c["disk_hits"]),
                disk_misses=int(c["disk_misses"]),
                disk_errors=int(c["disk_errors"]),
                disk_writes=int(c["disk_writes"]),
            )

    def clear(self, *, disk: bool = False) -> int:
        """Drop every RAM entry not in use (and the persisted ones with ``disk``); reset
        the counters. Returns the number of RAM entries removed."""
        with self._lock:
            removed = self._store.clear()
            self._reset_counters()
            if disk and self._disk is not None:
                self._disk.clear()
                self._persisted.clear()
            return removed

    def _reset_counters(self) -> None:
        self._counters = dict.fromkeys(
            ("queries", "hits", "partial_hits", "prompt_tokens", "reused_tokens", "restores",
             "saves", "evictions", "save_s", "restore_s", "disk_hits", "disk_misses",
             "disk_errors", "disk_writes"),
            0.0,
        )

    def _on_evict(self, entry: Entry[State]) -> None:
        self._counters["evictions"] += 1
        log.debug("context cache evicted %d tokens (%d bytes)", len(entry.tokens), entry.nbytes)

    # ------------------------------------------------------------------ disk

    @property
    def persistent(self) -> bool:
        return self._disk is not None

    def _open_disk(self, directory: Path) -> None:
        try:
            self._disk = DiskStore(directory, what="context cache",
                                   size_limit=self.settings.disk_max_bytes)
        except StoreUnavailable as exc:  # a cache we cannot open must not stop the assistant
            log.warning("context cache: %s; continuing without persistence "
                        "(set JARVIS_CACHE_DIR= to silence this)", exc)
            self._disk = None

    def _key(self, tokens: Sequence[int]) -> str:
        digest = hashlib.sha256(array("i", tokens).tobytes()).hexdigest()[:32]
        return f"ctx:{self.fingerprint}:{digest}"

    def _disk_failed(self, doing: str, exc: Exception) -> None:
        """Count a failed disk operation and say so (a healed corrupt database has
        already been reported by the store)."""
        self._counters["disk_errors"] += 1
        if not isinstance(exc, CorruptStoreError):
            log.warning("context cache: could not %s in %s (%s)", doing, self.settings.dir, exc)

    def persist(self, tokens: Sequence[int], state: State, *, kind: str = "conversation") -> bool:
        """Write ``state`` for ``tokens`` to disk; False (logged) when that fails."""
        disk = self._disk
        if disk is None:
            return False
        key = self._key(tokens)
        try:
            record = RecordWriter(kind=kind, fingerprint=self.fingerprint,
                                  tokens=tuple(tokens), state=state)
            disk.set(key, record, read=True)
            if kind == "system":
                disk.set(f"system:{self.fingerprint}", key)
            else:
                recent = [key] + [k for k in self._recent_keys() if k != key]
                disk.set(f"recent:{self.fingerprint}", "\n".join(recent[:1000]).encode("ascii"))
        except (StoreError, OSError, ValueError, TypeError) as exc:
            self._disk_failed("write a saved context", exc)
            self._failures[key] = self._failures.get(key, 0) + 1
            return False
        self._persisted.add(key)
        self._counters["disk_writes"] += 1
        return True

    def _recent_keys(self) -> list[str]:
        """The recent-conversation keys, newest first (bytes: one key per line)."""
        assert self._disk is not None
        raw = self._disk.get(f"recent:{self.fingerprint}")
        if not isinstance(raw, bytes):
            return []
        return [k for k in raw.decode("ascii", "replace").split("\n") if _KEY_RE.fullmatch(k)]

    def has_persisted(self, tokens: Sequence[int]) -> bool:
        """True when a sound record of ``tokens`` is known to be on disk, written or read
        by this process (a record deleted behind its back is noticed at the next start
        and written again), or when writing it failed too often to try again."""
        if self._disk is None:
            return False
        key = self._key(tokens)
        return key in self._persisted or self._failures.get(key, 0) >= _MAX_WRITE_FAILURES

    def load_persisted(self, *, kind: str = "system", limit: int = 1) -> int:
        """Load persisted states of ``kind`` into RAM (system prompt pinned).

        Every record is verified (checksum first, then version, fingerprint, token ids);
        a bad one is deleted and counted as a miss with a warning. Returns entries loaded.
        """
        disk = self._disk
        if disk is None:
            return 0
        try:
            if kind == "system":
                key = disk.get(f"system:{self.fingerprint}")
                keys = [key] if isinstance(key, str) and _KEY_RE.fullmatch(key) else []
            else:
                keys = self._recent_keys()[:limit]
        except (StoreError, OSError) as exc:
            self._disk_failed("read the saved contexts", exc)
            return 0
        if not keys:
            self._counters["disk_misses"] += 1
            log.log(logging.INFO if kind == "system" else logging.DEBUG,
                    "context cache: no saved %s context for this model configuration", kind)
            return 0
        loaded = 0
        for key in keys:
            loaded_record = self._read_record(key, kind)
            if loaded_record is None:
                continue
            tokens, state = loaded_record  # a disk hit, not a snapshot: not counted as a save
            with self._lock:
                if not self._store.make_room(tokens, state_nbytes(tokens, state)):
                    continue
            if self._insert(tokens, state, pinned=kind == "system") is not None:
                loaded += 1
        return loaded

    def _read_record(self, key: str, kind: str) -> tuple[tuple[int, ...], State] | None:
        """The verified record at ``key``, or None (a miss; a bad record is deleted and
        reported, so the state is saved again)."""
        assert self._disk is not None
        handle: Any = None
        try:
            handle = self._disk.get(key, read=True)
            if handle is None:
                self._counters["disk_misses"] += 1  # e.g. evicted by the disk cap
                log.log(logging.WARNING if kind == "system" else logging.DEBUG,
                        "context cache: the saved %s context %s is gone from %s; it will be "
                        "rebuilt", kind, key, self.settings.dir)
                return None
            if not hasattr(handle, "readinto"):  # a str or int where bytes belong
                raise RecordError("unknown record format")
            record = read_record(handle, limit=self.settings.max_bytes)
            problem = ""
            if record.fingerprint != self.fingerprint:
                problem = "saved for a different model configuration"
            elif self._key(record.tokens) != key:
                problem = "token ids do not match the key"
        except CorruptStoreError:
            self._counters["disk_errors"] += 1  # healed and reported by the store
            return None
        except (StoreError, RecordError, OSError) as exc:
            problem = str(exc)
        finally:
            if handle is not None and hasattr(handle, "close"):
                handle.close()
        if problem:
            self._counters["disk_errors"] += 1
            log.warning(
                "context cache: ignoring saved context %s in %s: %s; it will be rebuilt",
                key, self.settings.dir, problem,
            )
            with suppress(StoreError, OSError):
                self._disk.delete(key)
            return None
        self._counters["disk_hits"] += 1
        self._persisted.add(key)
        return record.tokens, record.state

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None


def disk_usage(settings: CacheSettings) -> dict[str, Any]:
    """What the persistent cache holds, for ``jarvis cache stats`` (no model needed).
    A corrupt database is moved aside and rebuilt on the way (and reported)."""
    info: dict[str, Any] = {"dir": str(settings.dir), "max_bytes": settings.disk_max_bytes}
    if settings.dir is None:
        info["status"] = "off"
        return info
    try:
        disk = DiskStore(settings.dir, what="context cache", size_limit=settings.disk_max_bytes)
    except StoreUnavailable as exc:
        info["status"] = f"unavailable: {exc}"
        return info
    try:
        keys = disk.keys()
        info.update(
            status="rebuilt (the database was corrupt)" if disk.healed else "ok",
            bytes_on_disk=disk.volume(),
            contexts=sum(k.startswith("ctx:") for k in keys),
            system_prompts=sum(k.startswith("system:") for k in keys),
            configurations=len({k.split(":")[1] for k in keys if k.startswith("ctx:")}),
        )
    except (StoreError, OSError) as exc:
        info["status"] = f"unreadable: {exc}"
    finally:
        disk.close()
    return info
