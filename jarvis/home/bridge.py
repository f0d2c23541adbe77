"""The MQTT bridge: Jarvis on a home-automation bus (topics and JSON payloads are in
:mod:`jarvis.home.schema`, Home Assistant discovery in :mod:`jarvis.home.discovery`).

:class:`MqttBridge` connects to the broker (``JARVIS_MQTT_*``), serves the commands of
``<base>/cmd/+`` and Hermes ``hermes/tts/say`` by calling an :class:`MqttAssistant`, and
publishes replies, state, transcripts, errors, metrics and availability. Jarvis plugs in
as :class:`~jarvis.home.hub.MqttFrontend` (the one responder, with or without a voice),
which turns the responder's events into :meth:`MqttBridge.publish_state`,
:meth:`MqttBridge.publish_transcript` and :meth:`MqttBridge.publish_spoken_reply` calls
and sends device commands through :meth:`MqttBridge.publish_commands`.

Reliability:

* one connection at a time, reopened with exponential backoff and jitter, on a
  persistent MQTT 5 session (fixed client id, clean start off, QoS 1 subscriptions), so
  the broker keeps commands published while Jarvis is away, across a broker restart
  with persistence on;
* **a command is acknowledged only once it is answered** (:mod:`jarvis.home.inbox`):
  its answer is recorded in a bounded ledger on disk (:mod:`jarvis.home.ledger`), then
  published, and the command acknowledged when the broker has the answer. A command
  the broker delivers again is answered once: joined to its work while it is being
  answered, acknowledged silently when the ledger says it was answered. An ask's device
  commands are recorded before they are published, so an ask delivered again after a
  crash never publishes them twice (it is answered from the record);
* every command gets exactly one answer, whatever its bytes (a reply, a result, or an
  error on ``<base>/error``); no task ends unobserved;
* retained commands are never executed (the retain flag as the broker delivers it);
  commands older than ``JARVIS_MQTT_MAX_AGE_S`` by their ``sent_at`` get ``expired``;
* every ask runs in its own task (the LLM serves them in arrival order), so commands
  that arrive while Jarvis is busy wait their turn; outgoing messages wait in an
  outbox until the broker has them, across reconnects (device commands first);
* stopping drains: no new command is taken, the reply being generated (and any
  command that has acted) gets ``JARVIS_SHUTDOWN_GRACE_S`` to finish, the rest stay
  unacknowledged for the next process (no error is published for them), answers are
  flushed and ``offline`` is published. The last will publishes ``offline`` (retained)
  if Jarvis vanishes.

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
import contextvars
import logging
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jarvis import __version__
from jarvis.config import MqttSettings
from jarvis.devices.device_map import DeviceCommand
from jarvis.errors import JarvisError
from jarvis.home.discovery import discovery_messages, room_discovery_messages
from jarvis.home.inbox import Inbox, Work
from jarvis.home.ledger import Entry, Ledger
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

_CURRENT: contextvars.ContextVar[Work | None] = contextvars.ContextVar("mqtt_work",
                                                                      default=None)
"""The command an ask's task answers, so that the device commands its turn publishes
(:meth:`MqttBridge.publish_commands`, called from the responder) are recorded for it."""


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
    """Deliveries of a command already being answered or already answered."""
    redelivered: int = 0
    """Deliveries the broker flagged as sent before (after a reconnect or a crash)."""
    recovered: int = 0
    """Asks delivered again after acting, answered from the ledger."""
    expired: int = 0
    last_connected: float | None = None
    """``time.monotonic()`` of the last successful connection."""


class MqttBridge:
    """Jarvis on MQTT; see the module docstring. ``transport`` is the seam for tests;
    ``state_dir`` holds the ledger of answered commands (None: kept in memory)."""

    def __init__(self, settings: MqttSettings, assistant: MqttAssistant, *,
                 options: BridgeOptions | None = None,
                 transport: Transport | None = None,
                 state_dir: Path | None = None) -> None:
        self.settings = settings
        self.assistant = assistant
        self.options = options or BridgeOptions()
        self.topics = Topics(settings.base_topic, settings.discovery_prefix)
        self.qos = settings.qos
        self.state_dir = state_dir
        self._transport: Transport = transport or AiomqttTransport(
            settings, Will(self.topics.availability, b"offline", 1, True),
            keepalive=self.options.keepalive_s, timeout=self.options.connect_timeout_s,
            # Room for every ask that may wait, and for the commands behind them (a
            # cancel must not queue behind unacknowledged asks at the broker).
            receive_maximum=self.options.max_pending_asks + 100)
        self._outbox = Outbox(self.options.outbox_limit)
        self._backoff = Backoff(self.options.backoff_initial_s, self.options.backoff_max_s)
        self._inbox = Inbox()
        self._asks: dict[object, Work] = {}
        """Asks being answered, in arrival order, by ("id", id) (or the work itself)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._state = "idle"
        self._rooms: dict[str, dict[str, object]] = {}
        """The rooms seen so far and their last state and availability (re-announced
        on every connection)."""
        self._busy = 0
        self.stats = BridgeStats()
        self.connected = asyncio.Event()
        """Set while connected and subscribed."""

    # ------------------------------------------------------------------ public API

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (then drain, flush, announce ``offline``,
        disconnect)."""
        stop = stop or asyncio.Event()
        if self.state_dir is not None and not self._inbox.ledger.persistent:
            self._inbox.ledger = await asyncio.to_thread(Ledger, self.state_dir)
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
            for work in self._inbox.open_work():
                self._inbox.abandon(work)
            self._asks.clear()
            if lost := self._outbox.abandon():
                log.warning("MQTT: %d messages not delivered at shutdown (the commands "
                            "they answer will be answered again)", lost)
            self._inbox.ledger.close()

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
                             latency: Mapping[str, float], spoken: bool = True,
                             source: str = "microphone", room: str = "") -> None:
        """A reply to a request that did not come over MQTT (the microphone, Home
        Assistant over Wyoming), on ``<base>/reply`` with ``"id": null``; ``spoken``
        says whether Jarvis itself played it."""
        self._send(self.topics.reply, {
            "id": None, "text": text, "conversation_id": conversation_id,
            "cancelled": cancelled, "spoken": spoken, "source": source,
            **({"room": room} if room else {}),
            "actions": actions, "latency": dict(latency)})

    def publish_room(self, room: str, *, state: str | None = None,
                     available: bool | None = None, transcript: str | None = None,
                     seconds: float = 0.0, reply: Mapping[str, Any] | None = None) -> None:
        """A room's (satellite's) state, availability, transcript or reply on
        ``<base>/room/<room>/...``; the first time a room is seen its Home Assistant
        discovery goes out too."""
        known = self._rooms.get(room)
        if known is None:
            known = self._rooms[room] = {"state": "idle", "available": False}
            self._publish_room_discovery(room)
        if state is not None:
            if state not in STATES:
                raise ValueError(f"unknown state {state!r}")
            known["state"] = state
            self._send(self.topics.room(room, "state"), state.encode(), retain=True,
                       coalesce=True)
        if available is not None:
            known["available"] = available
            self._send(self.topics.room(room, "availability"),
                       b"online" if available else b"offline", retain=True, coalesce=True)
        if transcript is not None:
            self._send(self.topics.room(room, "transcript"),
                       {"text": transcript, "seconds": round(seconds, 3)})
        if reply is not None:
            self._send(self.topics.room(room, "reply"), dict(reply))

    def publish_commands(self, commands: Sequence[DeviceCommand]) -> None:
        """Send device commands (ahead of anything else queued). Called from an MQTT
        ask's turn, they are recorded for the ask first: were Jarvis to die before the
        ask is acknowledged, the ask delivered again is answered from the record and
        the commands are not published a second time."""
        work = _CURRENT.get()
        if work is not None and not work.finished and commands:
            self._inbox.acted(work, [c.describe() for c in commands],
                              " ".join(c.reply for c in commands))
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
        """An error that answers no command (a failed stage of a spoken turn)."""
        self._send(self.topics.error, self._error_payload(code, message, correlation_id,
                                                          topic, size))

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
            # Commands at QoS 1 at most: after a QoS 2 message's PUBREC the broker never
            # delivers it again, so a crash before its answer would lose it.
            for topic in (self.topics.cmd_filter, HERMES_SAY):
                await conn.subscribe(topic, min(self.qos, 1))
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
                receiver.cancel()  # no new commands: what is not taken stays at the broker
                await self._drain()
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

    async def _drain(self) -> None:
        """Stopping: the ask being answered (the oldest: the model serves them in
        order), any command that has acted and the quick commands get
        ``JARVIS_SHUTDOWN_GRACE_S`` to finish; the asks still waiting are left
        unanswered and unacknowledged, for the broker to deliver to the next process."""
        grace = self.settings.shutdown_grace_s
        running = [w for w in self._inbox.open_work() if w.task is not None and not w.task.done()]
        asks = [w for w in running if isinstance(w.command, AskCommand)]
        keep = [w for w in running if w.acted or not isinstance(w.command, AskCommand)
                or (asks and w is asks[0])]
        leave = [w for w in running if w not in keep]
        for work in leave:
            self._inbox.abandon(work)
            if work.task is not None:
                work.task.cancel()
        if keep or leave:
            log.info("MQTT: stopping: %d command(s) in progress get up to %g s to finish; "
                     "%d left for the next start", len(keep), grace, len(leave))
        tasks = {w.task for w in keep if w.task is not None}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            if late:
                log.warning("MQTT: %d command(s) did not finish within "
                            "JARVIS_SHUTDOWN_GRACE_S=%g s; left for the next start",
                            len(late), grace)
            for work in keep:
                if work.task in late:
                    self._inbox.abandon(work)
                    work.task.cancel()
        pending = [w.task for w in running if w.task is not None]
        await asyncio.gather(*pending, return_exceptions=True)

    async def _receive(self, conn: Connection) -> None:
        async for message in conn.messages():
            self._dispatch(conn, message, time.perf_counter())

    async def _publish_loop(self, conn: Connection) -> None:
        while True:
            item = await self._outbox.get()
            try:
                await conn.publish(item.topic, item.payload, item.qos, item.retain)
            except BaseException:
                self._outbox.requeue(item)
                raise
            self._outbox.done(item)

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
        for room, known in self._rooms.items():
            self._send(self.topics.room(room, "state"), str(known["state"]).encode(),
                       retain=True, coalesce=True)
            self._send(self.topics.room(room, "availability"),
                       b"online" if known["available"] else b"offline", retain=True,
                       coalesce=True)
        self.publish_metrics()

    def _publish_discovery(self) -> None:
        for topic, config in discovery_messages(
            self.topics, client_id=self.settings.client_id, site=self.settings.site,
            version=__version__,
        ):
            self._send(topic, config, qos=1, retain=True, coalesce=True)
        for room in self._rooms:
            self._publish_room_discovery(room)

    def _publish_room_discovery(self, room: str) -> None:
        for topic, config in room_discovery_messages(
            self.topics, room, client_id=self.settings.client_id, version=__version__,
        ):
            self._send(topic, config, qos=1, retain=True, coalesce=True)

    # ------------------------------------------------------------------ commands

    def _dispatch(self, conn: Connection, message: Received, received_at: float) -> None:
        """Take one message: every path answers it once (or deliberately not at all)
        and acknowledges it once answered; nothing here may raise."""
        self.stats.received += 1
        try:
            if message.topic == self.topics.ha_status:
                if message.payload.strip() == b"online":
                    self._publish_discovery()
                conn.ack(message)
                return
            if message.retain and not message.payload:
                conn.ack(message)  # a retained command being cleared: nothing to run
                return
        except Exception:
            log.exception("MQTT: handling a message on %s failed", message.topic)
            return
        work = self._inbox.receive(conn, message, received_at)
        self.stats.redelivered = self._inbox.redelivered
        self.stats.duplicates = self._inbox.duplicates
        if work is None:
            return
        try:
            self._handle(work, message)
        except Exception as exc:  # one bad message must not take the bridge down
            log.exception("MQTT: handling a message on %s failed", message.topic)
            self._error(work, "internal_error", f"{type(exc).__name__}: {exc}"[:300])

    def _handle(self, work: Work, message: Received) -> None:
        try:
            command = parse_command(message.topic, message.payload, self.topics,
                                    retain=message.retain, site=self.settings.site)
        except PayloadError as exc:
            self._error(work, exc.code, exc.message, exc.correlation_id,
                        size=len(message.payload))
            return
        if command is None:
            self._inbox.ignore(work)  # a Hermes say for another site
            return
        work.command = command
        if work.entry is not None and isinstance(command, AskCommand):
            self._recovered(work, command, work.entry)
            return
        if not isinstance(command, HermesSay) and self._stale(work, command):
            return
        if isinstance(command, AskCommand):
            self._start_ask(work, command)
        elif isinstance(command, CancelCommand):
            self._cancel(work, command)
        elif isinstance(command, MetricsCommand):
            self.publish_metrics()
            self._result(work, "metrics")
        else:
            work.task = self._spawn_work(work, self._serve(work, command))

    def _stale(self, work: Work, command: Command) -> bool:
        """True (and answered ``expired``) when ``sent_at`` says it is too old to act on."""
        max_age = self.settings.max_age_s
        sent_at = getattr(command, "sent_at", None)
        if sent_at is None or max_age <= 0:
            return False
        age = time.time() - sent_at
        cid = getattr(command, "id", None)
        if age > max_age:
            self.stats.expired += 1
            self._error(work, "expired", f"sent {age:,.0f} s ago, more than "
                        f"JARVIS_MQTT_MAX_AGE_S={max_age:g} s: not acted on", cid)
            return True
        if -age > max_age:
            self._error(work, "invalid_payload", f"'sent_at' is {-age:,.0f} s in the future: "
                        "send seconds since 1970 (UTC) or an ISO 8601 time with its zone", cid)
            return True
        return False

    def _recovered(self, work: Work, command: AskCommand, entry: Entry) -> None:
        """An ask delivered again after its device commands went out (Jarvis stopped or
        died before answering it): answered from the ledger, nothing published again."""
        self.stats.recovered += 1
        log.info("MQTT: ask %r acted before a restart: answered from the record, its "
                 "device commands not sent again", command.id)
        self._answer(work, self.topics.reply, {
            "id": command.id, "text": entry.text, "conversation_id": command.conversation_id,
            "cancelled": False, "spoken": False, "actions": list(entry.actions),
            "latency": {"intent": "recovered"}, "recovered": True})
        self.stats.replies += 1

    def _start_ask(self, work: Work, command: AskCommand) -> None:
        key: object = ("id", command.id) if command.id is not None else work
        running = self._asks.get(key)
        if running is not None:  # the same ask again while it is being answered
            log.debug("MQTT: ask %r is already being answered; answered once", command.id)
            self._inbox.merge(work, running)
            self.stats.duplicates = self._inbox.duplicates
            return
        if len(self._asks) >= self.options.max_pending_asks:
            self._error(work, "busy", f"{len(self._asks)} asks are waiting; try again later",
                        command.id)
            return
        self.stats.asks += 1
        self._asks[key] = work
        self._set_busy(+1)
        work.task = self._spawn_work(work, self._serve_ask(key, work, command))

    async def _serve_ask(self, key: object, work: Work, command: AskCommand) -> None:
        _CURRENT.set(work)
        try:
            try:
                answer = await self.assistant.ask(
                    command.text, conversation_id=command.conversation_id,
                    speak=command.speak, max_tokens=command.max_tokens)
            except asyncio.CancelledError:
                if not work.cancel_requested:
                    raise
                _uncancel()
                answer = Answer("", {"finish_reason": "cancelled"}, cancelled=True)
            except JarvisError as exc:
                self._error(work, getattr(exc, "code", "ask_failed"), str(exc), command.id)
                return
            except Exception as exc:
                log.exception("MQTT: ask %r failed", command.id)
                self._error(work, "internal_error", f"{type(exc).__name__}: {exc}"[:300],
                            command.id)
                return
            overhead = time.perf_counter() - work.received_at - answer.backend_s
            self._answer(work, self.topics.reply, {
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
            if self._asks.get(key) is work:
                del self._asks[key]
            self._set_busy(-1)

    def _cancel(self, work: Work, command: CancelCommand) -> None:
        if command.target is not None:
            target = self._asks.get(("id", command.target))
            ok = target is not None and target.task is not None and not target.task.done()
            if ok and target is not None and target.task is not None:
                target.cancel_requested = True
                target.task.cancel()
        else:
            ok = self.assistant.cancel()
        self._result(work, "cancel", cancelled=ok)

    async def _serve(self, work: Work, command: Command) -> None:
        name = "say" if isinstance(command, HermesSay) else (
            type(command).__name__.removesuffix("Command").lower())
        cid = getattr(command, "id", None)
        try:
            if isinstance(command, SayCommand):
                self._result(work, "say", spoken=await self.assistant.say(command.text))
            elif isinstance(command, HermesSay):
                await self.assistant.say(command.text)
                self._answer(work, HERMES_SAY_FINISHED, {
                    "id": command.id, "siteId": command.site_id or self.settings.site,
                    "sessionId": command.session_id})
            elif isinstance(command, MuteCommand):
                await self.assistant.mute(command.mute)
                self._send(self.topics.muted, b"ON" if command.mute else b"OFF",
                           retain=True, coalesce=True)
                self._result(work, "mute", muted=command.mute)
            elif isinstance(command, ReloadCommand):
                self._result(work, "reload", reloaded=await self.assistant.reload())
        except JarvisError as exc:
            self._error(work, f"{name}_failed", str(exc), cid)
        except Exception as exc:
            log.exception("MQTT: %s failed", name)
            self._error(work, "internal_error", f"{type(exc).__name__}: {exc}"[:300], cid)

    # ------------------------------------------------------------------ answers

    def _answer(self, work: Work, topic: str, payload: Any) -> None:
        """The one answer to ``work``: recorded, queued, and the command acknowledged
        once the broker has it. A second answer is dropped (and logged)."""
        receipt = self._inbox.finish(work)
        if receipt is None:
            log.warning("MQTT: a second answer for a command on %s was not sent", work.topic)
            return
        data = payload if isinstance(payload, bytes) else dumps(payload)
        self._outbox.put(Outgoing(topic, data, self.qos, False, receipt))

    def _error(self, work: Work, code: str, message: str, correlation_id: CorrelationId = None,
               *, size: int | None = None) -> None:
        if work.finished:
            return
        self._answer(work, self.topics.error,
                     self._error_payload(code, message, correlation_id, work.topic, size))

    def _error_payload(self, code: str, message: str, correlation_id: CorrelationId,
                       topic: str | None, size: int | None) -> dict[str, Any]:
        self.stats.errors += 1
        log.info("MQTT: %s on %s: %s", code, topic or "-", message)
        payload: dict[str, Any] = {"code": code, "message": message, "topic": topic,
                                   "id": correlation_id}
        if size is not None:
            payload["bytes"] = size
        return payload

    def _result(self, work: Work, command: str, **details: Any) -> None:
        self._answer(work, self.topics.result, {"id": getattr(work.command, "id", None),
                                                "command": command, "ok": True, **details})

    # ------------------------------------------------------------------ helpers

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
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """Every task's end is observed: a failure is logged, never left unretrieved."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("MQTT: a task failed: %s: %s", type(exc).__name__, exc, exc_info=exc)

    def _spawn_work(self, work: Work, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` to answer ``work``; if it ends without an answer (a bug), the
        command still gets one: ``internal_error``."""
        task = self._spawn(coro)

        def ended(done: asyncio.Task[None]) -> None:
            if done.cancelled() or work.finished:
                return
            exc = done.exception()
            why = f"{type(exc).__name__}: {exc}"[:300] if exc else "no answer was given"
            self._error(work, "internal_error", why, getattr(work.command, "id", None))

        task.add_done_callback(ended)
        return task


def _uncancel() -> None:
    """Forget a cancellation we asked for and handled (Python 3.11+ counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()
