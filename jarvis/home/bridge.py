"""The MQTT bridge: Jarvis on a home-automation bus (topics and JSON payloads are in
:mod:`jarvis.home.schema`, Home Assistant discovery in :mod:`jarvis.home.discovery`).

:class:`MqttBridge` connects to the broker (``JARVIS_MQTT_*``), serves the commands of
``<base>/cmd/+`` and Hermes ``hermes/tts/say`` by calling an :class:`MqttAssistant`, and
publishes replies, state, transcripts, errors, metrics and availability. Jarvis plugs in
as :class:`~jarvis.home.hub.MqttFrontend` (the one responder, with or without a voice),
which turns the responder's events into :meth:`MqttBridge.publish_state`,
:meth:`MqttBridge.publish_transcript` and :meth:`MqttBridge.publish_spoken_reply` calls
and sends device commands through :meth:`MqttBridge.publish_commands`.

Reliability: one connection at a time, reopened with exponential backoff and jitter;
a persistent session (fixed client id, ``clean_session=False``, QoS 1 subscriptions),
so the broker keeps commands published while Jarvis is away, across a broker restart
with persistence on; every ask runs in its own task (the LLM serves them in arrival
order), so commands that arrive while Jarvis is busy wait their turn; outgoing messages
wait in an outbox until the broker has them, across reconnects (device commands first);
a malformed payload is answered on ``<base>/error`` and otherwise ignored. The last
will publishes ``offline`` (retained) on ``<base>/availability`` if Jarvis vanishes.
Credentials are never logged.

Errors::

    JarvisError
    ├── MqttError                  base of the MQTT errors (jarvis.home.schema)
    │   ├── MqttConfigError        MQTT settings missing or unusable (hub without a host)
    │   ├── MqttConnectionError    broker unreachable or connection lost; retried
    │   │   └── MqttAuthError      credentials refused; fatal on the first connection
    │   └── PayloadError           a malformed command: published on <base>/error only
    └── ConfigError
        └── DeviceMapError         the device map file is invalid (jarvis.devices.device_map)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from jarvis import __version__
from jarvis.config import MqttSettings
from jarvis.devices.device_map import DeviceCommand
from jarvis.errors import JarvisError
from jarvis.home.discovery import discovery_messages
from jarvis.home.schema import (
    HERMES_SAY,
    HERMES_SAY_FINISHED,
    HERMES_TEXT_CAPTURED,
    STATES,
    AskCommand,
    CancelCommand,
    Command,
    CorrelationId,
    HermesSay,
    MetricsCommand,
    MqttAuthError,
    MqttConfigError,
    MqttConnectionError,
    MqttError,
    MuteCommand,
    PayloadError,
    ReloadCommand,
    SayCommand,
    Topics,
    dumps,
    parse_command,
)
from jarvis.home.transport import (
    AiomqttTransport,
    Backoff,
    Connection,
    Outbox,
    Outgoing,
    Received,
    Transport,
    Will,
)

__all__ = [
    "Answer",
    "BridgeOptions",
    "BridgeStats",
    "MqttAssistant",
    "MqttAuthError",
    "MqttBridge",
    "MqttConfigError",
    "MqttConnectionError",
    "MqttError",
    "PayloadError",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What an MqttAssistant made of one ask."""

    text: str
    latency: Mapping[str, Any] = field(default_factory=dict)
    """JSON-ready timings for the reply payload (total_s, ttft_s, ..., intent)."""
    actions: tuple[Mapping[str, Any], ...] = ()
    """Device commands already sent for this ask (``DeviceCommand.describe()``)."""
    cancelled: bool = False
    spoken: bool = False
    backend_s: float = 0.0
    """Seconds spent in the model; the rest of the ask's time is bridge overhead."""


class MqttAssistant(Protocol):
    """What the bridge drives (:class:`~jarvis.home.hub.MqttFrontend`; tests drive
    others)."""

    @property
    def reports_state(self) -> bool:
        """True when the assistant publishes its own states (from its turns' events);
        False lets the bridge publish ``thinking``/``idle`` around asks."""

    @property
    def muted(self) -> bool: ...

    async def ask(self, text: str, *, conversation_id: str | None = None,
                  speak: bool | None = None, max_tokens: int | None = None) -> Answer:
        """Answer ``text``; JarvisError for a request that failed."""

    async def say(self, text: str) -> bool:
        """Speak ``text``; False when there is no audio output (the hub)."""

    async def mute(self, muted: bool) -> None: ...

    def cancel(self) -> bool:
        """Stop the reply being generated or spoken now; False when there is none."""

    async def reload(self) -> list[str]:
        """Re-read what can be re-read safely; the names of what was reloaded."""

    def metrics(self) -> dict[str, Any]:
        """The latency tracker's summary (LatencySummary.to_dict())."""


