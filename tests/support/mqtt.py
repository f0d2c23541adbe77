"""Real-broker helpers for the MQTT tests: a real mosquitto on a free 127.0.0.1 port
with its own config and persistence, an event loop in a thread for the module-scoped
bridge and backend, a probe client that records what is published, a TCP relay that
can cut the line, a hub (the MQTT frontend over the one responder) on a bridge, and a
real ``jarvis hub`` process whose output can be waited on.

The fixtures built on these (``mosquitto``, ``loop_thread``, ``backend``) are in
``tests/conftest.py``.
"""

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
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest

from jarvis.config import Settings, load_settings
from jarvis.devices.device_map import DeviceMap, load_device_map
from jarvis.home.bridge import BridgeOptions, MqttBridge
from jarvis.home.hub import MqttFrontend, text_frontend

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TEMPLATE = Path(__file__).resolve().parent.parent.parent / "config" / "mosquitto-test.conf"
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
        self.log = workdir / "mosquitto.log"
        lines = [
            TEMPLATE.read_text(),
            # As root, mosquitto would switch to the "mosquitto" user, who cannot write
            # the persistence file in our temp dir; as anyone else this line is ignored.
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            *listener,
            f"persistence_location {workdir}/",
            f"log_dest file {self.log}",
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
                raise RuntimeError("mosquitto exited: " + self.log_text())
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

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def env(self, **extra: str) -> dict[str, str]:
        """JARVIS_* settings (without the prefix) for this broker."""
        return {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(self.port), **extra}


def need_mosquitto() -> None:
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"mosquitto is not installed ({MOSQUITTO}); apt-get install mosquitto")


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
        """Cancel what is left, join the worker threads, stop the loop. A task that will
        not end or a worker that will not finish is an error of the test that left it
        (TimeoutError), not something to hide."""
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), 10)
            self.run(self.loop.shutdown_default_executor(), 10)  # joins asyncio_N threads
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
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


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (state with no event to wait on) until true; TimeoutError
    naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still not {what} after {timeout} s")
        await asyncio.sleep(0.02)


