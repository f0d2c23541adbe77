"""The persistent caches on hostile or damaged disks: saved contexts are plain bytes
checked before they are parsed (nothing is ever unpickled), a corrupt ``cache.db`` is
moved aside and rebuilt with one warning, deleted record files are noticed and written
again, ``jarvis cache clear`` really clears or says why it cannot, and the TTS phrase
cache heals the same way.

The context cache treats a KV state as opaque bytes, so these tests use random bytes
for states (no model needed); tests/test_context_cache.py does the same through the
real model.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import diskcache
import numpy as np
import pytest

from jarvis.cli.main import main as jarvis_main
from jarvis.diskstore import DiskStore
from jarvis.llm.cache import ContextCache, disk_usage
from jarvis.llm.records import HEADER_SIZE, MAGIC, RecordError, RecordWriter, read_record
from jarvis.speech.phrase_cache import PhraseCache
from tests.conftest import ROOT, make_settings

FP = "0123456789abcdef" * 2
SYSTEM = tuple(range(1000, 1120))
CONVERSATION = (*SYSTEM, *range(5000, 5040))
MODE_PICKLE = 4  # diskcache's mode column for a pickled value


def state_for(tokens: tuple[int, ...]) -> bytes:
    """A stand-in KV state: deterministic bytes, large enough to live in a value file."""
    return np.random.default_rng(len(tokens)).integers(0, 256, 100 * len(tokens),
                                                         dtype=np.uint8).tobytes()


def new_cache(tmp_path: Path, **env: str) -> ContextCache:
    return ContextCache(make_settings(tmp_path, **env).cache, fingerprint=FP)


def saved(tmp_path: Path) -> Path:
    """A cache directory holding the system prompt and one conversation; its path."""
    cache = new_cache(tmp_path)
    assert cache.persist(SYSTEM, state_for(SYSTEM), kind="system")
    assert cache.persist(CONVERSATION, state_for(CONVERSATION))
    cache.close()
    return tmp_path / "ctx-cache"


def record_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.val"))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def held(cache: ContextCache, tokens: tuple[int, ...]) -> bytes | None:
    match = cache.lookup(tokens)
    if match is None or match.length != len(tokens):
        return None
    return bytes(match.entry.payload)


# --------------------------------------------------------------------------- no pickle


def test_saved_contexts_are_plain_bytes_and_round_trip(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    with sqlite3.connect(directory / "cache.db") as db:
        rows = db.execute("SELECT key, raw, mode FROM Cache").fetchall()
    assert len(rows) == 4  # two records, the system pointer, the recent list
    assert all(raw == 1 and isinstance(key, str) for key, raw, _ in rows), rows
    assert all(mode != MODE_PICKLE for _, _, mode in rows), rows
    files = record_files(directory)
    assert len(files) == 2 and all(f.read_bytes()[:4] == MAGIC for f in files)

    cache = new_cache(tmp_path)
    assert cache.load_persisted(kind="system") == 1
    assert cache.load_persisted(kind="conversation", limit=4) == 1
    assert held(cache, SYSTEM) == state_for(SYSTEM)
    assert held(cache, CONVERSATION) == state_for(CONVERSATION)
    assert cache.has_persisted(SYSTEM) and cache.has_persisted(CONVERSATION)
    stats = cache.stats()
    assert stats.disk_hits == 2 and stats.disk_errors == 0


@pytest.mark.parametrize("where", ["token count", "state"])
def test_a_tampered_body_is_refused_before_it_is_parsed(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record whose header is valid (magic, version) but whose body was changed is
    refused by its checksum before any field is read: with the token count inflated,
    parsing first would have complained about the lengths instead."""
    directory = saved(tmp_path)
    for path in record_files(directory):
        data = bytearray(path.read_bytes())
        if where == "token count":
            struct.pack_into("<I", data, 42, 0xFFFF_FFFF)
        else:
            data[HEADER_SIZE + 4 * len(SYSTEM) + 1000] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(RecordError, match="checksum mismatch"):
            read_record(io.BytesIO(bytes(data)), limit=1 << 30)
    cache = new_cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.load_persisted(kind="system") == 0
    (message,) = warnings_of(caplog)
    assert "checksum mismatch" in message
    assert held(cache, SYSTEM) is None and not cache.has_persisted(SYSTEM)
    assert len(record_files(directory)) == 1  # the bad record was deleted


