#!/usr/bin/env python3
"""MQTT bridge benchmark on a real mosquitto (started here, on a free 127.0.0.1 port)
with the real starter model, the headless hub and the example device map.

1. overhead   sequential asks: client round trip minus the model's own time, and the
              bridge's own overhead (MQTT in -> backend -> MQTT out, minus backend time),
              with the ledger of answered commands on disk as ``jarvis hub`` keeps it
2. devices    "turn on/off the kitchen light": ask published -> device command received
3. burst      4 clients x 50 asks at once (QoS 1, 8 tokens): each answered exactly once?
4. reconnect  the broker is killed (SIGKILL) and restarted: how long until Jarvis is back
5. redelivery real ``jarvis hub`` processes: 20 asks, the hub killed (SIGKILL) or stopped
              (SIGTERM) after its first reply, a new hub started: how soon after it is
              online are the asks the first one left answered, and each exactly once?

A section whose count is 0 is skipped.

    python bench/mqtt_bench.py [--asks 30] [--devices 50] [--burst 50] [--clients 4]
                               [--rounds 3] [--redelivered 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt

from jarvis import __version__
from jarvis.config import Settings, load_settings
from jarvis.devices.device_map import load_device_map
from jarvis.home.bridge import BridgeOptions, MqttBridge
from jarvis.home.hub import text_frontend
from jarvis.home.ledger import ledger_dir
from jarvis.latency import percentile
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.voice.events import EventType, Source, TurnEvent

ROOT = Path(__file__).resolve().parent.parent
BASE = "jarvis/bench"
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
"""Clients as well as Jarvis and the broker: else Nagle's algorithm adds ~40 ms a hop."""


