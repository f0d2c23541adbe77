"""``jarvis hub``: the headless hub (text in and out over MQTT, no audio), the same as
``jarvis run --no-audio``.

SIGINT/SIGTERM stop it cleanly (exit status 0): no new command is taken, the reply
being generated gets ``JARVIS_SHUTDOWN_GRACE_S`` to finish, the asks still waiting stay
with the broker for the next start (unanswered, not answered with an error), answers
are flushed and ``offline`` is published. A second signal during that is noted and
changes nothing (nothing is cut off mid-write); a third ends the process at once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from jarvis.config import Settings

log = logging.getLogger("jarvis")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hub = subparsers.add_parser(
        "hub",
        help="headless hub: MQTT and the satellites in every room, no sound device of its "
             "own (= run --no-audio)",
        description="Serve asks, device commands and Home Assistant discovery over MQTT "
        "(JARVIS_MQTT_HOST, ...; device map: JARVIS_DEVICES_FILE) and drive the Wyoming "
        "satellites of JARVIS_SATELLITES (one room each), with no sound device of its own.",
    )
    hub.set_defaults(handler=hub_handler)


def hub_handler(args: argparse.Namespace, settings: Settings) -> int:
    """Run the hub until SIGINT/SIGTERM; 0 after a clean stop."""
    from jarvis.home.bridge import MqttConfigError  # the hub's stack: not for the parser

    if not settings.mqtt.enabled and not settings.satellites.enabled:
        raise MqttConfigError("the hub needs MQTT or satellites: set JARVIS_MQTT_HOST (and "
                              "JARVIS_MQTT_PORT, JARVIS_MQTT_USERNAME, ... as needed) or "
                              "JARVIS_SATELLITES")
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    stop = asyncio.Event()
    install_stop_signals(asyncio.get_running_loop(), stop.set)
    # JARVIS_WYOMING_URI: Wyoming beside MQTT; JARVIS_SATELLITES: a room per satellite.
    from jarvis.cli.wyoming import hub_services, serve
    from jarvis.home.hub import run_hub

    if not settings.mqtt.enabled:
        return await serve(settings, stop)  # satellites without MQTT
    services = hub_services(settings)
    await run_hub(settings, stop=stop, services=services, speech=bool(services))
    return 0


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], object]) -> None:
    """SIGINT and SIGTERM on ``loop``: the first calls ``stop`` (a clean stop begins),
    the second is only logged (the stop goes on: a process restarted impatiently must
    not die halfway through writing an answer or a cache), the third ends the process
    at once, as the signal's default would have."""
    received = 0

    def handle(sig: signal.Signals) -> None:
        nonlocal received
        received += 1
        if received == 1:
            log.info("%s: stopping (send it twice more to end at once)", sig.name)
            stop()
        elif received == 2:
            log.warning("%s again: still finishing the work in progress; a third ends "
                        "Jarvis at once", sig.name)
        else:
            loop.remove_signal_handler(sig)  # back to the default action
            os.kill(os.getpid(), sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows, not main
            loop.add_signal_handler(sig, handle, sig)
