"""A ``diskcache`` directory that holds raw bytes and text only, and heals itself.

Both persistent caches (the LLM's saved contexts, the TTS phrase cache) use it:

* **No pickle, either way.** diskcache pickles any key or value that is not bytes,
  str, int or float, and unpickles whatever a row's ``mode`` column says: whoever can
  write the directory could make the process run code. :class:`SafeDisk` refuses to
  store anything that would be pickled (TypeError) and to read a pickled key or value
  (:class:`UnsafeRecordError`). The settings a cache directory keeps in its own
  database (size limit, sqlite pragmas, pickle protocol) are all overridden by ours.
* **Corruption heals.** A ``cache.db`` that is not a database or is malformed (found
  when opening, by ``PRAGMA quick_check``, or by any later operation) is moved aside as
  ``cache.db.corrupt-<time>``, the value files it referred to are removed, and a new
  empty cache replaces it, with one warning that says so.
* **Deleted value files are noticed:** diskcache returns a silent miss and keeps the
  row; :meth:`DiskStore.get` deletes the row and raises :class:`MissingFileError`, so
  the caller can say so and write the record again.
* :func:`clear_store` really clears, or raises :class:`StoreUnavailable` saying why
  (a read-only directory) instead of pretending.
* Small memory: no sqlite memory map and a 1 MiB page cache per connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW, MODE_TEXT, UNKNOWN

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME = "cache.db"
_VALUE_DIR = re.compile(r"^[0-9a-f]{2}$")
_KEEP_CORRUPT = 2
"""Moved-aside corrupt databases kept for inspection (older ones are removed)."""
_CORRUPT_CODES = {11, 26}
"""SQLITE_CORRUPT, SQLITE_NOTADB (primary result codes)."""


class StoreError(Exception):
    """Something about a store or one of its records; the message says what."""


class StoreUnavailable(StoreError):
    """The directory cannot be used (cannot be created, read-only, locked...)."""


class CorruptStoreError(StoreError):
    """The database was corrupt; it has been moved aside and replaced (and logged)."""


class MissingFileError(StoreError):
    """A record's value file is gone (deleted behind the cache's back)."""


class UnsafeRecordError(StoreError):
    """A record that would have to be unpickled (diskcache's default for objects)."""


class SafeDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's serialisation without pickle: keys are str/bytes/int/float, values
    are those or a file-like object of bytes; anything else is refused both ways."""

    _PLAIN = (str, bytes, int, float)

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) not in self._PLAIN:
            raise TypeError(f"cache keys must be str, bytes, int or float, not "
                            f"{type(key).__name__} (nothing is pickled)")
        result: tuple[Any, bool] = super().put(key)
        return result

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise UnsafeRecordError("a pickled key (refused: nothing is unpickled)")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, Any, Any]:
        if not read and type(value) not in self._PLAIN:
            raise TypeError(f"cache values must be bytes, str, int, float or a binary file, "
                            f"not {type(value).__name__} (nothing is pickled)")
        result: tuple[int, int, Any, Any] = super().store(value, read, key)
        return result

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (MODE_RAW, MODE_BINARY, MODE_TEXT):
            raise UnsafeRecordError("a pickled value (refused: nothing is unpickled)")
        try:
            return super().fetch(mode, filename, value, read)
        except OSError as exc:  # diskcache would turn this into a silent miss
            raise MissingFileError(f"its value file {filename} is missing ({exc.strerror})"
                                   ) from None


def is_corruption(exc: BaseException) -> bool:
    """True when ``exc`` says the sqlite database itself is damaged."""
    if isinstance(exc, CorruptStoreError):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _quick_check(db: Path) -> str:
    """Empty when ``db`` is absent or sound, else what is wrong with it. Errors that
    are not corruption (locked, read-only, I/O) are left to the real open to report."""
    if not db.exists():
        return ""
    try:
        con = sqlite3.connect(str(db), timeout=10, isolation_level=None)
    except sqlite3.Error:
        return ""
    try:
        rows = con.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc) if is_corruption(exc) else ""
    finally:
        con.close()
    verdict = str(rows[0][0]) if rows else "no answer to quick_check"
    return "" if verdict == "ok" else verdict


def _value_files(directory: Path) -> list[Path]:
    """The value files diskcache writes: ``xx/yy/<hex>.val`` (xx, yy hexadecimal)."""
    files: list[Path] = []
    for first in directory.iterdir() if directory.is_dir() else ():
        if first.is_dir() and _VALUE_DIR.match(first.name):
            for second in first.iterdir():
                if second.is_dir() and _VALUE_DIR.match(second.name):
                    files.extend(p for p in second.glob("*.val") if p.is_file())
    return files


def _remove_value_files(directory: Path) -> int:
    """Delete every value file and the emptied value directories; returns files removed.
    OSError (e.g. a read-only directory) propagates."""
    files = _value_files(directory)
    for path in files:
        path.unlink()
    for first in list(directory.iterdir()):
        if first.is_dir() and _VALUE_DIR.match(first.name):
            for second in list(first.iterdir()):
                if second.is_dir() and _VALUE_DIR.match(second.name):
                    with contextlib.suppress(OSError):
                        second.rmdir()
            with contextlib.suppress(OSError):
                first.rmdir()
    return len(files)


def _corrupt_copies(directory: Path) -> list[Path]:
    """Databases moved aside, oldest first (their ``-wal`` files not included)."""
    return sorted(p for p in directory.glob(f"{DB_NAME}.corrupt-*")
                  if p.is_file() and not p.name.endswith("-wal"))


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


class DiskStore:
    """One cache directory: a :class:`diskcache.Cache` over :class:`SafeDisk` that is
    replaced by a fresh one when its database turns out to be corrupt.

    ``what`` names the cache in messages ("context cache", "TTS phrase cache").
    :class:`StoreUnavailable` when the directory cannot be used at all.
    """

    def __init__(self, directory: Path, *, what: str, size_limit: int,
                 eviction_policy: str = "least-recently-used", cull_limit: int = 10) -> None:
        self.directory = directory
        self.what = what
        self.healed = 0
        """How many times a corrupt database was moved aside and replaced."""
        self._settings: dict[str, Any] = {
            **diskcache.DEFAULT_SETTINGS,
            "size_limit": size_limit,
            "eviction_policy": eviction_policy,
            "cull_limit": cull_limit,
            "statistics": 0,
            "tag_index": 0,
            "sqlite_mmap_size": 0,
            "sqlite_cache_size": 256,  # pages: 1 MiB per connection (thread)
            "disk_pickle_protocol": 0,  # never used: SafeDisk refuses to pickle
        }
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create {directory} ({exc.strerror or exc})"
                                   ) from None
        problem = _quick_check(directory / DB_NAME)
        if problem:
            self._quarantine(problem)
        self._cache = self._open()

    @property
    def db(self) -> Path:
        return self.directory / DB_NAME

    def _open(self) -> diskcache.Cache:
        try:
            return diskcache.Cache(str(self.directory), disk=SafeDisk, **self._settings)
        except Exception as exc:
            if not is_corruption(exc):
                raise StoreUnavailable(self._why_unusable(exc)) from None
            problem = str(exc)
        self._quarantine(problem)
        try:
            return diskcache.Cache(str(self.directory), disk=SafeDisk, **self._settings)
        except Exception as again:
            raise StoreUnavailable(self._why_unusable(again)) from None

    def _why_unusable(self, exc: BaseException) -> str:
        if not _writable(self.directory):
            return f"{self.directory} is read-only ({exc})"
        return f"cannot open {self.db} ({type(exc).__name__}: {exc})"

    def _quarantine(self, problem: str) -> None:
        """Move the corrupt database aside (with its WAL, so the pair still opens),
        drop the value files it referred to, keep only the newest corrupt copies."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.directory / f"{DB_NAME}.corrupt-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{DB_NAME}.corrupt-{stamp}-{n}"
        try:
            os.replace(self.db, target)
            wal = self.directory / f"{DB_NAME}-wal"
            if wal.exists():
                os.replace(wal, Path(f"{target}-wal"))
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{DB_NAME}-shm").unlink()
            _remove_value_files(self.directory)
            for old in _corrupt_copies(self.directory)[:-_KEEP_CORRUPT]:
                old.unlink()
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{old}-wal").unlink()
        except OSError as exc:
            raise StoreUnavailable(
                f"{self.db} is corrupt ({problem}) and cannot be moved aside "
                f"({exc.strerror or exc}): delete it") from None
        self.healed += 1
        log.warning("%s: %s is corrupt (%s); moved it aside to %s and started an empty "
                    "cache", self.what, self.db, problem, target.name)

    def _heal(self, exc: BaseException) -> CorruptStoreError:
        """Replace the corrupt database found by ``exc``; the error to raise."""
        with contextlib.suppress(Exception):
            self._cache.close()
        self._quarantine(str(exc))
        self._cache = self._open()
        return CorruptStoreError(f"{self.db} was corrupt and has been replaced")

    def run(self, op: Callable[[diskcache.Cache], T]) -> T:
        """``op(cache)``; a corrupt database met on the way is healed (and logged) and
        :class:`CorruptStoreError` raised. Other errors propagate."""
        try:
            return op(self._cache)
        except Exception as exc:
            if is_corruption(exc):
                raise self._heal(exc) from None
            raise

    # ------------------------------------------------------------------ operations

    def get(self, key: str, *, read: bool = False) -> Any:
        """The value of ``key`` (a binary file handle with ``read``), None when absent.

        A record that cannot be read safely (value file deleted, pickled) is deleted
        and :class:`MissingFileError` / :class:`UnsafeRecordError` raised.
        """
        try:
            return self.run(lambda c: c.get(key, read=read))
        except (MissingFileError, UnsafeRecordError):
            with contextlib.suppress(Exception):
                self.delete(key)
            raise

    def set(self, key: str, value: Any, *, read: bool = False) -> None:
        """Store ``value`` (bytes or str, or a binary file-like object with ``read``)."""
        self.run(lambda c: c.set(key, value, read=read))

    def delete(self, key: str) -> None:
        self.run(lambda c: c.delete(key))

    def __contains__(self, key: str) -> bool:
        return bool(self.run(lambda c: key in c))

    def keys(self) -> list[str]:
        """Every str key (a pickled key ends the listing with UnsafeRecordError)."""
        return self.run(lambda c: [k for k in c.iterkeys() if isinstance(k, str)])

    def volume(self) -> int:
        """Bytes on disk: the database plus the value files."""
        return int(self.run(lambda c: c.volume()))

    def __len__(self) -> int:
        return int(self.run(lambda c: len(c)))

    def clear(self) -> int:
        """Remove every record (rows and value files) and the corrupt copies kept
        aside; returns the records removed. :class:`StoreUnavailable` when the directory
        is read-only."""
        if not _writable(self.directory):
            raise StoreUnavailable(f"{self.directory} is read-only")
        removed = int(self.run(lambda c: c.clear()))
        try:
            for path in _corrupt_copies(self.directory):
                path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}-wal").unlink()
            _remove_value_files(self.directory)  # any a crash or a bad database left
        except OSError as exc:
            raise StoreUnavailable(f"cannot clear {self.directory} ({exc.strerror or exc})"
                                   ) from None
        return removed

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._cache.close()


def clear_store(directory: Path, *, what: str) -> int:
    """Empty the cache in ``directory`` however it is (a corrupt database is moved
    aside and replaced first); returns the records removed. :class:`StoreUnavailable`
    says why it cannot (a read-only directory)."""
    if not (directory / DB_NAME).exists() and not _corrupt_copies(directory) \
            and not _value_files(directory):
        return 0  # no cache here: create nothing
    if not _writable(directory):
        raise StoreUnavailable(f"{directory} is read-only")
    store = DiskStore(directory, what=what, size_limit=diskcache.DEFAULT_SETTINGS["size_limit"])
    try:
        return store.clear()
    finally:
        store.close()
