"""``jarvis wyoming``: Jarvis as a Wyoming server for Home Assistant (speech to text,
text to speech, the conversation agent), the same server that ``jarvis run`` and
``jarvis hub`` start when ``JARVIS_WYOMING_URI`` is set.

With ``JARVIS_MQTT_HOST`` set it is the hub with Wyoming beside it, so the device
commands of conversation turns go out over MQTT as they do for every other entry
point. SIGINT/SIGTERM stop it cleanly (exit status 0)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from jarvis.config import Settings

if TYPE_CHECKING:  # the voice stack loads when a server runs, not to build the parser
    from jarvis.voice.assembly import Assistant

log = logging.getLogger("jarvis")

DEFAULT_URI = "tcp://0.0.0.0:10700"
"""Where ``jarvis wyoming`` listens when neither ``--uri`` nor JARVIS_WYOMING_URI says."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    wyoming = subparsers.add_parser(
        "wyoming",
        help="serve Home Assistant over the Wyoming protocol: speech to text, text to "
             "speech, conversation agent",
        description="A Wyoming server for Home Assistant (Settings > Devices & services > "
        "Add integration > Wyoming Protocol, host and port): speech to text, text to speech "
        "and the conversation agent (device map, then the model), advertised over zeroconf "
        "(JARVIS_WYOMING_ZEROCONF). With JARVIS_MQTT_HOST set the MQTT hub runs too and "
        "device commands go out over MQTT.",
    )
    wyoming.add_argument("--uri", help="where to listen: tcp://HOST:PORT or unix:///path "
                         f"(default: JARVIS_WYOMING_URI, else {DEFAULT_URI})")
    wyoming.set_defaults(handler=wyoming_handler)


def wyoming_handler(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop."""
    from jarvis.wyoming.server import with_uri

    settings = with_uri(settings, args.uri or settings.wyoming.uri or DEFAULT_URI)
    return asyncio.run(serve(settings))


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """The Wyoming server and the satellites' rooms (with the MQTT hub when MQTT is
    configured) until ``stop`` is set or a stop signal arrives."""
    from jarvis.cli.mqtt import install_stop_signals

    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop.set)
    services = hub_services(settings)
    if settings.mqtt.enabled:
        from jarvis.home.hub import run_hub

        await run_hub(settings, stop=stop, services=services, speech=True)
        return 0
    from jarvis.voice.assembly import build_assistant

    assistant = await build_assistant(settings, listen=False)
    try:
        async with contextlib.AsyncExitStack() as running:
            for service in services:
                await running.enter_async_context(service(assistant))
            if len(assistant.devices):
                log.warning("JARVIS_MQTT_HOST is not set: device commands are understood "
                            "but not sent anywhere")
            await stop.wait()
    finally:
        await assistant.close()
    return 0


Service: TypeAlias = Callable[["Assistant"], contextlib.AbstractAsyncContextManager[object]]


def hub_services(settings: Settings) -> list[Service]:
    """What runs beside the MQTT bridge (``jarvis hub``) or on its own (``jarvis
    wyoming``): the Wyoming server when JARVIS_WYOMING_URI is set, the satellites'
    rooms when JARVIS_SATELLITES (or JARVIS_SATELLITE_DISCOVERY) is."""
    services: list[Service] = []
    if settings.wyoming.enabled:
        from jarvis.wyoming.server import wyoming_service

        services.append(wyoming_service(settings))
    if settings.satellites.enabled:
        from jarvis.wyoming.rooms import satellite_service

        services.append(satellite_service(settings))
    return services
