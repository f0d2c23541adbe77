"""``jarvis satellite``: this machine's microphone and speaker as a Wyoming satellite, for
a Jarvis hub (JARVIS_SATELLITES) or Home Assistant to drive. No speech or language model
is loaded: it runs on a Raspberry Pi Zero 2 W.

The wake word (JARVIS_WAKE_WORD) is listened for here when it names a bundled model;
otherwise (off, or a phrase) the microphone streams all the time and the controller
listens for it. SIGINT/SIGTERM stop it cleanly (exit status 0)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from jarvis.config import Settings, parse_wyoming_uri
from jarvis.errors import ConfigError

if TYPE_CHECKING:
    from jarvis.wyoming.satellite import SatelliteOptions

log = logging.getLogger("jarvis")

DEFAULT_URI = "tcp://0.0.0.0:10700"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    satellite = subparsers.add_parser(
        "satellite",
        help="be a Wyoming satellite: this machine's microphone and speaker for a Jarvis "
             "hub or Home Assistant",
        description="A Wyoming satellite (no models but the wake word's): a controller "
        "(the Jarvis hub with JARVIS_SATELLITES=room=tcp://HOST:PORT, or Home Assistant's "
        "Wyoming integration) connects to it, gets the microphone as a stream and sends "
        "back the replies to play. With JARVIS_WAKE_WORD naming a bundled model the wake "
        "word is heard here and only requests are streamed; otherwise the microphone "
        "streams all the time. Devices: JARVIS_INPUT_DEVICE, JARVIS_OUTPUT_DEVICE.",
    )
    satellite.add_argument("--uri", default=DEFAULT_URI,
                           help=f"where to listen: tcp://HOST:PORT (port 0: any free one) "
                                f"or unix:///path (default: {DEFAULT_URI})")
    satellite.add_argument("--name", help="the satellite's name, shown by the controller and "
                           "advertised over zeroconf (default: this machine's host name)")
    satellite.add_argument("--area", default="", help="the room it is in (e.g. kitchen)")
    satellite.add_argument("--no-zeroconf", action="store_true",
                           help="do not advertise it on the local network (_wyoming._tcp)")
    satellite.set_defaults(handler=satellite_handler)


def satellite_handler(args: argparse.Namespace, settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop."""
    from jarvis.wyoming.satellite import SatelliteOptions, local_wake_model

    uri = _uri(args.uri)
    name = " ".join((args.name if args.name is not None else socket.gethostname()).split())
    if not name or len(name) > 63:
        raise ConfigError("--name must be 1 to 63 characters (it is advertised over "
                          "zeroconf)")
    model = local_wake_model(settings.pipeline.wake_word)
    if model is None and settings.pipeline.wake_word:
        log.info("JARVIS_WAKE_WORD=%r is not a bundled model: the microphone streams all "
                 "the time and the controller listens for it", settings.pipeline.wake_word)
    options = SatelliteOptions(
        name=name, area=args.area.strip(), uri=uri,
        zeroconf=not args.no_zeroconf and uri.startswith("tcp://"),
        input_device=settings.audio.input_device, output_device=settings.audio.output_device,
        wake_word=model or "", wake_cutoff=settings.pipeline.wake_threshold)
    return asyncio.run(serve(options))


async def serve(options: SatelliteOptions, stop: asyncio.Event | None = None) -> int:
    """The satellite until ``stop`` is set or a stop signal arrives."""
    from jarvis.cli.mqtt import install_stop_signals
    from jarvis.wyoming.satellite import WyomingSatellite

    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop.set)
    async with WyomingSatellite(options):
        await stop.wait()
    log.info("stopped")
    return 0


def _uri(raw: str) -> str:
    """``--uri`` checked like JARVIS_WYOMING_URI; ``tcp://HOST:0`` (any free port) too."""
    value = raw.strip()
    any_port = value.startswith("tcp://") and value.endswith(":0")
    try:
        checked = parse_wyoming_uri(value[:-1] + "1" if any_port else value)
        if any_port:
            checked = checked[:-1] + "0"
    except ValueError as exc:
        raise ConfigError(f"--uri {raw[:80]!r} is invalid: {exc}") from None
    if not checked:
        raise ConfigError("--uri is empty: expected tcp://HOST:PORT or unix:///path")
    return checked
