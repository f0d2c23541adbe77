"""The home-automation device map: which devices Jarvis may switch, and exactly which
MQTT message each action sends. Nothing outside this map is ever published to a
device: a :class:`DeviceCommand` can only be obtained from a :class:`DeviceMap`.

The map is a TOML file (``JARVIS_DEVICES_FILE``; see ``config/devices.example.toml``)::

    [[device]]
    id = "kitchen_light"                  # a-z, 0-9, _ ; how the LLM fallback names it
    name = "kitchen light"                # what people call it
    aliases = ["kitchen lights", "ceiling light in the kitchen"]
    room = "kitchen"                      # optional; "kitchen <name>" is understood too
    topic = "zigbee2mqtt/kitchen_light/set"
    [device.actions]
    on = '{"state": "ON"}'                # a string is sent as it is
    off = { payload = { state = "OFF" } } # a table payload is sent as compact JSON
    # full form: { payload = ..., topic = "...", retain = false, llm = true,
    #              phrases = ["make it bright"], reply = "The {name} is on." }
    # llm = false: only an explicit, locally matched request can trigger the action,
    # never the LLM fallback (locks, garage doors).

Errors: :class:`DeviceMapError` (a :class:`~jarvis.errors.ConfigError`) names the file,
the device and what is wrong.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

from jarvis.errors import ConfigError

MAX_PAYLOAD_BYTES = 64 * 1024
_SLUG = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
_WORD = re.compile(r"[^\W_]+")
_DEVICE_KEYS = {"id", "name", "aliases", "room", "topic", "actions"}
_ACTION_KEYS = {"payload", "topic", "retain", "phrases", "reply", "llm"}

DEFAULT_REPLIES = {
    "on": "Turning on the {name}.",
    "off": "Turning off the {name}.",
    "toggle": "Toggling the {name}.",
    "open": "Opening the {name}.",
    "close": "Closing the {name}.",
    "stop": "Stopping the {name}.",
    "start": "Starting the {name}.",
    "lock": "Locking the {name}.",
    "unlock": "Unlocking the {name}.",
}


class DeviceMapError(ConfigError):
    """The device map file is missing, not TOML, or breaks a rule of the format."""


def words(text: str) -> tuple[str, ...]:
    """Lower-case words of ``text``, apostrophes dropped ("don't" -> "dont")."""
    return tuple(_WORD.findall(text.lower().replace("'", "").replace("\u2019", "")))


@dataclass(frozen=True)
class DeviceAction:
    """One thing a device can do and the exact message that does it."""

    name: str
    topic: str
    payload: bytes
    retain: bool = False
    phrases: tuple[str, ...] = ()
    """Extra phrases that select this action for this device."""
    reply: str = ""
    """What Jarvis answers; ``{name}`` is the device name."""
    llm: bool = True
    """False: only an explicit request matched locally may trigger it, never the LLM
    fallback (for locks, garage doors, anything where a wrong guess matters)."""


@dataclass(frozen=True, eq=False)
class Device:
    """A switchable thing; compared and hashed by identity."""

    id: str
    name: str
    aliases: tuple[str, ...]
    room: str
    actions: Mapping[str, DeviceAction]
    label: str = ""
    """How replies name it: the name, with the room in front when another device of the
    map has the same name ("bedroom ceiling light")."""

    def forms(self) -> set[tuple[str, ...]]:
        """Every word sequence that names this device: name and aliases, with simple
        plurals, and with the room in front ("kitchen light") or behind ("light in
        kitchen")."""
        room = words(self.room)
        result: set[tuple[str, ...]] = set()
        for base in (self.name, *self.aliases):
            toks = words(base)
            variants = {toks}
            if toks and not toks[-1].endswith("s"):
                variants.add((*toks[:-1], toks[-1] + "s"))
            for v in variants:
                result.add(v)
                bare = _remove(v, room) if room else v
                if room and bare:
                    result.add(room + bare)
                    result.add((*bare, "in", *room))
        return result


@dataclass(frozen=True)
class DeviceCommand:
    """A device action chosen for a request; build it with :meth:`DeviceMap.command`."""

    device: Device
    action: DeviceAction
    source: str = "local"
    """``local`` (the intent matcher) or ``llm`` (the grammar-constrained fallback)."""

    @property
    def reply(self) -> str:
        template = self.action.reply or DEFAULT_REPLIES.get(
            self.action.name, "Done: {name}, " + self.action.name.replace("_", " ") + "."
        )
        return template.replace("{name}", self.device.label or self.device.name)

    def describe(self) -> dict[str, Any]:
        return {"device": self.device.id, "action": self.action.name,
                "topic": self.action.topic, "source": self.source}


@dataclass(frozen=True)
class DeviceMap:
    devices: tuple[Device, ...] = ()
    source: Path | None = None
    _by_id: dict[str, Device] = field(default_factory=dict, init=False, repr=False,
                                      compare=False)

    def __post_init__(self) -> None:
        self._by_id.update({d.id: d for d in self.devices})

    def get(self, device_id: str) -> Device | None:
        return self._by_id.get(device_id)

    def command(self, device_id: str, action: str, source: str = "local") -> DeviceCommand | None:
        """The command for ``device_id``/``action``, or None when the map has no such pair."""
        device = self._by_id.get(device_id)
        if device is None or action not in device.actions:
            return None
        return DeviceCommand(device, device.actions[action], source)

    def rooms(self) -> set[tuple[str, ...]]:
        return {words(d.room) for d in self.devices if d.room}

    def __len__(self) -> int:
        return len(self.devices)


def _remove(seq: tuple[str, ...], sub: tuple[str, ...]) -> tuple[str, ...]:
    """``seq`` without its first occurrence of ``sub``."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return seq[:i] + seq[i + n :]
    return seq


def load_device_map(path: Path) -> DeviceMap:
    """Read and validate a device map file (blocking; call it in a thread from async code)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeviceMapError(f"device map {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceMapError(f"device map {path}: cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeviceMapError(f"device map {path}: not valid TOML ({exc})") from None
    return parse_device_map(data, path)


def parse_device_map(data: Mapping[str, Any], source: Path | None = None) -> DeviceMap:
    """Validate already-parsed TOML; every rule broken raises :class:`DeviceMapError`."""
    where = f"device map {source}" if source else "device map"
    unknown = set(data) - {"device"}
    if unknown:
        raise DeviceMapError(f"{where}: unknown top-level key(s) {sorted(unknown)}; "
                             "devices go in [[device]] tables")
    raw = data.get("device", [])
    if not isinstance(raw, list):
        raise DeviceMapError(f"{where}: 'device' must be an array of tables ([[device]])")
    devices: list[Device] = []
    seen: set[str] = set()
    for index, item in enumerate(raw, 1):
        device = _parse_device(item, f"{where}: device #{index}")
        if device.id in seen:
            raise DeviceMapError(f"{where}: device #{index}: id {device.id!r} is used twice")
        seen.add(device.id)
        devices.append(device)
    names = Counter(words(d.name) for d in devices)
    devices = [
        replace(d, label=f"{d.room} {d.name}" if names[words(d.name)] > 1 and d.room else d.name)
        for d in devices
    ]
    return DeviceMap(tuple(devices), source)


def _parse_device(item: Any, where: str) -> Device:
    if not isinstance(item, dict):
        raise DeviceMapError(f"{where}: must be a table")
    unknown = set(item) - _DEVICE_KEYS
    if unknown:
        raise DeviceMapError(f"{where}: unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(_DEVICE_KEYS)}")
    device_id = item.get("id")
    if not isinstance(device_id, str) or not _SLUG.fullmatch(device_id):
        raise DeviceMapError(f"{where}: 'id' must be 1-64 of a-z, 0-9 and _ "
                             f"(starting with a letter or digit), got {device_id!r}")
    where = f"{where} ({device_id})"
    name = _text(item.get("name", device_id.replace("_", " ")), "name", where)
    aliases = tuple(_text(a, "aliases[]", where) for a in _list(item, "aliases", where))
    room = item.get("room", "")
    if not isinstance(room, str):
        raise DeviceMapError(f"{where}: 'room' must be a string")
    topic = item.get("topic")
    if topic is not None:
        _check_topic(topic, "topic", where)
    actions_raw = item.get("actions")
    if not isinstance(actions_raw, dict) or not actions_raw:
        raise DeviceMapError(f"{where}: needs an [device.actions] table with at least one action")
    actions = {name_: _parse_action(name_, value, topic, f"{where} action {name_!r}")
               for name_, value in actions_raw.items()}
    return Device(device_id, name.strip(), aliases, room.strip(), actions)


def _parse_action(name: str, value: Any, device_topic: str | None, where: str) -> DeviceAction:
    if not _SLUG.fullmatch(name):
        raise DeviceMapError(f"{where}: action names must be a-z, 0-9 and _")
    spec: dict[str, Any] = {"payload": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or "payload" not in spec:
        raise DeviceMapError(f"{where}: give a payload string, or a table with 'payload'")
    unknown = set(spec) - _ACTION_KEYS
    if unknown:
        raise DeviceMapError(f"{where}: unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(_ACTION_KEYS)}")
    payload = spec["payload"]
    if isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, dict):
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                          default=str).encode("utf-8")
    else:
        raise DeviceMapError(f"{where}: 'payload' must be a string or a table")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise DeviceMapError(f"{where}: payload is larger than {MAX_PAYLOAD_BYTES} bytes")
    topic = spec.get("topic", device_topic)
    if topic is None:
        raise DeviceMapError(f"{where}: no topic (set 'topic' on the device or the action)")
    _check_topic(topic, "topic", where)
    retain = spec.get("retain", False)
    if not isinstance(retain, bool):
        raise DeviceMapError(f"{where}: 'retain' must be true or false")
    phrases = tuple(_text(p, "phrases[]", where) for p in _list(spec, "phrases", where))
    reply = spec.get("reply", "")
    if not isinstance(reply, str):
        raise DeviceMapError(f"{where}: 'reply' must be a string")
    llm = spec.get("llm", True)
    if not isinstance(llm, bool):
        raise DeviceMapError(f"{where}: 'llm' must be true or false")
    return DeviceAction(name, topic, data, retain, phrases, reply.strip(), llm)


def _list(spec: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = spec.get(key, [])
    if not isinstance(value, list):
        raise DeviceMapError(f"{where}: {key!r} must be a list of strings")
    return value


def _text(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not words(value):
        raise DeviceMapError(f"{where}: {key!r} must be a string with at least one word, "
                             f"got {value!r}")
    return value


def _check_topic(topic: Any, key: str, where: str) -> None:
    if (
        not isinstance(topic, str)
        or not topic
        or "+" in topic
        or "#" in topic
        or "\0" in topic
        or len(topic.encode("utf-8")) > 65535
    ):
        raise DeviceMapError(f"{where}: {key!r} must be an MQTT topic without wildcards "
                             f"(+ or #), got {topic!r}")
