"""Device requests answered without the chat model: the local intent matcher first
(well under a millisecond), then, for words that look like a command the matcher could
not settle, the grammar-constrained LLM fallback, which can only name a (device,
action) pair from the map. Nothing outside the device map is ever produced.

:meth:`DeviceHandler.handle` only decides; whoever owns the turn sends the commands
(once the turn is committed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from jarvis.devices.chooser import ActionChooser
from jarvis.devices.device_map import DeviceCommand, DeviceMap, load_device_map
from jarvis.devices.intents import Ambiguous, IntentMatcher, Matched
from jarvis.errors import JarvisError
from jarvis.llm.base import LLMBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceAnswer:
    """A request settled by the device map."""

    reply: str
    commands: tuple[DeviceCommand, ...] = ()
    intent: str = "local"
    """local (matcher), ambiguous (a question back), llm (grammar fallback)."""
    seconds: float = 0.0
    model_s: float = 0.0
    """Time spent in the model (the grammar fallback)."""


class DeviceHandler:
    """The device map, its matcher and its LLM fallback; :meth:`reload` swaps the map."""

    def __init__(self, backend: LLMBackend | None, devices: DeviceMap | None = None, *,
                 room: str = "", devices_file: Path | None = None) -> None:
        self.backend = backend
        self.room = room
        self.devices_file = devices_file
        self.set_devices(devices or DeviceMap())

    def set_devices(self, devices: DeviceMap) -> None:
        self.devices = devices
        self.matcher = IntentMatcher(devices, self.room)
        self.chooser = ActionChooser(self.backend, devices) if self.backend is not None else None

    def __len__(self) -> int:
        return len(self.devices)

    async def reload(self) -> bool:
        """Re-read the device map file; a broken file raises and keeps the old map."""
        import asyncio

        if self.devices_file is None:
            return False
        self.set_devices(await asyncio.to_thread(load_device_map, self.devices_file))
        log.info("device map reloaded: %d devices", len(self.devices))
        return True

    async def handle(self, text: str) -> DeviceAnswer | None:
        """The device map's answer to ``text``, or None to let the chat model answer."""
        t0 = time.perf_counter()
        result = self.matcher.match(text)
        if isinstance(result, Matched):
            return DeviceAnswer(result.reply, result.commands, "local",
                                time.perf_counter() - t0)
        if isinstance(result, Ambiguous):
            return DeviceAnswer(result.question, (), "ambiguous", time.perf_counter() - t0)
        chooser = self.chooser
        if not (result.looks_like_command and chooser is not None and chooser.available):
            return None
        candidates = self.matcher.candidates(text)
        if not candidates:
            return None
        t_model = time.perf_counter()
        try:
            command = await chooser.choose(text, candidates)
        except JarvisError as exc:
            log.warning("action fallback failed (%s); answering as conversation", exc)
            return None
        if command is None:
            return None
        now = time.perf_counter()
        return DeviceAnswer(command.reply, (command,), "llm", now - t0, now - t_model)
