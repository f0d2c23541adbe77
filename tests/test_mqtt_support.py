"""Checks of the real-broker helpers themselves (tests/support/mqtt.py): a restarted
broker keeps what it should, the relay's cut makes the broker send last wills."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt

from tests.support.mqtt import Mosquitto, Relay, need_mosquitto, probe


def test_broker_keeps_retained_and_queued_messages_across_restart(tmp_path: Path) -> None:
    """The premise of the reliability tests: with persistence on, a SIGTERM restart
    keeps retained messages and QoS 1 messages queued for an offline persistent client."""
    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker")
    broker.start()

    async def scenario() -> None:
        async with probe(broker.port, "t/queued", client_id="sleeper", clean_session=False):
            pass  # the persistent session now holds a subscription
        async with probe(broker.port) as pub:
            await pub.publish("t/retained", b"kept", retain=True)
            await pub.publish("t/queued", b"waiting")
        broker.stop()
        broker.start()
        async with probe(broker.port, "t/queued", "t/retained", client_id="sleeper",
                         clean_session=False) as sub:
            await sub.wait_for(lambda t, p: t == "t/queued" and p == b"waiting", timeout=10)
            await sub.wait_for(lambda t, p: t == "t/retained" and p == b"kept", timeout=10)

    try:
        asyncio.run(scenario())
    finally:
        broker.stop(kill=True)


def test_relay_cut_makes_the_broker_publish_the_last_will(mosquitto: Mosquitto) -> None:
    async def scenario() -> None:
        relay = await Relay(mosquitto.port).start()
        async with probe(mosquitto.port, "t/will") as watcher:
            client = aiomqtt.Client("127.0.0.1", relay.port,
                                    will=aiomqtt.Will("t/will", b"gone", 1, False))
            with contextlib.suppress(aiomqtt.MqttError):  # the cut ends the iteration
                async with client:
                    relay.cut()
                    async for _ in client.messages:
                        pass
            await watcher.wait_for(lambda t, p: p == b"gone", timeout=10)
        await relay.close()

    asyncio.run(scenario())
