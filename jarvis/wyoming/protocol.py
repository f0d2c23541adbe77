"""The Wyoming wire format, read strictly.

An event is a JSON header line (``type``, optional ``data``, ``data_length``,
``payload_length``), then ``data_length`` bytes of JSON merged into ``data``, then
``payload_length`` bytes of payload (audio). The ``wyoming`` library's reader turns
every problem into ``None``, the same as a clean end of the connection; this one says
what was wrong (:class:`ProtocolError`), so the server can answer it and log it, and
bounds what a client can make it hold in memory.

Events are written with :func:`encode_event`, one ``bytes`` per event, so an event can
be put on the socket without awaiting (streamed reply text) and two tasks writing on
one connection never interleave.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wyoming.event import Event

from jarvis.errors import JarvisError

MAX_LINE_BYTES = 1 << 20
"""Longest header line (the reader's buffer limit)."""
MAX_DATA_BYTES = 1 << 20
"""Largest ``data_length`` (a TTS text, a transcript with its context)."""
MAX_PAYLOAD_BYTES = 4 << 20
"""Largest ``payload_length`` (an audio chunk; Home Assistant sends a few KiB)."""
PROTOCOL_VERSION = "1.10.2"
"""The ``version`` written in every header (the library version we speak)."""


class WyomingError(JarvisError):
    """A request this server does not accept; answered with an ``error`` event whose
    ``code`` is :attr:`code`."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(WyomingError):
    """The bytes on the connection are not Wyoming events (garbage, a truncated or
    oversized header); the connection cannot continue."""

    def __init__(self, message: str, code: str = "bad_event") -> None:
        super().__init__(message, code)


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event; None when the client closed the connection between events.

    :class:`ProtocolError` for anything else: a line that is not a JSON object with a
    string ``type``, lengths that are not whole numbers within the limits, a
    connection closed in the middle of an event.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise ProtocolError(f"connection closed in the middle of an event header "
                            f"({len(exc.partial)} bytes without a newline)") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"event header longer than {MAX_LINE_BYTES} bytes") from None
    header = _json_object(line, "event header")
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ProtocolError("event header has no 'type' (a string)")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError(f"{event_type}: 'data' is not a JSON object")
    data_length = _length(header, "data_length", MAX_DATA_BYTES, event_type)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES, event_type)
    try:
        if data_length:
            extra = _json_object(await reader.readexactly(data_length), f"{event_type} data")
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"{event_type}: connection closed after {len(exc.partial)} of "
                            "the announced bytes") from None
    return Event(type=event_type, data=data, payload=payload)


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{what} is not JSON ({_preview(raw)})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object ({_preview(raw)})")
    return value


def _length(header: dict[str, Any], key: str, limit: int, event_type: str) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{event_type}: '{key}' is not a whole number >= 0")
    if value > limit:
        raise ProtocolError(f"{event_type}: '{key}' is {value} bytes; at most {limit}",
                            "too_large")
    return value


def _preview(raw: bytes) -> str:
    text = raw[:40].decode("utf-8", "backslashreplace").strip()
    return repr(text) + ("..." if len(raw) > 40 else "")


def encode_event(event: Event) -> bytes:
    """``event`` as it goes on the wire: header line, data, payload."""
    header: dict[str, Any] = {"type": event.type, "version": PROTOCOL_VERSION}
    data = json.dumps(event.data, ensure_ascii=False).encode() if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    line = json.dumps(header, ensure_ascii=False).encode() + b"\n"
    return line + data + (event.payload or b"")


def field(event: Event, name: str, kind: type, *, required: bool = True) -> Any:
    """``event.data[name]`` if it has type ``kind`` (None when absent and not
    ``required``); :class:`WyomingError` naming the event and the field otherwise."""
    value = event.data.get(name)
    if value is None and not required:
        return None
    if kind is int and isinstance(value, bool):
        value = None
    if not isinstance(value, kind):
        raise WyomingError(f"{event.type}: '{name}' must be a {_KINDS.get(kind, kind.__name__)}",
                           "bad_event")
    return value


_KINDS = {int: "whole number", str: "string", dict: "JSON object", list: "list"}
