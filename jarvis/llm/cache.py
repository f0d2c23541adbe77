"""The context cache: saved KV states of evaluated prompt prefixes, found by longest
common token prefix, held under an entry cap and a byte cap, with the system-prompt
state (and recent conversations) persisted to disk across restarts.

This module knows nothing of llama.cpp: a state is opaque ``bytes`` produced and
consumed by the backend. It owns three things:

* :class:`~jarvis.llm.prefix_store.PrefixStore` in RAM (radix tree over token ids, LRU,
  redundant prefixes evicted first, entries in use never evicted);
* a ``diskcache`` directory keyed by a *fingerprint* of everything that makes a saved
  state valid (model file, context size, KV type, chat template, library version).
  Each record carries its token ids and a SHA-256 of the state, so a corrupt,
  truncated or mismatched record is a miss with a warning, never a wrong answer;
* the counters behind the hit rate in the latency report and ``jarvis cache stats``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jarvis.config import CacheSettings
from jarvis.llm.prefix_store import Entry, Match, PrefixStore

log = logging.getLogger(__name__)

State = bytes | bytearray
"""A saved KV state: a snapshot taken in this process is a bytearray (no extra copy),
one read from disk is bytes."""

RECORD_VERSION = 1
_PER_TOKEN_OVERHEAD = 48
"""Bytes of Python bookkeeping per cached token: the ids in the entry and the radix
tree labels (the saved KV state itself is counted exactly)."""
_PER_ENTRY_OVERHEAD = 1024


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
    """Bytes an entry really holds: the state plus its token bookkeeping."""
    return len(state) + _PER_TOKEN_OVERHEAD * len(tokens) + _PER_ENTRY_OVERHEAD


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
        self._disk: Any = None
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
            import diskcache

            directory.mkdir(parents=True, exist_ok=True)
            self._disk = diskcache.Cache(
                str(directory),
                size_limit=self.settings.disk_max_bytes,
                eviction_policy="least-recently-used",
            )
        except Exception as exc:  # a cache we cannot open must not stop the assistant
            log.warning(
                "context cache: cannot open JARVIS_CACHE_DIR=%s (%s); continuing without "
                "persistence. Fix the directory's permissions or set JARVIS_CACHE_DIR= to silence",
                directory, exc,
            )
            self._disk = None

    def _key(self, tokens: Sequence[int]) -> str:
        digest = hashlib.sha256(array("i", tokens).tobytes()).hexdigest()[:32]
        return f"ctx:{self.fingerprint}:{digest}"

    def persist(self, tokens: Sequence[int], state: State, *, kind: str = "conversation") -> bool:
        """Write ``state`` for ``tokens`` to disk; False (logged) when that fails."""
        if self._disk is None:
            return False
        record = {
            "version": RECORD_VERSION,
            "fingerprint": self.fingerprint,
            "kind": kind,
            "tokens": array("i", tokens).tobytes(),
            "sha256": hashlib.sha256(state).hexdigest(),
            "state": bytes(state),  # a snapshot may be a bytearray
            "saved_at": time.time(),
        }
        try:
            self._disk.set(self._key(tokens), pickle.dumps(record, protocol=5))
            if kind == "system":
                self._disk.set(f"system:{self.fingerprint}", self._key(tokens))
            else:
                recent = self._disk.get(f"recent:{self.fingerprint}", default=[])
                key = self._key(tokens)
                recent = [key] + [k for k in recent if k != key]
                self._disk.set(f"recent:{self.fingerprint}", recent[:1000])
        except Exception as exc:
            self._counters["disk_errors"] += 1
            log.warning("context cache: could not write to %s (%s)", self.settings.dir, exc)
            return False
        self._counters["disk_writes"] += 1
        return True

    def has_persisted(self, tokens: Sequence[int]) -> bool:
        if self._disk is None:
            return False
        try:
            return self._key(tokens) in self._disk
        except Exception:
            return False

    def load_persisted(self, *, kind: str = "system", limit: int = 1) -> int:
        """Load persisted states of ``kind`` into RAM (system prompt pinned).

        Every record is verified (version, fingerprint, token ids, checksum); a bad one
        is deleted and counted as a miss with a warning. Returns entries loaded.
        """
        if self._disk is None:
            return 0
        try:
            if kind == "system":
                key = self._disk.get(f"system:{self.fingerprint}")
                keys = [key] if key else []
            else:
                keys = list(self._disk.get(f"recent:{self.fingerprint}", default=[]))[:limit]
        except Exception as exc:
            self._counters["disk_errors"] += 1
            log.warning("context cache: cannot read %s (%s); starting cold", self.settings.dir, exc)
            return 0
        if not keys:
            self._counters["disk_misses"] += 1
            log.log(logging.INFO if kind == "system" else logging.DEBUG,
                    "context cache: no saved %s context for this model configuration", kind)
            return 0
        loaded = 0
        for key in keys:
            loaded_record = self._read_record(key)
            if loaded_record is None:
                continue
            tokens, state = loaded_record  # a disk hit, not a snapshot: not counted as a save
            if self._insert(tokens, state, pinned=kind == "system") is not None:
                loaded += 1
        return loaded

    def _read_record(self, key: str) -> tuple[tuple[int, ...], bytes] | None:
        try:
            raw = self._disk.get(key)
            if raw is None:
                self._counters["disk_misses"] += 1
                return None
            record = pickle.loads(raw)
            problem = self._validate(key, record)
        except Exception as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem:
            self._counters["disk_errors"] += 1
            log.warning(
                "context cache: ignoring saved context %s in %s: %s; it will be rebuilt",
                key, self.settings.dir, problem,
            )
            with suppress(Exception):
                self._disk.delete(key)
            return None
        self._counters["disk_hits"] += 1
        tokens = tuple(array("i", record["tokens"]))
        return tokens, record["state"]

    def _validate(self, key: str, record: Any) -> str:
        """Empty string when ``record`` is a sound state for this configuration."""
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            return "unknown record format"
        if record.get("fingerprint") != self.fingerprint:
            return "saved for a different model configuration"
        state, tokens = record.get("state"), record.get("tokens")
        if not isinstance(state, bytes) or not isinstance(tokens, bytes) or not tokens:
            return "missing fields"
        if len(tokens) % array("i").itemsize:
            return "truncated token ids"
        if hashlib.sha256(state).hexdigest() != record.get("sha256"):
            return "checksum mismatch (corrupt or truncated)"
        if self._key(array("i", tokens)) != key:
            return "token ids do not match the key"
        return ""

    def close(self) -> None:
        if self._disk is not None:
            with suppress(Exception):
                self._disk.close()
            self._disk = None


def disk_usage(settings: CacheSettings) -> dict[str, Any]:
    """What the persistent cache holds, for ``jarvis cache stats`` (no model needed)."""
    cache = ContextCache(settings)
    disk = cache._disk
    info: dict[str, Any] = {"dir": str(settings.dir), "max_bytes": settings.disk_max_bytes}
    if disk is None:
        info["status"] = "unavailable"
        return info
    try:
        keys = [k for k in disk.iterkeys() if isinstance(k, str)]
        info.update(
            status="ok",
            bytes_on_disk=int(disk.volume()),
            contexts=sum(k.startswith("ctx:") for k in keys),
            system_prompts=sum(k.startswith("system:") for k in keys),
            configurations=len({k.split(":")[1] for k in keys if k.startswith("ctx:")}),
        )
    finally:
        cache.close()
    return info