@dataclass(frozen=True)
class BridgeOptions:
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 4.0
    """Longest wait between connection attempts: the broker is found again at most this
    long (plus the connect) after it comes back."""
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    """Also the limit for one publish or subscribe to be acknowledged."""
    max_pending_asks: int = 1000
    outbox_limit: int = 10000
    """Messages kept while disconnected; beyond it the oldest ordinary ones are dropped."""
    flush_timeout_s: float = 3.0
    fail_on_auth_error: bool = True
    """Raise MqttAuthError when the very first connection is refused for credentials."""


@dataclass
class BridgeStats:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    asks: int = 0
    replies: int = 0
    errors: int = 0
    duplicates: int = 0
    last_connected: float | None = None
    """``time.monotonic()`` of the last successful connection."""


@dataclass
class _Ask:
    command: AskCommand
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False


class MqttBridge:
    """Jarvis on MQTT; see the module docstring. ``transport`` is the seam for tests."""

    def __init__(self, settings: MqttSettings, assistant: MqttAssistant, *,
                 options: BridgeOptions | None = None,
                 transport: Transport | None = None) -> None:
        self.settings = settings
        self.assistant = assistant
        self.options = options or BridgeOptions()
        self.topics = Topics(settings.base_topic, settings.discovery_prefix)
        self.qos = settings.qos
        self._transport: Transport = transport or AiomqttTransport(
            settings, Will(self.topics.availability, b"offline", 1, True),
            keepalive=self.options.keepalive_s, timeout=self.options.connect_timeout_s)
        self._outbox = Outbox(self.options.outbox_limit)
        self._backoff = Backoff(self.options.backoff_initial_s, self.options.backoff_max_s)
        self._asks: dict[object, _Ask] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = "idle"
        self._busy = 0
        self.stats = BridgeStats()
        self.connected = asyncio.Event()
        """Set while connected and subscribed."""

    # ------------------------------------------------------------------ public API

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (then flush, announce ``offline``, disconnect)."""
        stop = stop or asyncio.Event()
        self._spawn(self._metrics_loop())
        first = True
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                except MqttAuthError:
                    if first and self.options.fail_on_auth_error:
                        raise
                    log.error("MQTT: the broker refused the credentials; retrying")
                except MqttConnectionError as exc:
                    # Loud once per outage (and every 20th attempt), quiet in between.
                    level = logging.WARNING if self._backoff.attempt % 20 == 0 else logging.DEBUG
                    log.log(level, "MQTT: %s", exc)
                first = False
                if stop.is_set():
                    break
                delay = self._backoff.next()
                log.debug("MQTT: reconnecting in %.2f s", delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            self.connected.clear()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def publish_state(self, state: str) -> None:
        """Announce ``idle``, ``listening``, ``thinking`` or ``speaking`` (retained).
        Like every ``publish_*`` method: call it on the bridge's event loop; it queues
        and returns at once."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
        self._state = state
        self._send(self.topics.state, state.encode(), retain=True, coalesce=True)

    def publish_transcript(self, text: str, *, seconds: float = 0.0,
                           likelihood: float = 1.0) -> None:
        """What was heard: ``<base>/transcript`` and Hermes ``asr/textCaptured``."""
        self._send(self.topics.transcript,
                   {"text": text, "seconds": round(seconds, 3), "likelihood": likelihood})
        self._send(HERMES_TEXT_CAPTURED, {
            "text": text, "likelihood": likelihood, "seconds": round(seconds, 3),
            "siteId": self.settings.site, "sessionId": None, "wakewordId": None})

    def publish_spoken_reply(self, text: str, *, conversation_id: str | None,
                             cancelled: bool, actions: list[Any],
                             latency: Mapping[str, float]) -> None:
        """A reply to a request that did not come over MQTT (spoken to the microphone),
        on ``<base>/reply`` with ``"id": null``."""
        self._send(self.topics.reply, {
            "id": None, "text": text, "conversation_id": conversation_id,
            "cancelled": cancelled, "spoken": True, "actions": actions,
            "latency": dict(latency)})

    def publish_commands(self, commands: Sequence[DeviceCommand]) -> None:
        """Send device commands (ahead of anything else queued)."""
        for command in commands:
            action = command.action
            self.publish(action.topic, action.payload, retain=action.retain, urgent=True)

    def publish_metrics(self) -> None:
        try:
            metrics = self.assistant.metrics()
        except Exception:  # the bridge must outlive a bug in a summary
            log.exception("MQTT: the latency summary failed")
            return
        self._send(self.topics.metrics, metrics, retain=True, coalesce=True)

    def publish_error(self, code: str, message: str, *, correlation_id: CorrelationId = None,
                      topic: str | None = None, size: int | None = None) -> None:
        self.stats.errors += 1
        log.info("MQTT: %s on %s: %s", code, topic or "-", message)
        payload: dict[str, Any] = {"code": code, "message": message, "topic": topic,
                                   "id": correlation_id}
        if size is not None:
            payload["bytes"] = size
        self._send(self.topics.error, payload)

    def publish(self, topic: str, payload: bytes | str, *, qos: int | None = None,
                retain: bool = False, urgent: bool = False) -> None:
        """Queue any message (published as soon as the broker is reachable)."""
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        self._outbox.put(Outgoing(topic, data, self.qos if qos is None else qos, retain),
                         urgent=urgent)

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued has reached the broker; False on timeout."""
        return await self._outbox.drained(timeout)

    # ------------------------------------------------------------------ connection

    async def _session(self, stop: asyncio.Event) -> None:
        async with self._transport.connect() as conn:
            self._backoff.reset()
            self.stats.connects += 1
            self.stats.last_connected = time.monotonic()
            s = self.settings
            log.info("MQTT: connected to %s:%d as %s (tls %s, %s)", s.host, s.port, s.client_id,
                     "on" if s.tls_ca else "off", "with user" if s.username else "anonymous")
            for topic in (self.topics.cmd_filter, HERMES_SAY):
                await conn.subscribe(topic, self.qos)
            if self.topics.ha_status:
                await conn.subscribe(self.topics.ha_status, 1)
            # "online" only once subscribed: a command sent on seeing it is not lost.
            await conn.publish(self.topics.availability, b"online", 1, True)
            self._announce()
            self.connected.set()
            try:
                await self._pump(conn, stop)
            finally:
                self.connected.clear()
                self.stats.disconnects += 1

    async def _pump(self, conn: Connection, stop: asyncio.Event) -> None:
        receiver = asyncio.ensure_future(self._receive(conn))
        publisher = asyncio.ensure_future(self._publish_loop(conn))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({receiver, publisher, stopper},
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                self._abort_asks()
                if not await self._outbox.drained(self.options.flush_timeout_s):
                    log.warning("MQTT: %d messages not delivered at shutdown", len(self._outbox))
                await conn.publish(self.topics.availability, b"offline", 1, True)
                return
            for task in done:
                task.result()
            raise MqttConnectionError("the connection closed")
        finally:
            for task in (receiver, publisher, stopper):
                task.cancel()
            await asyncio.gather(receiver, publisher, stopper, return_exceptions=True)

    async def _receive(self, conn: Connection) -> None:
        async for message in conn.messages():
            try:
                self._dispatch(message, time.perf_counter())
            except Exception as exc:  # one bad message must not take the bridge down
                log.exception("MQTT: handling a message on %s failed", message.topic)
                self.publish_error("internal_error", f"{type(exc).__name__}: {exc}"[:300],
                                   topic=message.topic)

    async def _publish_loop(self, conn: Connection) -> None:
        while True:
            item = await self._outbox.get()
            try:
                await conn.publish(item.topic, item.payload, item.qos, item.retain)
            except BaseException:
                self._outbox.requeue(item)
                raise
            self._outbox.done()

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.metrics_interval_s)
            if self.connected.is_set():
                self.publish_metrics()

    def _announce(self) -> None:
        """Retained facts a (re)connecting broker should hold."""
        self.publish_state(self._state)
        self._send(self.topics.muted, b"ON" if self.assistant.muted else b"OFF",
                   retain=True, coalesce=True)
        self._publish_discovery()
        self.publish_metrics()

    def _publish_discovery(self) -> None:
        for topic, config in discovery_messages(
            self.topics, client_id=self.settings.client_id, site=self.settings.site,
            version=__version__,
        ):
            self._send(topic, config, qos=1, retain=True, coalesce=True)

    # ------------------------------------------------------------------ commands

    def _dispatch(self, message: Received, received_at: float) -> None:
        self.stats.received += 1
        if message.topic == self.topics.ha_status:
            if message.payload.strip() == b"online":
                self._publish_discovery()
            return
        try:
            command = parse_command(message.topic, message.payload, self.topics,
                                    retain=message.retain, site=self.settings.site)
        except PayloadError as exc:
            self.publish_error(exc.code, exc.message, correlation_id=exc.correlation_id,
                               topic=message.topic, size=len(message.payload))
            return
        if command is None:
            return
        if isinstance(command, AskCommand):
            self._start_ask(command, received_at)
        elif isinstance(command, CancelCommand):
            self._cancel(command)
        elif isinstance(command, MetricsCommand):
            self.publish_metrics()
            self._result(command.id, "metrics")
        else:
            self._spawn(self._serve(command))

    def _start_ask(self, command: AskCommand, received_at: float) -> None:
        key: object = ("id", command.id) if command.id is not None else object()
        if key in self._asks:
            self.stats.duplicates += 1  # a QoS 1 redelivery of an ask still in progress
            log.debug("MQTT: ask %r is already being answered; duplicate ignored", command.id)
            return
        if len(self._asks) >= self.options.max_pending_asks:
            self.publish_error("busy", f"{len(self._asks)} asks are waiting; try again later",
                               correlation_id=command.id, topic=f"{self.topics.cmd_prefix}ask")
            return
        self.stats.asks += 1
        record = _Ask(command)
        self._asks[key] = record
        self._set_busy(+1)
        record.task = self._spawn(self._serve_ask(key, record, received_at))

    async def _serve_ask(self, key: object, record: _Ask, received_at: float) -> None:
        command = record.command
        topic = f"{self.topics.cmd_prefix}ask"
        try:
            try:
                answer = await self.assistant.ask(
                    command.text, conversation_id=command.conversation_id,
                    speak=command.speak, max_tokens=command.max_tokens)
            except asyncio.CancelledError:
                if not record.cancel_requested:
                    raise
                _uncancel()
                answer = Answer("", {"finish_reason": "cancelled"}, cancelled=True)
            except JarvisError as exc:
                self.publish_error(getattr(exc, "code", "ask_failed"), str(exc),
                                   correlation_id=command.id, topic=topic)
                return
            except Exception as exc:
                log.exception("MQTT: ask %r failed", command.id)
                self.publish_error("internal_error", f"{type(exc).__name__}: {exc}"[:300],
                                   correlation_id=command.id, topic=topic)
                return
            overhead = time.perf_counter() - received_at - answer.backend_s
            self._send(self.topics.reply, {
                "id": command.id,
                "text": answer.text,
                "conversation_id": command.conversation_id,
                "cancelled": answer.cancelled,
                "spoken": answer.spoken,
                "actions": list(answer.actions),
                "latency": {**answer.latency, "overhead_s": round(max(overhead, 0.0), 6)},
            })
            self.stats.replies += 1
        finally:
            self._asks.pop(key, None)
            self._set_busy(-1)

    def _abort_asks(self) -> None:
        """At shutdown: every ask still open is answered with an error."""
        for record in list(self._asks.values()):
            if record.task is not None and not record.task.done():
                record.task.cancel()
                self.publish_error("shutting_down", "Jarvis is shutting down",
                                   correlation_id=record.command.id,
                                   topic=f"{self.topics.cmd_prefix}ask")

    def _cancel(self, command: CancelCommand) -> None:
        if command.target is not None:
            record = self._asks.get(("id", command.target))
            ok = record is not None and record.task is not None and not record.task.done()
            if ok and record is not None and record.task is not None:
                record.cancel_requested = True
                record.task.cancel()
        else:
            ok = self.assistant.cancel()
        self._result(command.id, "cancel", cancelled=ok)

    async def _serve(self, command: Command) -> None:
        name = "say" if isinstance(command, HermesSay) else (
            type(command).__name__.removesuffix("Command").lower())
        try:
            if isinstance(command, SayCommand):
                self._result(command.id, "say", spoken=await self.assistant.say(command.text))
            elif isinstance(command, HermesSay):
                await self.assistant.say(command.text)
                self._send(HERMES_SAY_FINISHED, {"id": command.id,
                                                 "siteId": command.site_id or self.settings.site,
                                                 "sessionId": command.session_id})
            elif isinstance(command, MuteCommand):
                await self.assistant.mute(command.mute)
                self._send(self.topics.muted, b"ON" if command.mute else b"OFF",
                           retain=True, coalesce=True)
                self._result(command.id, "mute", muted=command.mute)
            elif isinstance(command, ReloadCommand):
                self._result(command.id, "reload", reloaded=await self.assistant.reload())
        except JarvisError as exc:
            self.publish_error(f"{name}_failed", str(exc),
                               correlation_id=getattr(command, "id", None),
                               topic=f"{self.topics.cmd_prefix}{name}")
        except Exception as exc:
            log.exception("MQTT: %s failed", name)
            self.publish_error("internal_error", f"{type(exc).__name__}: {exc}"[:300],
                               correlation_id=getattr(command, "id", None))

    # ------------------------------------------------------------------ helpers

    def _result(self, correlation_id: CorrelationId, command: str, **details: Any) -> None:
        self._send(self.topics.result, {"id": correlation_id, "command": command, "ok": True,
                                        **details})

    def _set_busy(self, delta: int) -> None:
        self._busy += delta
        if not self.assistant.reports_state:
            state = "thinking" if self._busy else "idle"
            if state != self._state:
                self.publish_state(state)

    def _send(self, topic: str, payload: Any, *, qos: int | None = None, retain: bool = False,
              coalesce: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else dumps(payload)
        self._outbox.put(Outgoing(topic, data, self.qos if qos is None else qos, retain),
                         coalesce=coalesce)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _uncancel() -> None:
    """Forget a cancellation we asked for and handled (Python 3.11+ counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
