"""Topics and JSON payloads of the MQTT bridge, and the strict parser for commands.

Topics (``<base>`` is ``JARVIS_MQTT_BASE_TOPIC``, default ``jarvis/<site>``)::

    in   <base>/cmd/ask       {"text": str, "id"?: str|int, "conversation_id"?: str,
                               "speak"?: bool, "max_tokens"?: int 1-4096}
         <base>/cmd/say       {"text": str, "id"?}
         <base>/cmd/mute      {"mute": bool, "id"?}
         <base>/cmd/cancel    {"id"?, "target"?: id of the ask to cancel}  (empty = {})
         <base>/cmd/reload    {"id"?}   re-reads the device map               (empty = {})
         <base>/cmd/metrics   {"id"?}   publishes <base>/metrics now            (empty = {})
                              every <base>/cmd/* may also carry "sent_at": seconds since
                              1970 (UTC) or an ISO 8601 time with its zone
         hermes/tts/say       {"text", "siteId"?, "id"?, "sessionId"?, "lang"?}
         <discovery>/status   "online" -> Home Assistant discovery is published again
    out  <base>/reply         {"id", "text", "conversation_id", "cancelled", "spoken",
                               "actions": [{"device", "action", "topic", "source"}],
                               "latency": {"total_s", "ttft_s", "queue_s", "prompt_tokens",
                               "cached_tokens", "completion_tokens", "cache_hit",
                               "finish_reason", "intent", "overhead_s"}}
         <base>/result        {"id", "command", "ok": true, ...}: say -> "spoken",
                               mute -> "muted", cancel -> "cancelled", reload -> "reloaded"
         <base>/error         {"code", "message", "topic", "id", "bytes"?: payload size}
         <base>/state         idle | listening | thinking | speaking     (retained)
         <base>/muted         ON | OFF                                   (retained)
         <base>/transcript    {"text", "seconds", "likelihood"}
         <base>/metrics       LatencySummary.to_dict(): mean_s, p95_s, std_s, spikes,
                              cache_hit_rate, ...                      (retained)
         <base>/availability  online | offline  (retained; offline is the last will)
         <base>/room/<name>/state         idle | listening | thinking | speaking  (retained)
         <base>/room/<name>/availability  online | offline: its satellite is connected
                                          or not (retained)
         <base>/room/<name>/transcript    {"text", "seconds"}
         <base>/room/<name>/reply         {"text", "cancelled", "actions", "latency"}
         (a room is a satellite Jarvis drives, JARVIS_SATELLITES; its turns also appear
         on <base>/transcript and <base>/reply with "source": "satellite", "room")
         hermes/tts/sayFinished   {"id", "siteId", "sessionId"}
         hermes/asr/textCaptured  {"text", "likelihood", "seconds", "siteId",
                                   "sessionId": null, "wakewordId": null}

Every command is answered exactly once, whatever its bytes: an ask on ``<base>/reply``,
the others on ``<base>/result`` (Hermes: ``sayFinished``), or any of them on
``<base>/error`` with its ``id``. Error codes: ``too_large`` (over 64 KiB),
``invalid_utf8``, ``invalid_json``, ``invalid_payload`` (not an object, a missing field,
a wrong type or range, a string holding a lone surrogate such as ``"\\ud800"``, nesting
deeper than 32 levels), ``unknown_command``, ``retained_command`` (retained commands are
never executed: they would run again on every reconnect), ``expired`` (``sent_at``
older than ``JARVIS_MQTT_MAX_AGE_S``), ``busy`` (too many asks waiting), ``ask_failed``
(the model failed), ``say_failed``/``mute_failed``/``reload_failed``,
``internal_error``. Unknown extra fields are ignored. An ask whose ``id`` is already
being answered (a QoS 1 redelivery) is answered once, for both.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jarvis.errors import JarvisError
from jarvis.voice.turn import RequestError, validate_request

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_ID_CHARS = 200
MAX_ASK_TOKENS = 4096
MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a payload may have (the schema is flat)."""
_SURROGATE = re.compile("[\ud800-\udfff]")
STATES = ("idle", "listening", "thinking", "speaking")

HERMES_SAY = "hermes/tts/say"
HERMES_SAY_FINISHED = "hermes/tts/sayFinished"
HERMES_TEXT_CAPTURED = "hermes/asr/textCaptured"

CorrelationId = str | int | None


class MqttError(JarvisError):
    """Base of the MQTT errors (see :mod:`jarvis.home.bridge` for the tree)."""


class MqttConfigError(MqttError):
    """MQTT settings missing or unusable, e.g. hub mode without ``JARVIS_MQTT_HOST``."""


class MqttConnectionError(MqttError):
    """The broker could not be reached, or the connection was lost."""


class MqttAuthError(MqttConnectionError):
    """The broker refused the credentials or the client id."""