class Broker:
    """mosquitto with config/mosquitto-test.conf (persistence on) in a temp dir."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            (ROOT / "config" / "mosquitto-test.conf").read_text()
            + f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence_location {workdir}/\nlog_dest file {workdir}/mosquitto.log\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start; returns the monotonic time the port accepted connections."""
        exe = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else "mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port),
                                                                        timeout=0.1):
                return time.monotonic()
            time.sleep(0.01)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Client:
    """A bench client: publishes asks, timestamps what comes back."""

    def __init__(self, port: int, name: str) -> None:
        self.port, self.name = port, name
        self.received: list[tuple[str, bytes, float]] = []
        self.event = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, *topics: str) -> None:
        ready = asyncio.Event()

        async def run() -> None:
            async with aiomqtt.Client("127.0.0.1", self.port, identifier=self.name,
                                      socket_options=NODELAY) as client:
                self._client = client
                for topic in topics:
                    await client.subscribe(topic, 1)
                ready.set()
                async for m in client.messages:
                    payload = m.payload if isinstance(m.payload, bytes) else b""
                    self.received.append((m.topic.value, payload, time.perf_counter()))
                    self.event.set()

        self._task = asyncio.ensure_future(run())
        await asyncio.wait_for(ready.wait(), 10)

    async def publish(self, topic: str, payload: dict[str, Any]) -> float:
        assert self._client is not None
        t = time.perf_counter()
        await self._client.publish(topic, json.dumps(payload), qos=1)
        return t

    async def wait(self, topic: str, key: str, value: Any, *, start: int = 0,
                   timeout: float = 120) -> tuple[Any, float]:
        """The first message from index ``start`` on ``topic`` whose ``key`` is ``value``."""
        deadline = time.monotonic() + timeout
        seen = start
        while time.monotonic() < deadline:
            for t, payload, at in self.received[seen:]:
                seen += 1
                if t == topic and (key == "" or json.loads(payload).get(key) == value):
                    return (json.loads(payload) if key else payload), at
            self.event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.event.wait(), 1)
        raise TimeoutError(f"{self.name}: nothing on {topic} with {key}={value!r}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def stats(values: list[float], unit: str = "ms") -> str:
    """median, p95 and max of seconds, shown in ``unit`` (ms or s)."""
    values = sorted(values)
    k = 1000.0 if unit == "ms" else 1.0
    return (f"median {statistics.median(values) * k:.2f} · p95 "
            f"{percentile(values, 95) * k:.2f} · max {values[-1] * k:.2f} {unit} "
            f"(n={len(values)})")


async def bench(args: argparse.Namespace, settings: Settings, broker: Broker) -> dict[str, Any]:
    results: dict[str, Any] = {}
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=True)
    await backend.start()
    devices = load_device_map(ROOT / "config" / "devices.example.toml")
    assistant = text_frontend(backend, settings, devices)
    bridge = MqttBridge(settings.mqtt, assistant, options=BridgeOptions(),
                        state_dir=ledger_dir(settings.cache.dir, settings.mqtt.client_id))
    assistant.attach(bridge)
    model_s: list[float] = []
    """The model's own time (its stats' total_s) of each MQTT turn, from its TURN_END."""

    def on_event(event: TurnEvent) -> None:
        if event.type is EventType.TURN_END and event.source is Source.MQTT:
            total = event.data.get("stats", {}).get("total_s")
            model_s.append(float(total) if isinstance(total, (int, float)) else 0.0)

    assistant.responder.bus.subscribe(on_event)
    stop = asyncio.Event()
    task = asyncio.ensure_future(bridge.run(stop))
    await bridge.wait_connected(10)
    main = Client(broker.port, "bench-main")
    await main.start(f"{BASE}/reply", f"{BASE}/error", "zigbee2mqtt/#")
    try:
        for i in range(3):  # warm-up
            await main.publish(f"{BASE}/cmd/ask", {"text": "Hello.", "id": f"w{i}",
                                                    "max_tokens": 8})
            await main.wait(f"{BASE}/reply", "id", f"w{i}")

        # 1. overhead ---------------------------------------------------------------
        if args.asks:
            client_overhead, bridge_overhead, backend_s = [], [], []
            for i in range(args.asks):
                t0 = await main.publish(f"{BASE}/cmd/ask", {
                    "text": f"Give me tip number {i} for a calm morning.", "id": f"o{i}",
                    "max_tokens": 8})
                reply, t1 = await main.wait(f"{BASE}/reply", "id", f"o{i}")
                total = model_s[-1]  # this ask's turn has ended before its reply went out
                backend_s.append(total)
                client_overhead.append(t1 - t0 - total)
                bridge_overhead.append(reply["latency"]["overhead_s"])
            results["overhead"] = {
                "bridge_overhead_median_ms": statistics.median(bridge_overhead) * 1000,
                "client_minus_backend_median_ms": statistics.median(client_overhead) * 1000,
                "backend_median_s": statistics.median(backend_s),
            }
            print(f"1. overhead per ask ({args.asks} sequential asks, 8 tokens)")
            print(f"   model time (backend total_s)        {stats(backend_s, 's')}")
            print(f"   bridge overhead (in -> out - model) {stats(bridge_overhead)}")
            print(f"   client round trip - model time      {stats(client_overhead)}")

        # 2. devices ----------------------------------------------------------------
        if args.devices:
            to_device, to_reply = [], []
            for i in range(args.devices):
                state = "on" if i % 2 == 0 else "off"
                start = len(main.received)
                t0 = await main.publish(f"{BASE}/cmd/ask", {
                    "text": f"turn {state} the kitchen light", "id": f"d{i}"})
                _, t_dev = await main.wait("zigbee2mqtt/kitchen_light/set", "state", state.upper(),
                                           start=start)
                _, t_rep = await main.wait(f"{BASE}/reply", "id", f"d{i}", start=start)
                to_device.append(t_dev - t0)
                to_reply.append(t_rep - t0)
            results["devices"] = {"to_device_median_ms": statistics.median(to_device) * 1000,
                                  "to_device_max_ms": max(to_device) * 1000}
            print(f"2. device commands ({args.devices} x 'turn on/off the kitchen light')")
            print(f"   ask published -> device command     {stats(to_device)}")
            print(f"   ask published -> reply              {stats(to_reply)}")

        # 3. burst ------------------------------------------------------------------
        if args.burst and args.clients:
            clients = [Client(broker.port, f"bench-burst-{c}") for c in range(args.clients)]
            for c in clients:
                await c.start(f"{BASE}/reply", f"{BASE}/error")
            errors_before = bridge.stats.errors
            t0 = time.perf_counter()

            async def fire(c: Client, k: int) -> None:
                for i in range(args.burst):
                    await c.publish(f"{BASE}/cmd/ask", {"text": f"Say a word about {i}.",
                                                        "id": f"b{k}-{i}", "max_tokens": 8})

            await asyncio.gather(*(fire(c, k) for k, c in enumerate(clients)))
            t_sent = time.perf_counter() - t0
            expected = {f"b{k}-{i}" for k in range(args.clients) for i in range(args.burst)}
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                got = {json.loads(p)["id"] for t, p, _ in clients[0].received
                       if t.endswith("/reply")}
                if expected <= got:
                    break
                await asyncio.sleep(0.2)
            t_done = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # late duplicates would show up here
            counts = Counter(json.loads(p)["id"] for t, p, _ in clients[0].received
                             if t.endswith("/reply") and json.loads(p)["id"] in expected)
            answered = sum(1 for i in expected if counts[i] >= 1)
            duplicated = sum(1 for i in expected if counts[i] > 1)
            errors = bridge.stats.errors - errors_before
            alive = not task.done()
            for c in clients:
                await c.stop()
            results["burst"] = {"asks": len(expected), "answered": answered,
                                "duplicated": duplicated, "lost": len(expected) - answered,
                                "errors": errors, "alive": alive, "seconds": t_done}
            print(f"3. burst ({args.clients} clients x {args.burst} asks, QoS 1, 8 tokens)")
            print(f"   published in {t_sent:.2f} s, all answered after {t_done:.1f} s "
                  f"({len(expected) / t_done:.1f} asks/s)")
            print(f"   answered {answered}/{len(expected)} · exactly once: "
                  f"{answered - duplicated} · duplicates {duplicated} · lost "
                  f"{len(expected) - answered} · errors {errors} · bridge alive: {alive}")

        # 4. reconnect --------------------------------------------------------------
        if args.rounds:
            await main.stop()
            rounds = []
            for _ in range(args.rounds):
                broker.kill()
                while bridge.connected.is_set():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(3.0)  # the backoff grows while the broker is away
                t_up = broker.start()
                await bridge.wait_connected(30)
                rounds.append(time.monotonic() - t_up)
            results["reconnect_s"] = rounds
            print(f"4. reconnect after SIGKILL + restart ({args.rounds} rounds, broker away 3 s, "
                  f"backoff cap {bridge.options.backoff_max_s:.0f} s)")
            print("   broker listening -> Jarvis connected " +
                  " · ".join(f"{r:.2f} s" for r in rounds) + f" (max {max(rounds):.2f} s)")
        summary = assistant.metrics()
        print(f"   latency tracker: {summary['count']} asks, mean {summary['mean_s']:.3f} s, "
              f"p95 {summary['p95_s']:.3f} s, cache hit rate {summary['cache_hit_rate']:.0%}")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await main.stop()
        await backend.close()
    return results


