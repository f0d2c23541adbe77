"""The Wyoming server: one listening socket (``tcp://`` or ``unix://``), one
:class:`~jarvis.wyoming.handler.Connection` per client, each served on its own task,
all sharing the loaded engines and the one responder. Optionally advertised over
zeroconf.

:func:`start_wyoming` is what every entry point calls with its assistant (``jarvis
wyoming``, ``jarvis run`` and ``jarvis hub`` with ``JARVIS_WYOMING_URI``); device
commands of handled turns go through the responder's actuator, i.e. the MQTT bridge
when the entry point runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wyoming.error import Error

from jarvis.config import Settings, WyomingSettings, parse_wyoming_uri
from jarvis.errors import ConfigError
from jarvis.voice.assembly import Assistant
from jarvis.wyoming.handler import Connection, Services
from jarvis.wyoming.info import build_info
from jarvis.wyoming.protocol import MAX_LINE_BYTES, encode_event
from jarvis.wyoming.sockets import ListenError, peer_name, remove_stale_socket
from jarvis.wyoming.zeroconf import Advertiser, advertise

log = logging.getLogger(__name__)


class WyomingServer:
    """Serves Wyoming clients until :meth:`stop` (or the ``async with`` block ends)."""

    def __init__(self, settings: WyomingSettings, services: Services, *,
                 name: str = "jarvis") -> None:
        self.settings = settings
        self.services = services
        self.name = name
        self.uri = settings.uri
        self.port = 0
        """The TCP port listened on (the real one when the URI asked for port 0)."""
        self.served = 0
        """Connections accepted so far."""
        self.refused = 0
        """Connections refused for being over ``max_connections``."""
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._advertiser: Advertiser | None = None
        self._stopping = False

    @property
    def connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def start(self) -> None:
        """Listen (and advertise); ListenError if the address cannot be used."""
        parts = urlsplit(self.uri)
        try:
            if parts.scheme == "tcp":
                host = parts.hostname or "0.0.0.0"
                self._server = await asyncio.start_server(
                    self._serve, host, parts.port, limit=MAX_LINE_BYTES, reuse_address=True)
                self.port = int(self._server.sockets[0].getsockname()[1])
            elif parts.scheme == "unix":
                path = Path(self.uri[len("unix://"):])
                remove_stale_socket(path, self.uri)
                self._server = await asyncio.start_unix_server(self._serve, str(path),
                                                               limit=MAX_LINE_BYTES)
            else:
                raise ListenError(f"cannot serve Wyoming on {self.uri!r}: expected "
                                         "tcp://HOST:PORT or unix:///path")
        except OSError as exc:
            raise ListenError(f"cannot serve Wyoming on {self.uri}: "
                                     f"{exc.strerror or exc}") from None
        served = [kind for kind, present in (("asr", self.services.asr),
                                             ("tts", self.services.tts)) if present]
        where = f"tcp://{parts.netloc.rsplit(':', 1)[0]}:{self.port}" if self.port else self.uri
        log.info("Wyoming server on %s: %s", where, ", ".join([*served, "handle"]))
        if parts.scheme == "tcp" and self.settings.zeroconf:
            self._advertiser = await advertise(self.name, self.port, parts.hostname or "")

    async def stop(self) -> None:
        """Stop listening, end every connection (a request in progress is cancelled)."""
        if self._advertiser is not None:
            await self._advertiser.stop()
            self._advertiser = None
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._stopping = True
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        if self.uri.startswith("unix://"):
            with contextlib.suppress(OSError):
                os.unlink(self.uri[len("unix://"):])

    async def __aenter__(self) -> WyomingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_name(writer)
        if len(self._connections) >= self.settings.max_connections:
            self.refused += 1
            log.warning("wyoming %s: refused, %d connections are being served "
                        "(JARVIS_WYOMING_MAX_CONNECTIONS)", peer, len(self._connections))
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode_event(Error(
                    text="too many connections; try again shortly", code="busy").event()))
                await writer.drain()
                writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.served += 1
        log.debug("wyoming %s: connected", peer)
        try:
            await Connection(self.services, reader, writer, peer).run()
        except asyncio.CancelledError:
            if not self._stopping:
                raise  # not ours to swallow
        except Exception:  # a bug must end this connection only, never the server
            log.exception("wyoming %s: internal error; closing the connection", peer)
            writer.close()
        finally:
            self._connections.discard(task)
            log.debug("wyoming %s: closed", peer)


# --------------------------------------------------------------------------- assembly


def services_for(assistant: Assistant, settings: Settings) -> Services:
    """The shared part of every connection, from a built assistant."""
    backend_info = assistant.backend.info()
    model = str(backend_info.get("model_path") or backend_info.get("model") or "llm")
    model = Path(model).name.removesuffix(".gguf") or "llm"
    info = build_info(asr=assistant.asr, tts=assistant.tts, model=model,
                      home_control=len(assistant.devices) > 0)
    return Services(assistant.responder, assistant.asr, assistant.tts, info.event(),
                    max_utterance_s=settings.vad.max_utterance_s,
                    idle_timeout_s=settings.wyoming.idle_timeout_s)


async def start_wyoming(settings: Settings, assistant: Assistant) -> WyomingServer:
    """Serve ``assistant`` on ``settings.wyoming.uri`` (which must be set)."""
    if not settings.wyoming.enabled:
        raise ConfigError("the Wyoming server needs an address: set JARVIS_WYOMING_URI "
                          "(e.g. tcp://0.0.0.0:10700)")
    server = WyomingServer(settings.wyoming, services_for(assistant, settings),
                           name=f"jarvis-{settings.mqtt.site}")
    await server.start()
    return server


def with_uri(settings: Settings, uri: str) -> Settings:
    """``settings`` with the Wyoming server at ``uri`` (checked like JARVIS_WYOMING_URI)."""
    try:
        checked = parse_wyoming_uri(uri)
    except ValueError as exc:
        raise ConfigError(f"--uri {uri[:80]!r} is invalid: {exc}") from None
    if not checked:
        raise ConfigError("--uri is empty: expected tcp://HOST:PORT or unix:///path")
    return replace(settings, wyoming=replace(settings.wyoming, uri=checked))


def wyoming_service(settings: Settings
                    ) -> Callable[[Assistant], AbstractAsyncContextManager[WyomingServer]]:
    """The Wyoming server as a service of a running assistant: ``async with
    wyoming_service(settings)(assistant):`` serves for the block (what ``jarvis hub``
    is given, so that the hub need not know about Wyoming)."""

    @contextlib.asynccontextmanager
    async def serve(assistant: Assistant) -> AsyncIterator[WyomingServer]:
        server = await start_wyoming(settings, assistant)
        try:
            yield server
        finally:
            await server.stop()

    return serve
