"""Saved contexts on disk: plain bytes with a small header, verified before they are
parsed, and KV-state buffers that give their memory back when dropped.

A record (all integers little-endian)::

    offset   size  field
    0        4     magic  b"JVKV"
    4        2     format version (2)
    6        32    SHA-256 of every byte from offset 38 to the end
    38       1     kind: 0 the system prompt, 1 a conversation
    39       3     reserved, zero
    42       4     token count n
    46       8     state length s
    54       8     saved at (Unix time, float64)
    62       32    fingerprint of the model configuration (ASCII hex)
    94       4n    the token ids (int32)
    94 + 4n  s     the llama.cpp sequence state

Reading compares the magic and the version, checks the total size against the cache's
byte cap, and checks the SHA-256 over everything else *before* a single field is
interpreted: a tampered or truncated record is refused without being parsed. Nothing
is ever unpickled.

States live in anonymous memory maps (:func:`new_state_buffer`), one per state: the
allocator never keeps a freed state's pages (glibc would keep states of a few MB in
its heaps and per-thread arenas, unreturned), so what the cache counts is what the
process holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import struct
import sys
import time
from array import array
from dataclasses import dataclass
from typing import IO, Any

MAGIC = b"JVKV"
VERSION = 2
_PREFIX = struct.Struct("<4sH")
_DIGEST_SIZE = 32
_FIELDS = struct.Struct("<B3xIQd32s")
_FIELDS_AT = _PREFIX.size + _DIGEST_SIZE
HEADER_SIZE = _FIELDS_AT + _FIELDS.size
KINDS = ("system", "conversation")
_CHUNK = 1 << 22

State = bytes | bytearray | memoryview
"""A saved KV state: any contiguous byte buffer (snapshots and records read from disk
are memoryviews of their own anonymous memory map)."""

PAGE = mmap.PAGESIZE
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


class RecordError(ValueError):
    """A saved record that is not a sound record (the message says why)."""


@dataclass(frozen=True)
class Record:
    """A verified record."""

    kind: str
    fingerprint: str
    tokens: tuple[int, ...]
    state: memoryview
    saved_at: float


def new_state_buffer(size: int) -> memoryview:
    """``size`` writable bytes in their own anonymous private memory map: freed (to the
    OS, not to an allocator's free lists) as soon as the last view is dropped.

    Large maps ask for transparent huge pages where the kernel offers them: faulting in
    a fresh 10 MB state 4 KiB at a time took 6.6 ms here, in 2 MiB pages 0.8 ms (what
    reusing a heap block costs)."""
    mapped = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
    if size >= _HUGE_PAGE and _MADV_HUGEPAGE is not None:
        with contextlib.suppress(OSError):  # no THP in this kernel: 4 KiB pages it is
            mapped.madvise(_MADV_HUGEPAGE)
    return memoryview(mapped)[:size]


def held_bytes(state: State) -> int:
    """Bytes ``state`` keeps allocated: its whole memory map (whole pages) when it views
    one, else the Python object's allocation (a bytearray may be over-allocated)."""
    backing: Any = state.obj if isinstance(state, memoryview) else state
    if isinstance(backing, mmap.mmap):
        return -(-len(backing) // PAGE) * PAGE
    return sys.getsizeof(backing)


def _token_bytes(tokens: tuple[int, ...] | list[int]) -> bytes:
    ids = array("i", tokens)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()


class RecordWriter:
    """A record as a read-only binary stream (``read(n)``), so diskcache writes it to its
    file in chunks without a copy of the state being made."""

    def __init__(self, *, kind: str, fingerprint: str, tokens: tuple[int, ...],
                 state: State, saved_at: float | None = None) -> None:
        fp = fingerprint.encode("ascii")
        if len(fp) > 32:
            raise ValueError("the fingerprint is at most 32 ASCII characters")
        view = memoryview(state).cast("B")
        fields = _FIELDS.pack(KINDS.index(kind), len(tokens), len(view),
                              time.time() if saved_at is None else saved_at, fp)
        ids = _token_bytes(tokens)
        digest = hashlib.sha256(fields)
        digest.update(ids)
        digest.update(view)
        self._parts = [memoryview(_PREFIX.pack(MAGIC, VERSION) + digest.digest() + fields + ids),
                       view]
        self.size = HEADER_SIZE + len(ids) + len(view)

    def read(self, n: int = -1) -> memoryview | bytes:
        """The next at most ``n`` bytes (all that is left for ``n < 0``); empty at the end."""
        while self._parts and not len(self._parts[0]):
            self._parts.pop(0)
        if not self._parts:
            return b""
        part = self._parts[0]
        take = len(part) if n < 0 else min(n, len(part), _CHUNK)
        self._parts[0] = part[take:]
        return part[:take]

    def getvalue(self) -> bytes:
        """The whole record as bytes (for tests and small states)."""
        return b"".join(bytes(p) for p in self._parts)


def _stream_size(stream: IO[bytes]) -> int:
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(0)
    return size


def read_record(stream: IO[bytes], *, limit: int) -> Record:
    """Read and verify one record from ``stream``; :class:`RecordError` says what is
    wrong. At most ``limit`` bytes are read (a larger record is refused unread)."""
    size = _stream_size(stream)
    if size < HEADER_SIZE:
        raise RecordError(f"truncated ({size} bytes, shorter than a record header)")
    if size > limit:
        raise RecordError(f"{size:,} bytes: more than the cache may hold ({limit:,})")
    buffer = new_state_buffer(size)
    got = 0
    while got < size:
        n = stream.readinto(buffer[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    if got != size:
        raise RecordError(f"truncated (read {got} of {size} bytes)")
    magic, version = _PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise RecordError("not a saved context (unknown format)")
    if version != VERSION:
        raise RecordError(f"format version {version}, this Jarvis reads {VERSION}")
    digest = hashlib.sha256(buffer[_FIELDS_AT:]).digest()
    if not hmac.compare_digest(digest, bytes(buffer[_PREFIX.size:_FIELDS_AT])):
        raise RecordError("checksum mismatch (corrupt, truncated or tampered with)")
    # Verified: from here on the fields are ours.
    kind, n_tokens, state_len, saved_at, fp = _FIELDS.unpack_from(buffer, _FIELDS_AT)
    if kind >= len(KINDS) or HEADER_SIZE + 4 * n_tokens + state_len != size or not n_tokens:
        raise RecordError("inconsistent header")
    ids = array("i")
    ids.frombytes(buffer[HEADER_SIZE:HEADER_SIZE + 4 * n_tokens])
    if sys.byteorder == "big":
        ids.byteswap()
    state = buffer[HEADER_SIZE + 4 * n_tokens:]
    return Record(KINDS[kind], fp.rstrip(b"\0").decode("ascii", "replace"), tuple(ids), state,
                  saved_at)