REDELIVER_BASE = "jarvis/redeliver"


def hub_process(broker: Broker, tmp: Path) -> subprocess.Popen[bytes]:
    """A real ``jarvis hub`` (``python -m jarvis hub``) on ``broker``, site "redeliver",
    with the JARVIS_* settings the bench runs with (as the in-process sections)."""
    env = dict(os.environ)
    env.update({"JARVIS_MQTT_HOST": "127.0.0.1", "JARVIS_MQTT_PORT": str(broker.port),
                "JARVIS_SITE": "redeliver", "JARVIS_CACHE_DIR": str(tmp / "ctx"),
                "JARVIS_TEMPERATURE": "0", "JARVIS_ENV_FILE": str(tmp / "empty.env"),
                "JARVIS_DEVICES_FILE": str(ROOT / "config" / "devices.example.toml"),
                "JARVIS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
    return subprocess.Popen([sys.executable, "-m", "jarvis", "hub"], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_payload(client: Client, topic: str, payload: bytes, start: int,
                       timeout: float = 120) -> float:
    """When ``payload`` arrived on ``topic`` (from message ``start`` on)."""
    deadline = time.monotonic() + timeout
    seen = start
    while time.monotonic() < deadline:
        for t, p, at in client.received[seen:]:
            seen += 1
            if t == topic and p == payload:
                return at
        client.event.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client.event.wait(), 1)
    raise TimeoutError(f"nothing {payload!r} on {topic}")


async def redelivery(args: argparse.Namespace, broker: Broker, tmp: Path) -> dict[str, Any]:
    """5. A hub dies (SIGKILL) or stops (SIGTERM) with asks received and not answered;
    a new one answers them: when, and each once?"""
    results: dict[str, Any] = {}
    base = REDELIVER_BASE
    print(f"5. redelivery ({args.redelivered} asks of 8 tokens; the hub is stopped after its "
          "first reply, a new hub started)")
    for mode, sig in (("kill -9", signal.SIGKILL), ("SIGTERM", signal.SIGTERM)):
        client = Client(broker.port, f"bench-redeliver-{sig.value}")
        await client.start(f"{base}/#")
        first = hub_process(broker, tmp)
        second: subprocess.Popen[bytes] | None = None
        try:
            await wait_payload(client, f"{base}/availability", b"online", 0)
            ids = [f"{sig.name}-{i}" for i in range(args.redelivered)]
            for cid in ids:
                await client.publish(f"{base}/cmd/ask", {
                    "text": f"Say a word about the number {cid[-2:]}.", "id": cid,
                    "max_tokens": 8})
            await client.wait(f"{base}/reply", "id", ids[0])
            t_signal = time.perf_counter()
            first.send_signal(sig)
            code = await asyncio.to_thread(first.wait, 120)
            t_exit = time.perf_counter()
            mark = len(client.received)
            before = {json.loads(p)["id"] for t, p, _ in client.received if t == f"{base}/reply"}
            t_start = time.perf_counter()
            second = hub_process(broker, tmp)
            t_online = await wait_payload(client, f"{base}/availability", b"online", mark)
            for cid in ids:
                await client.wait(f"{base}/reply", "id", cid)
            # Settle: one more ask, answered after anything delivered before it.
            await client.publish(f"{base}/cmd/ask", {"text": "Say ok.", "id": "settle",
                                                     "max_tokens": 1})
            await client.wait(f"{base}/reply", "id", "settle")
            replies = {p for t, p, _ in client.received if t == f"{base}/reply"}
            counts = Counter(json.loads(p)["id"] for p in replies)
            after = [at - t_online for t, p, at in client.received[mark:]
                     if t == f"{base}/reply" and json.loads(p)["id"] in set(ids) - before]
            second.send_signal(signal.SIGTERM)
            await asyncio.to_thread(second.wait, 60)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            await client.stop()
        within = sum(1 for a in after if a <= 2.0)
        duplicated = sum(1 for cid in ids if counts[cid] > 1)
        lost = sum(1 for cid in ids if counts[cid] == 0)
        results[mode] = {"left": len(after), "within_2s": within,
                         "first_s": min(after, default=0.0), "all_s": max(after, default=0.0),
                         "online_s": t_online - t_start, "stop_s": t_exit - t_signal,
                         "exit": code, "duplicated": duplicated, "lost": lost}
        print(f"   {mode:<8} exit {code} after {t_exit - t_signal:.2f} s · {len(after)} asks "
              f"left · new hub online {t_online - t_start:.2f} s after start · then "
              f"{within}/{len(after)} answered within 2 s (first {min(after, default=0):.2f} s, "
              f"all {max(after, default=0):.2f} s) · duplicates {duplicated} · lost {lost}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asks", type=int, default=30)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--burst", type=int, default=50, help="asks per client")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redelivered", type=int, default=20,
                        help="asks left to a new hub process in section 5")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jarvis-mqtt-bench-") as tmp:
        broker = Broker(Path(tmp))
        broker.start()
        empty = Path(tmp) / "empty.env"
        empty.touch()
        env = {k: v for k, v in os.environ.items() if k.startswith("JARVIS_")}
        env.update({"JARVIS_MQTT_HOST": "127.0.0.1", "JARVIS_MQTT_PORT": str(broker.port),
                    "JARVIS_SITE": "bench", "JARVIS_CACHE_DIR": str(Path(tmp) / "ctx"),
                    "JARVIS_TEMPERATURE": "0"})
        settings = load_settings(env, env_file=empty)
        import llama_cpp

        print(f"Jarvis {__version__} MQTT bench · {platform.machine()} · {os.cpu_count()} CPUs · "
              f"Python {sys.version.split()[0]} · aiomqtt {aiomqtt.__version__} · "
              f"llama-cpp-python {llama_cpp.__version__}")
        print(f"model {settings.llm.model_path.name} · {settings.llm.n_threads} threads · "
              f"mosquitto on 127.0.0.1:{broker.port}\n")
        try:
            results = asyncio.run(bench(args, settings, broker))
            if args.redelivered:
                results["redelivery"] = asyncio.run(redelivery(args, broker, Path(tmp)))
        finally:
            broker.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    burst = results.get("burst", {"lost": 0, "duplicated": 0, "alive": True})
    ok = (burst["lost"] == 0 and burst["duplicated"] == 0 and burst["alive"]
          and all(r["lost"] == 0 and r["duplicated"] == 0
                  for r in results.get("redelivery", {}).values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
