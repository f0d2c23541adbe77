"""The ledger of answered MQTT commands (jarvis/home/ledger.py) on a real diskcache
directory: it survives a reopen, stays within its bound, rebuilds a corrupt store with
a warning instead of failing, and names deliveries the way redeliveries need."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jarvis.home.ledger import MEMORY_ENTRIES, Entry, Ledger, delivery_key, ledger_dir


def test_records_survive_a_reopen(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    assert ledger.persistent
    ledger.answered(["k1", "k2"])
    ledger.acted(["k3"], [{"device": "kitchen_light", "action": "on"}],
                 "Turning on the kitchen light.")
    ledger.close()
    again = Ledger(tmp_path / "ledger")
    assert again.get("k1") == Entry(True) and again.get("k2") == Entry(True)
    assert again.get("k3") == Entry(False, ({"device": "kitchen_light", "action": "on"},),
                                    "Turning on the kitchen light.")
    assert again.get("nope") is None
    again.answered(["k3"])  # answered after all: the acted record is replaced
    again.forget(["k1"])    # an answer given up: the command is answered again
    assert again.get("k3") == Entry(True) and again.get("k1") is None
    again.close()


def test_a_corrupt_store_is_rebuilt_with_a_warning(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "ledger"
    Ledger(directory).close()
    (directory / "cache.db").write_bytes(b"this is not a database" * 100)
    caplog.set_level(logging.WARNING)
    ledger = Ledger(directory)
    assert ledger.persistent and ledger.get("anything") is None
    assert "corrupt" in caplog.text
    ledger.answered(["k"])
    ledger.close()
    assert Ledger(directory).get("k") == Entry(True)


def test_an_unusable_directory_falls_back_to_memory(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    caplog.set_level(logging.WARNING)
    ledger = Ledger(blocker / "ledger")
    assert not ledger.persistent and "memory only" in caplog.text
    ledger.answered(["k"])
    assert ledger.get("k") == Entry(True)


def test_the_disk_record_is_bounded(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger", max_bytes=256 * 1024)
    for i in range(6000):
        ledger.answered([f"{i:032x}:{i % 65536}"])
    assert ledger._store is not None
    volume = ledger._store.volume()
    assert volume <= 256 * 1024 * 1.25, volume
    # Least recently stored go first: the newest are all there, the oldest are gone.
    assert all(ledger.get(f"{i:032x}:{i % 65536}") for i in range(5900, 6000))
    assert ledger.get(f"{0:032x}:0") is None
    ledger.close()


def test_the_memory_record_is_bounded() -> None:
    ledger = Ledger(None)
    for i in range(MEMORY_ENTRIES + 10):
        ledger.answered([str(i)])
    assert ledger.get("0") is None and ledger.get(str(MEMORY_ENTRIES + 9)) == Entry(True)
    assert len(ledger._memory) == MEMORY_ENTRIES


@settings(max_examples=50, deadline=None)
@given(topic=st.text(max_size=30), payload=st.binary(max_size=100),
       mid=st.integers(0, 65535), other=st.integers(0, 65535))
def test_delivery_keys_name_one_delivery(topic: str, payload: bytes, mid: int,
                                         other: int) -> None:
    """The same message delivered again (same packet id) has the same key; the same
    payload under another packet id (a new message) does not."""
    key = delivery_key(topic, payload, mid)
    assert key == delivery_key(topic, payload, mid)
    assert (key == delivery_key(topic, payload, other)) == (mid == other)
    assert key != delivery_key(topic + "x", payload, mid)


def test_ledger_dir_is_per_client_id(tmp_path: Path) -> None:
    assert ledger_dir(None, "jarvis-kitchen") is None
    assert ledger_dir(tmp_path, "jarvis-kitchen") == tmp_path / "mqtt" / "jarvis-kitchen"
    odd = ledger_dir(tmp_path, "../x y")
    assert odd is not None and odd.parent == tmp_path / "mqtt" and "/" not in odd.name[1:]
    assert odd != ledger_dir(tmp_path, "../x_y")