def test_a_record_is_refused_unread_when_it_could_not_fit_the_cache() -> None:
    writer = RecordWriter(kind="system", fingerprint=FP, tokens=SYSTEM, state=state_for(SYSTEM))
    data = writer.getvalue()
    assert read_record(io.BytesIO(data), limit=len(data)).tokens == SYSTEM
    with pytest.raises(RecordError, match="more than the cache may hold"):
        read_record(io.BytesIO(data), limit=len(data) - 1)
    with pytest.raises(RecordError, match="truncated"):
        read_record(io.BytesIO(data[:HEADER_SIZE - 1]), limit=len(data))


class _Planted:
    """Unpickling this creates the file ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("how", ["diskcache pickle", "pickle bytes"])
def test_a_planted_pickle_is_never_unpickled(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can write JARVIS_CACHE_DIR can plant a pickle where a saved context
    belongs (as a pickled diskcache value, or as the bytes of the record): loading the
    cache must not run it."""
    directory = saved(tmp_path)
    proof = tmp_path / "code-ran"
    plain = diskcache.Cache(str(directory))  # diskcache's default Disk: pickles objects
    key = plain.get(f"system:{FP}")
    assert isinstance(key, str)
    plain.set(key, _Planted(proof) if how == "diskcache pickle"
              else pickle.dumps(_Planted(proof)))
    plain.close()
    cache = new_cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.load_persisted(kind="system") == 0
    assert not proof.exists()
    assert any("ignoring saved context" in m for m in warnings_of(caplog))


