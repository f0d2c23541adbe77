"""Real-broker helpers for the MQTT tests (imported by test_mqtt*.py), and checks of the
helpers themselves: a real mosquitto on a free 127.0.0.1 port with its own config and
persistence, an event loop in a thread for the module-scoped bridge and backend, a
probe client that records what is published, and a TCP relay that can cut the line."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest

from jarvis.config import Settings, load_settings
from jarvis.devices.device_map import DeviceMap, load_device_map
from jarvis.home.bridge import BridgeOptions, MqttBridge
from jarvis.home.hub import HubAssistant
from jarvis.llm.llama_cpp import LlamaCppBackend

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TEMPLATE = Path(__file__).resolve().parent.parent / "config" / "mosquitto-test.conf"
T = TypeVar("T")
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process on 127.0.0.1 with its own config, log and persistence."""

    def __init__(self, workdir: Path, *, port: int | None = None,
                 password_file: Path | None = None, listener: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.password_file = password_file
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "mosquitto.conf"
        lines = [
            TEMPLATE.read_text(),
            # As root, mosquitto would switch to the "mosquitto" user, who cannot write
            # the persistence file in our temp dir; as anyone else this line is ignored.
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            *listener,
            f"persistence_location {workdir}/",
            f"log_dest file {workdir}/mosquitto.log",
        ]
        if password_file is None:
            lines.append("allow_anonymous true")
        else:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "mosquitto.log")
                raise RuntimeError("mosquitto exited: " + (log.read_text() if log.exists() else ""))
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port),
                                                                        timeout=0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (mosquitto saves its database) or SIGKILL (it does not)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def env(self, **extra: str) -> dict[str, str]:
        """JARVIS_* settings (without the prefix) for this broker."""
        return {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(self.port), **extra}


def need_mosquitto() -> None:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"mosquitto is not installed ({MOSQUITTO}); apt-get install mosquitto")


# Session-wide singletons. A fixture imported into several test modules is a separate
# fixture in each, so the broker lives here and pytest's config cleanup ends it once.
_SHARED: dict[str, Any] = {}