class Relay:
    """A TCP relay in front of the broker: ``cut()`` drops every connection at once
    (as a pulled cable would, so the broker publishes last wills), ``block()`` also
    refuses new ones until ``unblock()``. With ``swallow_subscribe`` set, a client's
    SUBSCRIBE never reaches the broker (``subscribe_swallowed`` is set), so the client
    waits for its SUBACK: a way to catch it in the middle of setting up a session. With
    ``refuse_mqtt5`` set, it plays an old broker: an MQTT 5 CONNECT is refused with
    "unacceptable protocol version" (``refused_mqtt5`` counts them)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.swallow_subscribe = False
        self.subscribe_swallowed = asyncio.Event()
        self.refuse_mqtt5 = False
        self.refused_mqtt5 = 0

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

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       upstream: bool) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    # 0x82: SUBSCRIBE, sent on its own once the CONNACK has come back.
                    if upstream and self.swallow_subscribe and data[:1] == b"\x82":
                        self.subscribe_swallowed.set()
                        continue
                    if upstream and self.refuse_mqtt5 and _mqtt_level(data) == 5:
                        self.refused_mqtt5 += 1
                        writer.write(b"\x20\x02\x00\x01")  # CONNACK: bad protocol version
                        await writer.drain()
                        break
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
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


def _mqtt_level(data: bytes) -> int | None:
    """The protocol level of a CONNECT packet (4: MQTT 3.1.1, 5: MQTT 5), else None."""
    if data[:1] != b"\x10":
        return None
    i = 1
    while i < len(data) and data[i] & 0x80:  # the remaining length, a varint
        i += 1
    i += 1  # then the protocol name: 2 bytes of length, b"MQTT", then the level
    return data[i + 6] if len(data) > i + 6 and data[i + 2:i + 6] == b"MQTT" else None


FAST = BridgeOptions(backoff_initial_s=0.05, backoff_max_s=0.5, flush_timeout_s=2.0,
                     keepalive_s=10)


@dataclass
class RunningHub:
    """The MQTT frontend (the one responder, text only) and its MqttBridge serving on
    the current loop."""

    assistant: MqttFrontend
    bridge: MqttBridge
    stop: asyncio.Event
    task: asyncio.Task[None]
    settings: Settings
    backend: Any

    @property
    def base(self) -> str:
        return self.settings.mqtt.base_topic

    async def close(self) -> None:
        """Stop the bridge and wait for it; whatever it raised is raised here."""
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def start_hub(backend: Any, settings: Settings, *, options: BridgeOptions = FAST,
                    devices: DeviceMap | None = None, wait: bool = True) -> RunningHub:
    file = settings.mqtt.devices_file
    if devices is None:
        devices = load_device_map(file) if file else DeviceMap()
    frontend = text_frontend(backend, settings, devices)
    bridge = MqttBridge(settings.mqtt, frontend, options=options)
    frontend.attach(bridge)
    stop = asyncio.Event()
    task = asyncio.ensure_future(bridge.run(stop))
    hub = RunningHub(frontend, bridge, stop, task, settings, backend)
    if wait:
        await bridge.wait_connected(15)
    return hub


def loads(payload: bytes) -> Any:
    return json.loads(payload.decode("utf-8"))


ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE_DEVICES = ROOT / "config" / "devices.example.toml"


def process_env(broker: Mosquitto, tmp: Path, **env: str) -> dict[str, str]:
    """The environment of a real ``jarvis hub`` on ``broker``: the starter model, greedy,
    4 tokens a reply, the example device map, caches (and the MQTT ledger) in ``tmp``,
    plus ``env`` (names without the JARVIS_ prefix). Nothing from the developer's
    JARVIS_* variables or .env. One model thread: llama.cpp's threads wait for each other
    by spinning, which on cores shared with the rest of the suite (and the broker, and
    the test) turns a 0.3 s reply into 20 s now and then."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    environ.update({
        "JARVIS_MQTT_HOST": "127.0.0.1", "JARVIS_MQTT_PORT": str(broker.port),
        "JARVIS_CACHE_DIR": str(tmp / "cache"), "JARVIS_TEMPERATURE": "0",
        "JARVIS_MAX_TOKENS": "4", "JARVIS_WARMUP": "false", "JARVIS_N_THREADS": "1",
        "JARVIS_SYSTEM_PROMPT": TEST_SYSTEM_PROMPT, "JARVIS_DEVICES_FILE": str(EXAMPLE_DEVICES),
        "JARVIS_ENV_FILE": str(_empty_env(tmp)), "PYTHONPATH": str(ROOT),
    })
    environ.update({f"JARVIS_{k}": v for k, v in env.items()})
    return environ


def _empty_env(tmp: Path) -> Path:
    path = tmp / "empty.env"
    path.touch()
    return path


class HubProcess:
    """A real ``jarvis hub`` (``python -m jarvis hub``, or ``script`` run with ``-c`` for
    fault injection), its output (stdout and stderr) collected line by line. Create it
    on a running event loop: :meth:`wait_line` waits on that loop."""

    def __init__(self, env: dict[str, str], cwd: Path, *, script: str | None = None) -> None:
        command = [sys.executable, "-c", script] if script else [sys.executable, "-m",
                                                                    "jarvis", "hub"]
        self.lines: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
            self._notify()
        self._notify()

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the test's loop is already closed
            self._loop.call_soon_threadsafe(self._changed.set)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait_line(self, text: str, *, timeout: float = 60.0, start: int = 0) -> int:
        """The index of the first output line from ``start`` on that contains ``text``."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.lines):
                if text in self.lines[index]:
                    return index
                index += 1
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the hub exited ({self.proc.returncode}) before "
                                     f"printing {text!r}:\n{self.output[-3000:]}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line with {text!r}:\n{self.output[-3000:]}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    async def exit_code(self, timeout: float = 60.0) -> int:
        """Wait for the process to end; its exit status (negative: killed by a signal)."""
        code = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self._reader.join, 5)
        return code

    def kill(self) -> None:
        """SIGKILL, if still running (cleanup)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
