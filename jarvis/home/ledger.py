"""What Jarvis has answered on MQTT, kept across restarts: the bridge acknowledges a
command to the broker only once it is answered, so after a crash the broker delivers
again whatever was not acknowledged; this record is how a command answered just before
the crash is recognised and not answered (or acted on) twice.

A key names one delivery: a hash of its topic and payload, plus the packet id the
broker gave it (which it keeps when it delivers the message again). A command without
an ``id`` is named the same way, so it needs none. Only redeliveries (the broker's DUP
flag) are looked up: a message delivered for the first time is always new.

Each key holds one of:

* ``answered``: its reply, result or error was handed to the broker;
* ``acted``: device commands were published for it (the actions and their replies are
  kept), but its reply was not: a redelivery is answered from this record and its
  device commands are never published again.

The record is bounded (``max_bytes`` on disk, least recently stored first out: about
20,000 commands in the default 4 MiB) and lives in a ``diskcache`` directory under
``JARVIS_CACHE_DIR`` (:class:`~jarvis.diskstore.DiskStore`: a corrupt database is moved
aside and rebuilt with a warning). Without a directory, or when it cannot be used, the
record is kept in memory only (same bounds by count), which still covers reconnects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jarvis.diskstore import DiskStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
MEMORY_ENTRIES = 20_000
"""Keys kept when there is no directory (about what ``DEFAULT_MAX_BYTES`` holds)."""
_ANSWERED = "a"
_ACTED = "d:"


def delivery_key(topic: str, payload: bytes, mid: int) -> str:
    """The name of one delivered message: the same for every redelivery of it."""
    digest = hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + payload)
    return f"{digest.hexdigest()[:32]}:{mid}"


def ledger_dir(cache_dir: Path | None, client_id: str) -> Path | None:
    """Where the record of one MQTT client id lives: ``<JARVIS_CACHE_DIR>/mqtt/<id>``
    (the broker's session, and so its redeliveries, belong to the client id)."""
    if cache_dir is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", client_id)[:80] or "_"
    if safe != client_id:
        safe += "-" + hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return cache_dir / "mqtt" / safe


@dataclass(frozen=True)
class Entry:
    """What the record says about one key."""

    answered: bool
    """Its answer was handed to the broker."""
    actions: tuple[Mapping[str, Any], ...] = ()
    """For an ask that acted but was not answered: the device commands it published."""
    text: str = ""
    """... and what their replies say ("Turning on the kitchen light.")."""


class Ledger:
    """The record; every method is quick (one small sqlite statement) and never raises:
    a store that fails is logged and treated as empty."""

    def __init__(self, directory: Path | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._store: DiskStore | None = None
        self._failures = 0
        if directory is not None:
            try:
                self._store = DiskStore(directory, what="MQTT record of answered commands",
                                        size_limit=max_bytes,
                                        eviction_policy="least-recently-stored")
            except (StoreError, OSError) as exc:
                log.warning("MQTT: cannot keep the record of answered commands in %s (%s); "
                            "keeping it in memory only: a command answered just before a "
                            "crash may be answered again after it", directory, exc)

    @property
    def persistent(self) -> bool:
        return self._store is not None

    def get(self, key: str) -> Entry | None:
        raw = self._read(key)
        if raw is None:
            return None
        if raw == _ANSWERED:
            return Entry(True)
        if raw.startswith(_ACTED):
            try:
                data = json.loads(raw[len(_ACTED):])
                return Entry(False, tuple(data["actions"]), str(data["text"]))
            except (ValueError, KeyError, TypeError):
                log.warning("MQTT: an unreadable record for %s; treated as unanswered", key)
        return None

    def answered(self, keys: Iterable[str]) -> None:
        """Record that the answer to the command delivered as ``keys`` goes out now."""
        for key in keys:
            self._write(key, _ANSWERED)

    def acted(self, keys: Iterable[str], actions: Sequence[Mapping[str, Any]],
              text: str) -> None:
        """Record, before they are published, the device commands sent for an ask."""
        value = _ACTED + json.dumps({"actions": list(actions), "text": text},
                                    ensure_ascii=True, default=str)
        for key in keys:
            self._write(key, value)

    def forget(self, keys: Iterable[str]) -> None:
        """An answer recorded but never delivered: the command is answered again when
        the broker delivers it again."""
        for key in keys:
            self._memory.pop(key, None)
            if self._store is not None:
                try:
                    self._store.delete(key)
                except Exception as exc:  # a store that fails must not stop the bridge
                    self._failed(exc)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------------ storage

    def _read(self, key: str) -> str | None:
        if self._store is None:
            return self._memory.get(key)
        try:
            value = self._store.get(key)
        except Exception as exc:  # corrupt (healed), locked, I/O: a miss
            self._failed(exc)
            return None
        return value if isinstance(value, str) else None

    def _write(self, key: str, value: str) -> None:
        if self._store is None:
            self._memory[key] = value
            self._memory.move_to_end(key)
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)
            return
        try:
            self._store.set(key, value)
        except Exception as exc:  # corrupt (healed), locked, full disk: not recorded
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
            log.warning("MQTT: the record of answered commands failed (%s; %d times so far)",
                        exc, self._failures)
