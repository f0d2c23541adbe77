"""The bridge when things go wrong: the network drops, the broker is killed or restarted,
Jarvis itself is away; credentials; the ``hub`` command as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from jarvis.config import load_settings
from jarvis.home.bridge import MqttAuthError, MqttBridge, MqttConfigError, MqttConnectionError
from jarvis.home.hub import run_hub, text_frontend
from jarvis.home.transport import AiomqttTransport, Connection, Received, Transport, Will
from tests.support.mqtt import (
    FAST,
    LoopThread,
    Mosquitto,
    Relay,
    RunningHub,
    hub_settings,
    loads,
    need_mosquitto,
    probe,
    start_hub,
    wait_until,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BASE = "jarvis/rely"


class Rig:
    def __init__(self, loop: LoopThread, broker: Mosquitto, relay: Relay,
                 hub: RunningHub) -> None:
        self.loop, self.broker, self.relay, self.hub = loop, broker, relay, hub


@pytest.fixture(scope="module")
def rig(loop_thread: LoopThread, backend: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Its own broker (restarted by these tests), and the bridge behind a relay."""
    need_mosquitto()
    tmp = tmp_path_factory.mktemp("reliability")
    broker = Mosquitto(tmp / "broker")
    broker.start()

    async def up() -> tuple[Relay, RunningHub]:
        relay = await Relay(broker.port).start()
        cfg = hub_settings(tmp, MQTT_HOST="127.0.0.1", MQTT_PORT=str(relay.port), SITE="rely",
                           DEVICES_FILE=str(ROOT / "config" / "devices.example.toml"))
        return relay, await start_hub(backend, cfg)

    relay, hub = loop_thread.run(up())
    rig = Rig(loop_thread, broker, relay, hub)
    yield rig
    loop_thread.run(rig.hub.close())  # a test may have replaced the hub
    loop_thread.run(relay.close())
    broker.stop(kill=True)


async def ask_all(p: Any, ids: list[str], text: str = "Say yes.") -> None:
    for cid in ids:
        await p.publish(f"{BASE}/cmd/ask", json.dumps({"text": text, "id": cid,
                                                        "max_tokens": 3}))


async def replies(p: Any, ids: list[str], start: int = 0, timeout: float = 60) -> list[Any]:
    """Wait for a reply to each id, then return every reply id seen (duplicates too)."""
    for cid in ids:
        await p.wait_for(lambda t, b, cid=cid: t == f"{BASE}/reply" and loads(b)["id"] == cid,
                         start=start, timeout=timeout)
    await asyncio.sleep(0.3)
    return [loads(b)["id"] for t, b, _, _ in p.messages[start:] if t == f"{BASE}/reply"]


def test_network_drop_last_will_then_queued_commands_are_served(rig: Rig) -> None:
    """The line to the broker is cut: the broker announces ``offline`` (the last will);
    asks published meanwhile wait in Jarvis's persistent session and are each answered
    once after it reconnects."""
    async def scenario() -> float:
        async with probe(rig.broker.port, f"{BASE}/#") as p:
            await p.wait_for(lambda t, b: t == f"{BASE}/availability" and b == b"online")
            start = len(p.messages)
            await rig.relay.block()
            await p.wait_for(lambda t, b: t == f"{BASE}/availability" and b == b"offline",
                             start=start, timeout=10)
            # Jarvis notices the drop on its own schedule.
            await wait_until(lambda: not rig.hub.bridge.connected.is_set(), 10,
                             "disconnected")
            ids = ["net-1", "net-2", "net-3"]
            await ask_all(p, ids)  # each returns once the broker has it (QoS 1)
            t_back = time.monotonic()
            await rig.relay.unblock()
            await rig.hub.bridge.wait_connected(10)
            reconnect_s = time.monotonic() - t_back
            assert sorted(await replies(p, ids, start)) == ids
            await p.wait_for(lambda t, b: t == f"{BASE}/availability" and b == b"online",
                             start=start)
            return reconnect_s

    assert rig.loop.run(scenario()) < 5.0