def test_nothing_that_would_be_pickled_is_stored(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", what="test", size_limit=1 << 20)
    with pytest.raises(TypeError, match="nothing is pickled"):
        store.set("key", {"a": 1})
    store.close()


# --------------------------------------------------------------------------- healing


def damage_db(directory: Path, how: str) -> None:
    """Damage cache.db in place the ways disks and people do."""
    db = directory / "cache.db"
    data = bytearray(db.read_bytes())
    if how == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif how == "header":
        data[:16] = b"not a database!\0"
    else:  # every page after the first overwritten: the schema survives, the tables not
        data[4096:] = b"\xff" * (len(data) - 4096)
    db.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        (directory / f"cache.db{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["garbage", "header", "pages"])
def test_a_corrupt_cache_db_is_moved_aside_and_rebuilt(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = saved(tmp_path)
    damage_db(directory, how)
    with caplog.at_level(logging.WARNING):
        cache = new_cache(tmp_path)
        assert cache.persistent
        assert cache.load_persisted(kind="system") == 0  # a miss: the records are gone
    (message,) = warnings_of(caplog)
    assert "corrupt" in message and "permission" not in message.lower()
    assert len(list(directory.glob("cache.db.corrupt-*"))) == 1
    assert record_files(directory) == []  # what the old database referred to
    assert cache.persist(SYSTEM, state_for(SYSTEM), kind="system")  # rebuilt
    cache.close()
    again = new_cache(tmp_path)
    assert again.load_persisted(kind="system") == 1
    assert held(again, SYSTEM) == state_for(SYSTEM)


def test_a_cache_db_corrupted_while_running_heals(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = saved(tmp_path)
    cache = new_cache(tmp_path)
    assert cache.load_persisted(kind="system") == 1
    damage_db(directory, "garbage")
    with caplog.at_level(logging.WARNING):
        first = cache.persist(CONVERSATION, state_for(CONVERSATION))
        second = cache.persist(CONVERSATION, state_for(CONVERSATION))
    assert not first and second  # the write that met it failed; the database was replaced
    (message,) = warnings_of(caplog)
    assert "corrupt" in message
    cache.close()
    assert new_cache(tmp_path).load_persisted(kind="conversation", limit=4) == 1


def test_a_deleted_record_file_is_noticed_and_written_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = saved(tmp_path)
    for path in record_files(directory):
        path.unlink()
    cache = new_cache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.load_persisted(kind="system") == 0
    (message,) = warnings_of(caplog)
    assert "missing" in message and "rebuilt" in message
    assert not cache.has_persisted(SYSTEM)  # so the backend saves it again
    assert cache.persist(SYSTEM, state_for(SYSTEM), kind="system")
    cache.close()
    assert new_cache(tmp_path).load_persisted(kind="system") == 1


# --------------------------------------------------------------------------- jarvis cache


def test_cache_clear_really_clears_a_corrupt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = saved(tmp_path)
    assert len(record_files(directory)) == 2
    damage_db(directory, "garbage")
    monkeypatch.setenv("JARVIS_CACHE_DIR", str(directory))
    assert jarvis_main(["cache", "clear"]) == 0
    assert "cleared" in capsys.readouterr().out
    assert record_files(directory) == []
    assert list(directory.glob("cache.db.corrupt-*")) == []
    usage = disk_usage(make_settings(tmp_path).cache)
    assert usage["status"] == "ok" and usage["contexts"] == 0


def test_cache_clear_on_a_healthy_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = saved(tmp_path)
    monkeypatch.setenv("JARVIS_CACHE_DIR", str(directory))
    assert jarvis_main(["cache", "clear"]) == 0
    assert record_files(directory) == []
    assert new_cache(tmp_path).load_persisted(kind="system") == 0


def run_read_only(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``jarvis *args`` with ``directory`` read-only: by its mode for an ordinary user,
    by a read-only bind mount in a private mount namespace for root (whom modes do not
    stop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    env["JARVIS_CACHE_DIR"] = str(directory)
    command = [sys.executable, "-m", "jarvis", *args]
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT,
                                  timeout=60)
        finally:
            directory.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only directory")
    script = ('mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), *command],
                            env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    if "mount" in result.stderr and "jarvis" not in result.stderr:
        pytest.skip(f"cannot make a read-only mount here: {result.stderr.strip()}")
    return result


def test_cache_clear_on_a_read_only_directory_says_so(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    result = run_read_only(directory, "cache", "clear")
    assert result.returncode == 2, result
    assert "read-only" in result.stderr and "cleared" not in result.stdout
    assert len(record_files(directory)) == 2  # nothing was touched


# --------------------------------------------------------------------------- phrase cache


def test_a_corrupt_phrase_cache_heals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    audio = np.arange(-3000, 3000, dtype=np.int16)
    cache = PhraseCache(tmp_path / "phrases", 1 << 20, "voice")
    cache.put("Done.", audio)
    cache.close()
    damage_db(tmp_path / "phrases", "garbage")
    with caplog.at_level(logging.WARNING):
        healed = PhraseCache(tmp_path / "phrases", 1 << 20, "voice")  # no TtsError
    (message,) = warnings_of(caplog)
    assert "corrupt" in message and "phrase cache" in message
    assert healed.get("Done.") is None
    healed.put("Done.", audio)
    hit = healed.get("Done.")
    assert hit is not None and np.array_equal(hit, audio)
    healed.close()


def test_damaged_phrase_audio_is_never_played(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    audio = np.arange(-3000, 3000, dtype=np.int16)
    cache = PhraseCache(tmp_path / "phrases", 1 << 20, "voice")
    cache.put("OK.", audio)
    with sqlite3.connect(tmp_path / "phrases" / "cache.db") as db:
        (value,) = db.execute("SELECT value FROM Cache").fetchone()
        damaged = bytearray(value)
        damaged[-10] ^= 0x40
        db.execute("UPDATE Cache SET value = ?", (bytes(damaged),))
    with caplog.at_level(logging.WARNING):
        assert cache.get("OK.") is None
    assert any("checksum" in m for m in warnings_of(caplog))
    assert len(cache) == 0  # forgotten, so it is synthesised and saved again
    cache.close()