def _shared(config: pytest.Config, key: str, make: Callable[[], T],
            close: Callable[[T], None]) -> T:
    if key not in _SHARED:
        value = make()
        _SHARED[key] = value

        def cleanup() -> None:
            close(_SHARED.pop(key))

        config.add_cleanup(cleanup)
    return _SHARED[key]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def mosquitto(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Mosquitto:
    """The session's shared broker (tests that restart a broker start their own)."""
    need_mosquitto()

    def make() -> Mosquitto:
        broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
        broker.start()
        return broker

    return _shared(request.config, "mosquitto", make, lambda b: b.stop(kill=True))


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    """Module-scoped (like ``backend``): its threads end with the module, so tests that
    check for stray threads elsewhere in the session do not see them."""
    loop = LoopThread()
    yield loop
    loop.close()


TEST_SYSTEM_PROMPT = "You are Jarvis, a home voice assistant. Answer in one short sentence."


def hub_settings(tmp: Path, **env: str) -> Settings:
    """Settings for the starter model (greedy, 8 tokens) plus ``env`` (names without the
    JARVIS_ prefix), ignoring any .env file and the user's cache."""
    empty = tmp / "empty.env"
    empty.touch()
    environ = {
        "JARVIS_CACHE_DIR": str(tmp / "ctx-cache"), "JARVIS_TEMPERATURE": "0",
        "JARVIS_MAX_TOKENS": "8", "JARVIS_SYSTEM_PROMPT": TEST_SYSTEM_PROMPT,
        "JARVIS_WARMUP": "false",
    }
    environ.update({f"JARVIS_{k}": v for k, v in env.items()})
    return load_settings(environ, env_file=empty)


@pytest.fixture(scope="module")
def backend(loop_thread: LoopThread,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    """One real starter-model backend per test module, living on ``loop_thread``."""
    settings = hub_settings(tmp_path_factory.mktemp("backend"))
    model = LlamaCppBackend(settings.llm, settings.cache, prefill_system=True)
    loop_thread.run(model.start(), 120)
    yield model
    loop_thread.run(model.close(), 30)


class LoopThread:
    """An event loop running in a thread, so module-scoped async objects (backend,
    bridge) outlive one test and keep serving between tests, as in production."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), 10)
        with contextlib.suppress(Exception):
            self.run(self.loop.shutdown_default_executor(), 10)  # joins asyncio_N threads
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Probe:
    """A test client on the broker: publishes, and records every message on its
    subscriptions in order, with the time it arrived."""

    def __init__(self, port: int, *, client_id: str | None = None,
                 clean_session: bool = True) -> None:
        self.port = port
        self.client_id = client_id
        self.clean_session = clean_session
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.subscriptions: list[str] = []

    async def start(self, *topics: str) -> Probe:
        self.subscriptions = list(topics)
        ready = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(ready))
        await asyncio.wait_for(ready.wait(), 10)
        return self

    async def _run(self, ready: asyncio.Event) -> None:
        while True:
            try:
                client = aiomqtt.Client("127.0.0.1", self.port, identifier=self.client_id,
                                        clean_session=self.clean_session,
                                        socket_options=NODELAY)
                async with client:
                    self._client = client
                    for topic in self.subscriptions:
                        await client.subscribe(topic, 1)
                    ready.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else b""
                        self.messages.append((m.topic.value, payload, bool(m.retain),
                                              time.perf_counter()))
                        self._changed.set()
            except aiomqtt.MqttError:
                self._client = None
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    async def publish(self, topic: str, payload: bytes | str, *, qos: int = 1,
                      retain: bool = False, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            client = self._client
            if client is not None:
                try:
                    await client.publish(topic, payload, qos=qos, retain=retain)
                    return
                except aiomqtt.MqttError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not publish to {topic}")
            await asyncio.sleep(0.05)

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _, _ in self.messages if t == topic]

    async def wait_for(self, predicate: Callable[[str, bytes], bool], *, timeout: float = 30.0,
                       start: int = 0) -> tuple[str, bytes]:
        """The first message from index ``start`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.messages):
                topic, payload, _, _ = self.messages[index]
                index += 1
                if predicate(topic, payload):
                    return topic, payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching message; got " + repr(
                    [(t, p[:120]) for t, p, _, _ in self.messages[start:]][-20:]))
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))


@contextlib.asynccontextmanager
async def probe(port: int, *topics: str, **kwargs: Any) -> AsyncIterator[Probe]:
    p = await Probe(port, **kwargs).start(*topics)
    try:
        yield p
    finally:
        await p.stop()


class Relay:
    """A TCP relay in front of the broker: ``cut()`` drops every connection at once
    (as a pulled cable would, so the broker publishes last wills), ``block()`` also
    refuses new ones until ``unblock()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    async def block(self) -> None:
        """Cut, and refuse connections (closed port) until ``unblock``."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    async def unblock(self) -> None:
        await self.start()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


# ---------------------------------------------------------------------- helper checks


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
            with contextlib.suppress(aiomqtt.MqttError):
                async with client:
                    relay.cut()
                    async for _ in client.messages:
                        pass
            await watcher.wait_for(lambda t, p: p == b"gone", timeout=10)
        await relay.close()

    asyncio.run(scenario())


FAST = BridgeOptions(backoff_initial_s=0.05, backoff_max_s=0.5, flush_timeout_s=2.0,
                     keepalive_s=10)


@dataclass
class RunningHub:
    """A HubAssistant and its MqttBridge serving on the current loop."""

    assistant: HubAssistant
    bridge: MqttBridge
    stop: asyncio.Event
    task: asyncio.Task[None]
    settings: Settings

    @property
    def base(self) -> str:
        return self.settings.mqtt.base_topic

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 15)


async def start_hub(backend: Any, settings: Settings, *, options: BridgeOptions = FAST,
                    devices: DeviceMap | None = None, wait: bool = True) -> RunningHub:
    file = settings.mqtt.devices_file
    if devices is None:
        devices = load_device_map(file) if file else DeviceMap()
    assistant = HubAssistant(backend, settings.llm, settings.latency, devices=devices,
                             devices_file=file, room=settings.mqtt.site)
    bridge = MqttBridge(settings.mqtt, assistant, options=options)
    stop = asyncio.Event()
    task = asyncio.ensure_future(bridge.run(stop))
    hub = RunningHub(assistant, bridge, stop, task, settings)
    if wait:
        await bridge.wait_connected(15)
    return hub


def loads(payload: bytes) -> Any:
    return json.loads(payload.decode("utf-8"))
