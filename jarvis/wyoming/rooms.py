"""Every room of the house: one :class:`~jarvis.wyoming.room.RoomLink` per satellite in
``JARVIS_SATELLITES``, plus the satellites zeroconf finds when
``JARVIS_SATELLITE_DISCOVERY=true``, each run as its own task beside the others.

:func:`satellite_service` is what the entry points run beside their other services
(``jarvis run``, ``jarvis hub``, ``jarvis wyoming``): rooms share the loaded engines and
the one responder; what one room does never stops another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

from wyoming.info import Describe

from jarvis.config import ROOM_NAME, Settings
from jarvis.errors import ConfigError, JarvisError
from jarvis.voice.assembly import Assistant
from jarvis.wyoming.protocol import encode_event, read_event
from jarvis.wyoming.room import RoomLink
from jarvis.wyoming.zeroconf import SERVICE_TYPE

log = logging.getLogger(__name__)


class Rooms:
    """The rooms being driven, by name."""

    def __init__(self, assistant: Assistant, settings: Settings) -> None:
        self.assistant = assistant
        self.settings = settings
        self.links: dict[str, RoomLink] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._browser: Any = None
        self._zeroconf: Any = None

    def add(self, name: str, uri: str) -> RoomLink:
        """Drive the satellite at ``uri`` as room ``name`` from now on."""
        if name in self.links:
            raise ConfigError(f"room {name!r} is already driven ({self.links[name].uri})")
        link = RoomLink(name, uri, self.assistant, self.settings)
        self.links[name] = link
        self._tasks[name] = asyncio.create_task(link.run(), name=f"room-{name}")
        return link

    async def start(self) -> None:
        for name, uri in self.settings.satellites.satellites:
            self.add(name, uri)
        if self.settings.satellites.discovery:
            await self._browse()
        log.info("driving %d satellite room(s)%s: %s", len(self.links),
                 " and looking for more on the network" if self._browser else "",
                 ", ".join(f"{n} ({link.uri})" for n, link in self.links.items()) or "-")

    async def stop(self) -> None:
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf.async_close()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # ------------------------------------------------------------------ zeroconf

    async def _browse(self) -> None:
        try:
            from zeroconf import ServiceStateChange
            from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
        except ImportError:
            log.warning("JARVIS_SATELLITE_DISCOVERY: zeroconf is not installed (pip "
                        "install 'wyoming[zeroconf]'); only JARVIS_SATELLITES are driven")
            return
        try:
            zc = AsyncZeroconf()
        except OSError as exc:
            log.warning("JARVIS_SATELLITE_DISCOVERY: cannot use mDNS here (%s); only "
                        "JARVIS_SATELLITES are driven", exc)
            return

        async def found(name: str) -> None:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zc.zeroconf, 3000):
                return
            addresses = info.parsed_addresses()
            if not addresses or not info.port:
                return
            host = addresses[0]
            uri = f"tcp://{'[' + host + ']' if ':' in host else host}:{info.port}"
            if any(link.uri == uri for link in self.links.values()):
                return
            room = self._room_name(name.removesuffix("." + SERVICE_TYPE))
            if not await _is_satellite(uri):
                log.debug("zeroconf: %s at %s is not a satellite", name, uri)
                return
            log.info("zeroconf: found satellite %r at %s: room %s", name, uri, room)
            self.add(room, uri)

        def changed(zeroconf: Any, service_type: str, name: str,
                    state_change: Any) -> None:
            if state_change is ServiceStateChange.Added:
                asyncio.get_running_loop().create_task(found(name))

        self._zeroconf = zc
        self._browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[changed])

    def _room_name(self, service_name: str) -> str:
        """A free room name for a discovered satellite (lowercase, topic-safe)."""
        base = re.sub(r"[^a-z0-9_-]+", "-", service_name.lower()).strip("-_")[:28] or "room"
        name, n = base, 2
        while name in self.links or not ROOM_NAME.fullmatch(name):
            name, n = f"{base}-{n}", n + 1
        return name


async def _is_satellite(uri: str) -> bool:
    """Whether the Wyoming service at ``uri`` describes itself as a satellite (Jarvis's
    own Wyoming server and plain asr/tts services are not)."""
    parts = urlsplit(uri)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port), 3.0)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(encode_event(Describe().event()))
        await writer.drain()
        for _ in range(20):
            event = await asyncio.wait_for(read_event(reader), 3.0)
            if event is None:
                return False
            if event.type == "info":
                return isinstance(event.data.get("satellite"), dict)
        return False
    except (OSError, asyncio.TimeoutError, JarvisError):  # ProtocolError: not Wyoming
        return False
    finally:
        writer.close()


def satellite_service(settings: Settings
                      ) -> Callable[[Assistant], AbstractAsyncContextManager[Rooms]]:
    """The satellites as a service of a running assistant: ``async with
    satellite_service(settings)(assistant):`` drives them for the block."""

    @contextlib.asynccontextmanager
    async def serve(assistant: Assistant) -> AsyncIterator[Rooms]:
        rooms = Rooms(assistant, settings)
        await rooms.start()
        try:
            yield rooms
        finally:
            await rooms.stop()

    return serve