def test_broker_restart_mid_reply_delivers_the_reply_after_reconnecting(rig: Rig) -> None:
    """The broker stops while a reply is being generated; the reply waits in the
    outbox and reaches the (persistent) client once the broker is back."""
    async def scenario() -> None:
        async with probe(rig.broker.port, f"{BASE}/reply", f"{BASE}/state",
                         client_id="rely-client", clean_session=False) as p:
            start = len(p.messages)
            await p.publish(f"{BASE}/cmd/ask", json.dumps(
                {"text": "Describe the sea in detail.", "id": "mid-1", "max_tokens": 40}))
            await p.wait_for(lambda t, b: t == f"{BASE}/state" and b == b"thinking", start=start)
            rig.broker.stop()  # SIGTERM: mosquitto saves sessions and queued messages
            await wait_until(lambda: not rig.hub.bridge.connected.is_set(), 10,
                             "disconnected")
            rig.broker.start()
            assert await replies(p, ["mid-1"], start) == ["mid-1"]
            await ask_all(p, ["mid-2"])
            assert (await replies(p, ["mid-2"], start)).count("mid-2") == 1

    rig.loop.run(scenario())


def test_broker_killed_reconnects_within_seconds(rig: Rig) -> None:
    async def scenario() -> float:
        rig.broker.stop(kill=True)
        await wait_until(lambda: not rig.hub.bridge.connected.is_set(), 10, "disconnected")
        # A few failed attempts (the relay accepts, then drops the line: each fails at
        # once), so the backoff has grown to its 0.5 s cap.
        await wait_until(lambda: rig.hub.bridge._backoff.attempt >= 4, 10,
                         "4 attempts to reconnect")
        rig.broker.start()
        t_up = time.monotonic()
        await rig.hub.bridge.wait_connected(10)
        reconnect_s = time.monotonic() - t_up
        async with probe(rig.broker.port, f"{BASE}/reply") as p:
            await ask_all(p, ["kill-1"])
            assert await replies(p, ["kill-1"]) == ["kill-1"]
        return reconnect_s

    assert rig.loop.run(scenario()) < 5.0


def test_commands_sent_while_jarvis_is_away_survive_a_broker_restart(rig: Rig) -> None:
    """Jarvis is stopped; asks are published (QoS 1) to its persistent session; the broker
    restarts; a new Jarvis with the same client id answers each of them once."""
    async def scenario() -> None:
        settings = rig.hub.settings
        await rig.hub.close()
        async with probe(rig.broker.port) as p:
            await ask_all(p, ["away-1", "away-2", "away-3"])
        rig.broker.stop()
        rig.broker.start()
        async with probe(rig.broker.port, f"{BASE}/reply") as p:
            rig.hub = await start_hub(rig.hub.backend, settings)
            got = await replies(p, ["away-1", "away-2", "away-3"])
            assert sorted(got) == ["away-1", "away-2", "away-3"]

    rig.loop.run(scenario())