class PayloadError(MqttError):
    """A command payload that breaks the schema; published on ``<base>/error``, never
    raised out of the bridge."""

    def __init__(self, code: str, message: str, correlation_id: CorrelationId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.correlation_id = correlation_id


@dataclass(frozen=True)
class Topics:
    base: str
    discovery_prefix: str = ""

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/+"

    @property
    def cmd_prefix(self) -> str:
        return f"{self.base}/cmd/"

    @property
    def reply(self) -> str:
        return f"{self.base}/reply"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def error(self) -> str:
        return f"{self.base}/error"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def muted(self) -> str:
        return f"{self.base}/muted"

    @property
    def transcript(self) -> str:
        return f"{self.base}/transcript"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    def room(self, name: str, leaf: str) -> str:
        """A room's topic: ``<base>/room/<name>/<leaf>`` (state, transcript, reply,
        availability)."""
        return f"{self.base}/room/{name}/{leaf}"

    @property
    def ha_status(self) -> str | None:
        return f"{self.discovery_prefix}/status" if self.discovery_prefix else None


@dataclass(frozen=True)
class AskCommand:
    text: str
    id: CorrelationId = None
    conversation_id: str | None = None
    speak: bool | None = None
    max_tokens: int | None = None
    sent_at: float | None = None


@dataclass(frozen=True)
class SayCommand:
    text: str
    id: CorrelationId = None
    sent_at: float | None = None


@dataclass(frozen=True)
class MuteCommand:
    mute: bool
    id: CorrelationId = None
    sent_at: float | None = None


@dataclass(frozen=True)
class CancelCommand:
    id: CorrelationId = None
    target: CorrelationId = None
    sent_at: float | None = None


@dataclass(frozen=True)
class ReloadCommand:
    id: CorrelationId = None
    sent_at: float | None = None


@dataclass(frozen=True)
class MetricsCommand:
    id: CorrelationId = None
    sent_at: float | None = None


@dataclass(frozen=True)
class HermesSay:
    text: str
    id: CorrelationId = None
    site_id: str | None = None
    session_id: CorrelationId = None


Command = (AskCommand | SayCommand | MuteCommand | CancelCommand | ReloadCommand
           | MetricsCommand | HermesSay)
_EMPTY_OK = {"cancel", "reload", "metrics"}


def decode_object(payload: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """Payload bytes -> JSON object, or a PayloadError saying what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError("too_large", f"payload of {len(payload)} bytes is over the "
                           f"{MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("invalid_utf8", f"payload is not UTF-8 text ({exc.reason} at "
                           f"byte {exc.start})") from None
    if empty_ok and not text.strip():
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PayloadError("invalid_json", f"payload is not JSON ({_short(exc)})") from None
    if not isinstance(data, dict):
        raise PayloadError("invalid_payload",
                           f"payload must be a JSON object, got {type(data).__name__}")
    return data


def scan(data: dict[str, Any]) -> str | None:
    """What makes a decoded payload unusable, or None: nesting deeper than
    :data:`MAX_DEPTH`, or a string (a key or a value, at any depth) holding a lone
    surrogate such as ``"\\ud800"``: JSON lets it through, but it is not Unicode text
    and could not be written back out."""
    stack: list[tuple[Any, int, str]] = [(v, 1, k) for k, v in data.items()]
    for key in data:
        if _SURROGATE.search(key):
            return "a field name holds a lone surrogate (\\ud800-\\udfff): not Unicode text"
    while stack:
        value, depth, field = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return (f"{_field(field)} holds a lone surrogate (\\ud800-\\udfff): not "
                        "Unicode text")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                return f"the payload nests deeper than {MAX_DEPTH} levels"
            if isinstance(value, dict):
                for key, item in value.items():
                    if _SURROGATE.search(key):
                        return (f"{_field(field)} has a field name holding a lone surrogate "
                                "(\\ud800-\\udfff): not Unicode text")
                    stack.append((item, depth + 1, field))
            else:
                stack.extend((item, depth + 1, field) for item in value)
    return None


def _field(name: str) -> str:
    return repr(name) if len(name) <= 40 else repr(name[:40] + "...")


def parse_command(topic: str, payload: bytes, topics: Topics, *, retain: bool = False,
                  site: str = "default") -> Command | None:
    """The command in one message; None for messages meant for someone else (a Hermes
    ``say`` for another site). Raises :class:`PayloadError`; a retained
    command (the flag as the broker delivered it) is refused, whatever it holds."""
    if topic == HERMES_SAY:
        data = decode_object(payload)
        problem = scan(data)
        if problem is not None:
            raise PayloadError("invalid_payload", problem)
        site_id = _opt(data, "siteId", str, None, max_len=MAX_ID_CHARS)
        if site_id is not None and site_id != site:
            return None
        cid = _id(data, "id", None)
        if retain:
            raise _retained(topic, cid)
        return HermesSay(_text(data, cid), cid, site_id, _id(data, "sessionId", cid))
    if not topic.startswith(topics.cmd_prefix):
        raise PayloadError("unknown_command", f"no command on topic {topic[:200]!r}")
    name = topic[len(topics.cmd_prefix):]
    if name not in ("ask", "say", "mute", "cancel", "reload", "metrics"):
        raise PayloadError("unknown_command", f"unknown command {name[:100]!r}; expected ask, "
                           "say, mute, cancel, reload or metrics")
    data = decode_object(payload, empty_ok=name in _EMPTY_OK)
    cid = _id(data, "id", None)
    problem = scan(data)
    if problem is not None:
        raise PayloadError("invalid_payload", problem, cid)
    if retain:
        raise _retained(topic, cid)
    sent_at = _sent_at(data, cid)
    if name == "ask":
        return AskCommand(
            _text(data, cid), cid,
            _opt(data, "conversation_id", str, cid, max_len=MAX_ID_CHARS),
            _opt(data, "speak", bool, cid),
            _opt_int(data, "max_tokens", 1, MAX_ASK_TOKENS, cid),
            sent_at,
        )
    if name == "say":
        return SayCommand(_text(data, cid), cid, sent_at)
    if name == "mute":
        mute = _opt(data, "mute", bool, cid)
        if mute is None:
            raise PayloadError("invalid_payload", "'mute' (true or false) is required", cid)
        return MuteCommand(mute, cid, sent_at)
    if name == "cancel":
        return CancelCommand(cid, _id(data, "target", cid), sent_at)
    if name == "reload":
        return ReloadCommand(cid, sent_at)
    return MetricsCommand(cid, sent_at)


def _retained(topic: str, cid: CorrelationId) -> PayloadError:
    return PayloadError(
        "retained_command",
        "retained commands are never executed (they would run again on every reconnect): "
        "publish commands without the retain flag, and clear this one by publishing an "
        f"empty retained message to its topic, e.g. mosquitto_pub -t '{topic[:200]}' -r -n",
        cid)


def _sent_at(data: dict[str, Any], cid: CorrelationId) -> float | None:
    """``sent_at`` as seconds since 1970 (UTC): a number of seconds, or an ISO 8601 time
    with its zone (``2024-05-01T18:30:00+02:00``, ``...Z``)."""
    value = data.get("sent_at")
    if value is None:
        return None
    usage = ("'sent_at' must be seconds since 1970 (UTC) or an ISO 8601 time with its "
             "zone, e.g. 2024-05-01T18:30:00+02:00")
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise PayloadError("invalid_payload", usage, cid) from None
        if when.tzinfo is None:
            raise PayloadError("invalid_payload", usage + " (it has no zone)", cid)
        return when.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not 0 <= value < 1e11:
        raise PayloadError("invalid_payload", usage + (
            " (milliseconds?)" if isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 1e11 else ""), cid)
    return float(value)


def _text(data: dict[str, Any], cid: CorrelationId) -> str:
    text = data.get("text")
    if not isinstance(text, str):
        raise PayloadError("invalid_payload", "'text' must be a string", cid)
    try:
        return validate_request(text)  # the same words as every other entry point
    except RequestError as exc:
        raise PayloadError(exc.code, str(exc), cid) from None


def _id(data: dict[str, Any], key: str, cid: CorrelationId) -> CorrelationId:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PayloadError("invalid_payload", f"{key!r} must be a string or an integer", cid)
    if isinstance(value, str) and len(value) > MAX_ID_CHARS:
        raise PayloadError("invalid_payload", f"{key!r} is longer than {MAX_ID_CHARS} "
                           "characters", None)
    if isinstance(value, str) and _SURROGATE.search(value):
        raise PayloadError("invalid_payload", f"{key!r} holds a lone surrogate "
                           "(\\ud800-\\udfff): not Unicode text", None)
    if isinstance(value, int) and abs(value) >= 2**63:
        raise PayloadError("invalid_payload", f"{key!r} is out of range", None)
    return value


def _opt(data: dict[str, Any], key: str, kind: type[Any], cid: CorrelationId,
         max_len: int | None = None) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise PayloadError("invalid_payload", f"{key!r} must be a {kind.__name__}", cid)
    if max_len is not None and isinstance(value, str) and not 0 < len(value) <= max_len:
        raise PayloadError("invalid_payload", f"{key!r} must have 1-{max_len} characters", cid)
    return value


def _opt_int(data: dict[str, Any], key: str, low: int, high: int,
             cid: CorrelationId) -> int | None:
    value = _opt(data, key, int, cid)
    if value is not None and not low <= value <= high:
        raise PayloadError("invalid_payload", f"{key!r} must be from {low} to {high}", cid)
    return value  # type: ignore[no-any-return]


def _short(exc: BaseException) -> str:
    return str(exc)[:120] or type(exc).__name__


def dumps(payload: Any) -> bytes:
    """Compact JSON bytes for publishing (NaN and infinities become null). Never fails
    on text: a string that is not Unicode (a lone surrogate) is written escaped."""
    data = _finite(payload)
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False, default=str).encode("ascii")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
