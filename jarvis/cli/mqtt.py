"""``jarvis hub``: the headless hub (text in and out over MQTT, no audio), the same as
``jarvis run --no-audio``. SIGINT/SIGTERM stop it cleanly: open asks are answered with
a ``shutting_down`` error, queued messages are flushed and ``offline`` is published."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from jarvis.config import Settings
from jarvis.home.bridge import MqttConfigError
from jarvis.home.hub import run_hub


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hub = subparsers.add_parser(
        "hub",
        help="headless hub: text in and out over MQTT only, no audio (= run --no-audio)",
        description="Serve asks, device commands and Home Assistant discovery over MQTT "
        "(JARVIS_MQTT_HOST, ...; device map: JARVIS_DEVICES_FILE) with no sound device.",
    )
    hub.set_defaults(handler=hub_handler)


def hub_handler(args: argparse.Namespace, settings: Settings) -> int:
    """Run the hub until SIGINT/SIGTERM; 0 after a clean stop."""
    if not settings.mqtt.enabled:
        raise MqttConfigError("the hub talks MQTT only: set JARVIS_MQTT_HOST (and "
                              "JARVIS_MQTT_PORT, JARVIS_MQTT_USERNAME, ... as needed)")
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    await run_hub(settings, stop=stop)
    return 0