def test_a_broker_without_mqtt_5_is_served_over_mqtt_3(
    rig: Rig, backend: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An old broker refuses MQTT 5 ("unacceptable protocol version"): Jarvis says so
    once and connects again at once with MQTT 3.1.1 (persistent session), and serves."""
    caplog.set_level(logging.WARNING, logger="jarvis.home.transport")

    async def scenario() -> None:
        relay = await Relay(rig.broker.port).start()
        relay.refuse_mqtt5 = True
        cfg = hub_settings(tmp_path, MQTT_HOST="127.0.0.1", MQTT_PORT=str(relay.port),
                           SITE="old")
        hub = await start_hub(backend, cfg)
        try:
            assert relay.refused_mqtt5 == 1 and hub.bridge.stats.connects == 1
            async with probe(rig.broker.port, "jarvis/old/reply") as p:
                await p.publish("jarvis/old/cmd/ask", b'{"text": "Hi.", "id": "old-1", '
                                                      b'"max_tokens": 2}')
                _, body = await p.wait_for(lambda t, b: loads(b)["id"] == "old-1")
                assert loads(body)["text"]
        finally:
            await hub.close()
            await relay.close()

    rig.loop.run(scenario())
    assert "does not speak MQTT 5" in caplog.text


class FlakyTransport:
    """Fault injection over the real transport: the connection "breaks" during the first
    publication of a reply, after the broker may or may not have it."""

    def __init__(self, inner: Transport, topic: str) -> None:
        self.inner, self.topic, self.failed = inner, topic, False

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        async with self.inner.connect() as conn:
            yield _FlakyConnection(conn, self)


class _FlakyConnection:
    def __init__(self, conn: Connection, owner: FlakyTransport) -> None:
        self.conn, self.owner = conn, owner

    async def subscribe(self, topic: str, qos: int) -> None:
        await self.conn.subscribe(topic, qos)

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if topic == self.owner.topic and not self.owner.failed:
            self.owner.failed = True
            raise MqttConnectionError("injected: connection lost while publishing")
        await self.conn.publish(topic, payload, qos, retain)

    def messages(self) -> AsyncIterator[Received]:
        return self.conn.messages()

    def ack(self, message: Received) -> None:
        self.conn.ack(message)


class AttemptsTransport:
    """The real transport, recording each connection attempt's outcome: connections made,
    and the errors that ended them (as text: an error's traceback would keep the
    attempt's client alive)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.connected = 0
        self.failures: list[str] = []

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        try:
            async with self.inner.connect() as conn:
                self.connected += 1
                yield conn
        except MqttConnectionError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            raise


def test_a_publication_cut_short_is_sent_again_after_reconnecting(
    rig: Rig, backend: Any, tmp_path: Path
) -> None:
    cfg = hub_settings(tmp_path, **rig.broker.env(SITE="flaky"))
    base = "jarvis/flaky"

    async def scenario() -> None:
        transport = FlakyTransport(
            AiomqttTransport(cfg.mqtt, Will(f"{base}/availability", b"offline")),
            f"{base}/reply")
        frontend = text_frontend(backend, cfg)
        bridge = MqttBridge(cfg.mqtt, frontend, options=FAST, transport=transport)
        frontend.attach(bridge)
        stop = asyncio.Event()
        task = asyncio.ensure_future(bridge.run(stop))
        try:
            await bridge.wait_connected(10)
            async with probe(rig.broker.port, f"{base}/reply") as p:
                await p.publish(f"{base}/cmd/ask", b'{"text": "Hi.", "id": "f1", '
                                                   b'"max_tokens": 2}')
                await p.wait_for(lambda t, b: loads(b)["id"] == "f1")
                await asyncio.sleep(0.3)
                assert transport.failed and bridge.stats.connects == 2
                assert [loads(b)["id"] for b in p.on(f"{base}/reply")] == ["f1"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    rig.loop.run(scenario())


def test_a_broker_restart_while_subscribing_logs_no_unretrieved_future(
    loop_thread: LoopThread, backend: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker restarts while Jarvis waits for its SUBACK (no one reads messages
    yet): aiomqtt records the lost connection on a future that only message iteration
    reads, and unread it became ``ERROR asyncio: Future exception was never retrieved``
    once the client was collected. The transport reads it; the bridge reconnects."""
    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    # The bridge logs the error that ended the attempt; a captured record would keep it,
    # and through its traceback the attempt's client, alive past gc.collect().
    caplog.set_level(logging.ERROR, logger="jarvis.home.bridge")
    attempts: AttemptsTransport | None = None

    async def scenario() -> MqttBridge:
        nonlocal attempts
        relay = await Relay(broker.port).start()
        relay.swallow_subscribe = True
        cfg = hub_settings(tmp_path, MQTT_HOST="127.0.0.1", MQTT_PORT=str(relay.port),
                           SITE="restart")
        frontend = text_frontend(backend, cfg)
        attempts = AttemptsTransport(AiomqttTransport(
            cfg.mqtt, Will("jarvis/restart/availability", b"offline"), timeout=1.0))
        bridge = MqttBridge(cfg.mqtt, frontend, transport=attempts, options=FAST)
        frontend.attach(bridge)
        stop = asyncio.Event()
        task = asyncio.ensure_future(bridge.run(stop))
        try:
            await asyncio.wait_for(relay.subscribe_swallowed.wait(), 10)
            broker.stop()  # SIGTERM: a restart, with Jarvis waiting for its SUBACK
            broker.start()
            # The wait for the SUBACK times out, then the next attempt gets through.
            relay.swallow_subscribe = False
            await bridge.wait_connected(20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await relay.close()
        return bridge

    try:
        bridge = loop_thread.run(scenario())
    finally:
        broker.stop(kill=True)
    assert bridge.stats.connects == 2 and attempts is not None
    # The first attempt was lost while subscribing, after the broker had accepted it.
    assert attempts.connected == 2 and len(attempts.failures) == 1
    assert "subscribe to jarvis/restart/cmd/+ failed" in attempts.failures[0]
    gc.collect()  # the first attempt's client and its futures go (an unread one logs now)
    assert "never retrieved" not in caplog.text
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------- credentials


def test_credentials_are_used_and_never_logged(
    loop_thread: LoopThread, backend: Any, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    need_mosquitto()
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    secret = "s3cret-Pa55word"
    passwords = tmp_path / "passwords"
    subprocess.run([tool, "-b", "-c", str(passwords), "jarvis", secret], check=True)
    broker = Mosquitto(tmp_path / "broker", password_file=passwords)
    broker.start()
    caplog.set_level(logging.DEBUG)
    good = hub_settings(tmp_path, **broker.env(MQTT_USERNAME="jarvis", MQTT_PASSWORD=secret,
                                               SITE="secure"))
    bad = hub_settings(tmp_path, **broker.env(MQTT_USERNAME="jarvis", SITE="intruder",
                                              MQTT_PASSWORD=secret[::-1] + "-wrong"))

    async def scenario() -> str:
        hub = await start_hub(backend, good)
        try:
            assert hub.bridge.stats.connects == 1
            hub.bridge.publish_error("probe", "an error message", correlation_id="x")
            assert await hub.bridge.flush(5)
        finally:
            await hub.close()
        bridge = MqttBridge(bad.mqtt, hub.assistant, options=FAST)
        with pytest.raises(MqttAuthError) as info:
            await asyncio.wait_for(bridge.run(), 10)
        return str(info.value)

    try:
        message = loop_thread.run(scenario())
    finally:
        broker.stop(kill=True)
    assert "refused" in message and "JARVIS_MQTT_PASSWORD" in message
    for text in (message, caplog.text, "\n".join(str(r.args) for r in caplog.records)):
        assert secret not in text and secret[::-1] not in text
    assert "Sending CONNECT" in caplog.text  # paho's debug log was really captured
    assert "********" in " ".join(v for _, v, _ in good.describe())


def _certificates(tmp: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    files = {name: tmp / name for name in ("ca.key", "ca.crt", "server.key", "server.crt",
                                            "client.key", "client.crt")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", str(files["ca.key"]), "-out", str(files["ca.crt"]),
        "-days", "2", "-subj", "/CN=jarvis-test-ca")
    for who, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        csr = tmp / f"{who}.csr"
        run("req", *ec, "-keyout", str(files[f"{who}.key"]), "-out", str(csr),
            "-subj", f"/CN=jarvis-test-{who}")
        ext = tmp / f"{who}.ext"
        ext.write_text(extra + "\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(files["ca.crt"]), "-CAkey",
            str(files["ca.key"]), "-CAcreateserial", "-out", str(files[f"{who}.crt"]),
            "-days", "2", "-extfile", str(ext))
    return files


def test_mutual_tls(loop_thread: LoopThread, backend: Any, tmp_path: Path,
                    caplog: pytest.LogCaptureFixture) -> None:
    need_mosquitto()
    certs = _certificates(tmp_path)
    broker = Mosquitto(tmp_path / "broker", listener=(
        f"cafile {certs['ca.crt']}", f"certfile {certs['server.crt']}",
        f"keyfile {certs['server.key']}", "require_certificate true"))
    broker.start()
    tls = hub_settings(tmp_path, **broker.env(
        SITE="tls", MQTT_TLS_CA=str(certs["ca.crt"]), MQTT_TLS_CERT=str(certs["client.crt"]),
        MQTT_TLS_KEY=str(certs["client.key"]),
        DEVICES_FILE=str(ROOT / "config" / "devices.example.toml")))
    no_cert = hub_settings(tmp_path, **broker.env(SITE="tls", MQTT_CLIENT_ID="jarvis-plain",
                                                  MQTT_TLS_CA=str(certs["ca.crt"])))

    async def scenario() -> None:
        hub = await start_hub(backend, tls)
        try:
            hub.bridge.publish("jarvis/tls/probe", b"over TLS")
            assert await hub.bridge.flush(5)
            reply = await hub.assistant.ask("turn on the porch light")
            assert [a["device"] for a in reply.actions] == ["porch_light"]
        finally:
            await hub.close()
        assert hub.bridge.stats.connects == 1
        # Without a client certificate the broker ends every TLS handshake: each attempt
        # fails as soon as it is refused (long before its 30 s timeout). Wait for two
        # failed attempts; nothing may have connected.
        attempts = AttemptsTransport(AiomqttTransport(
            no_cert.mqtt, Will("jarvis/tls/availability", b"offline"), timeout=30.0))
        refused = MqttBridge(no_cert.mqtt, hub.assistant, options=FAST, transport=attempts)
        stop = asyncio.Event()
        task = asyncio.ensure_future(refused.run(stop))
        try:
            await wait_until(lambda: len(attempts.failures) >= 2, 20, "2 failed attempts")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert refused.stats.connects == 0 and attempts.connected == 0
        assert all(f.startswith("MqttConnectionError: ") for f in attempts.failures)
        assert "certificate required" in caplog.text  # refused for the reason we think

    try:
        loop_thread.run(scenario())
    finally:
        broker.stop(kill=True)


# ---------------------------------------------------------------------- hub command


HUB_COMMAND = (
    "import argparse, sys\n"
    "from jarvis.config import load_settings\n"
    "from jarvis.cli.mqtt import register\n"
    "parser = argparse.ArgumentParser(prog='jarvis')\n"
    "register(parser.add_subparsers(dest='command'))\n"
    "args = parser.parse_args(['hub'])\n"
    "sys.exit(args.handler(args, load_settings()))\n"
)


def test_hub_command_serves_then_stops_cleanly(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    need_mosquitto()
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    env.update({
        "JARVIS_MQTT_HOST": "127.0.0.1", "JARVIS_MQTT_PORT": str(broker.port),
        "JARVIS_SITE": "cli", "JARVIS_CACHE_DIR": str(tmp_path / "ctx"),
        "JARVIS_MAX_TOKENS": "4", "JARVIS_TEMPERATURE": "0", "JARVIS_WARMUP": "false",
        "JARVIS_SYSTEM_PROMPT": "You are Jarvis. Answer in a few words.",
        "JARVIS_DEVICES_FILE": str(ROOT / "config" / "devices.example.toml"),
        "PYTHONPATH": str(ROOT),
    })
    proc = subprocess.Popen([sys.executable, "-c", HUB_COMMAND], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    async def scenario() -> None:
        async with probe(broker.port, "jarvis/cli/#", "zigbee2mqtt/#") as p:
            await p.wait_for(lambda t, b: t == "jarvis/cli/availability" and b == b"online",
                             timeout=90)
            await p.publish("jarvis/cli/cmd/ask", b'{"text": "turn off the porch light", '
                                                  b'"id": 1}')
            _, body = await p.wait_for(lambda t, _: t == "jarvis/cli/reply")
            assert loads(body)["actions"][0]["device"] == "porch_light"
            assert p.on("zigbee2mqtt/porch_light/set") == [b'{"state":"OFF"}']
            start = len(p.messages)
            proc.send_signal(signal.SIGTERM)
            await p.wait_for(lambda t, b: t == "jarvis/cli/availability" and b == b"offline",
                             start=start, timeout=30)

    try:
        loop_thread.run(scenario(), 150)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop(kill=True)


def test_hub_needs_a_broker(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.touch()
    settings = load_settings({"JARVIS_CACHE_DIR": str(tmp_path)}, env_file=empty)
    with pytest.raises(MqttConfigError, match="JARVIS_MQTT_HOST"):
        asyncio.run(run_hub(settings))
