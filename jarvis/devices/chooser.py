"""The LLM fallback for device commands, constrained by a GBNF grammar so the model can
only answer ``<device id> <action>`` for a pair that exists in the device map, or
``none``. The answer is parsed back through :meth:`DeviceMap.command`, so even a
backend that ignored the grammar could not make Jarvis execute anything else.

The grammar reaches the model as GBNF text in ``GenerationOptions.grammar``, which every
backend takes (the in-process engine compiles it; a llama.cpp server gets it as its
``grammar`` field), with the same choice as a JSON schema beside it for servers that
constrain by JSON schema instead (vLLM, Ollama): ``{"command": "<device id> <action>"}``.
Either way the choice is one more request in the backend's queue and reuses its cache.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from jarvis.devices.device_map import Device, DeviceCommand, DeviceMap
from jarvis.llm.base import ChatMessage, GenerationOptions, LLMBackend

log = logging.getLogger(__name__)

NONE = "none"


def _literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def action_grammar(devices: DeviceMap, only: Iterable[Device] | None = None) -> str:
    """GBNF for ``<device id> <action>`` over the map's pairs (of the devices in
    ``only``, when given), or ``none``."""
    allowed = None if only is None else {d.id for d in only}
    alternatives = []
    for device in devices.devices:
        actions = [a.name for a in device.actions.values() if a.llm]
        if actions and (allowed is None or device.id in allowed):
            alternatives.append(
                f"{_literal(device.id + ' ')} ({' | '.join(_literal(a) for a in actions)})")
    return "root ::= " + " | ".join([*alternatives, _literal(NONE)]) + "\n"


def action_choices(devices: DeviceMap, only: Iterable[Device] | None = None) -> list[str]:
    """Every answer :func:`action_grammar` allows, as strings."""
    allowed = None if only is None else {d.id for d in only}
    return [f"{d.id} {a.name}" for d in devices.devices
            if allowed is None or d.id in allowed
            for a in d.actions.values() if a.llm] + [NONE]


def action_schema(choices: Sequence[str]) -> dict[str, Any]:
    """The choice as a JSON schema: ``{"command": one of choices}``."""
    return {"type": "object", "properties": {"command": {"type": "string",
                                                         "enum": list(choices)}},
            "required": ["command"], "additionalProperties": False}


def chooser_messages(devices: DeviceMap, text: str) -> list[ChatMessage]:
    """The prompt: the device list (stable, so the context cache reuses it) and the request."""
    choices = [(d, [a.name for a in d.actions.values() if a.llm]) for d in devices.devices]
    choices = [(d, actions) for d, actions in choices if actions]
    lines = [
        f"- {d.id}: the {d.name}" + (f" in the {d.room}" if d.room else "")
        + f"; actions: {', '.join(actions)}"
        for d, actions in choices
    ]
    sample = f"{choices[0][0].id} {choices[0][1][0]}" if choices else NONE
    system = (
        "You turn a spoken request into one smart-home command.\nDevices:\n"
        + "\n".join(lines)
        + f"\nAnswer with a device id and one of its actions, for example: {sample}\n"
        f"Answer {NONE} when the request is not for one of these devices."
    )
    return [ChatMessage("system", system), ChatMessage("user", text.strip())]


def parse_choice(text: str, devices: DeviceMap) -> DeviceCommand | None:
    """The command the model named, or None for ``none`` or anything not in the map.
    A JSON answer (``{"command": "..."}``, from a JSON-schema constrained server) is
    unwrapped first."""
    text = _unwrap_json(text)
    parts = text.strip().split()
    if len(parts) != 2:
        if parts != [NONE]:
            log.warning("action fallback: unusable answer %r ignored", text[:80])
        return None
    command = devices.command(parts[0], parts[1], source="llm")
    if command is None or not command.action.llm:
        log.warning("action fallback: %r is not in the device map (for the LLM); ignored",
                    text[:80])
        return None
    return command


def _unwrap_json(text: str) -> str:
    stripped = text.strip()
    if not stripped.startswith("{"):
        return text
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return text
    command = value.get("command") if isinstance(value, dict) else None
    return command if isinstance(command, str) else text


class ActionChooser:
    """Ask the LLM which (device, action) a request means."""

    def __init__(self, backend: LLMBackend, devices: DeviceMap, *, max_tokens: int = 24,
                 temperature: float = 0.0) -> None:
        self.backend = backend
        self.devices = devices
        self.max_tokens = max_tokens
        self.temperature = temperature

    @property
    def available(self) -> bool:
        return any(a.llm for d in self.devices.devices for a in d.actions.values())

    async def choose(self, text: str, candidates: Sequence[Device] | None = None, *,
                     cancel: threading.Event | None = None) -> DeviceCommand | None:
        """The command ``text`` asks for, among ``candidates`` (default: every device);
        None for none, or when ``cancel`` was set."""
        if not self.available or (candidates is not None and not candidates):
            return None
        cancel = cancel or threading.Event()
        grammar = action_grammar(self.devices, candidates)
        schema = action_schema(action_choices(self.devices, candidates))
        answer = await self.generate(chooser_messages(self.devices, text), grammar, cancel,
                                     schema=schema)
        if cancel.is_set():
            return None
        return parse_choice(answer, self.devices)

    async def generate(self, messages: Sequence[ChatMessage], grammar: str,
                       cancel: threading.Event | None = None, *,
                       schema: dict[str, Any] | None = None) -> str:
        """Raw text for ``messages`` under the GBNF ``grammar`` (or, on a server that
        takes JSON schemas instead, ``schema``)."""
        options = GenerationOptions(max_tokens=self.max_tokens, temperature=self.temperature,
                                    grammar=grammar, json_schema=schema)
        stream = self.backend.stream_chat(messages, options)
        pieces: list[str] = []
        async for piece in stream:
            pieces.append(piece)
            if cancel is not None and cancel.is_set():
                stream.cancel()
        return "".join(pieces)

