"""The seam between the bridge and an MQTT client library.

:class:`Transport` opens one connection at a time as an async context manager; the
bridge reconnects by opening it again. :class:`AiomqttTransport` is the real one
(aiomqtt over paho-mqtt, MQTT 5 with a persistent session: a fixed client id, clean
start off and a session that never expires, so QoS 1 commands published while Jarvis
is away are kept by the broker). A fresh ``aiomqtt.Client`` is made per connection;
messages it had already received are still handed out before the loss of the
connection is reported.

**Acknowledgement is the bridge's**: paho's manual acknowledgement is on (aiomqtt does
not expose it; :class:`_Client` turns it on in the paho client it wraps), so a QoS 1
command is acknowledged (PUBACK) only when the bridge calls :meth:`Connection.ack`,
once it is answered. Until then the broker holds it and delivers it again, flagged
``dup``, after a reconnect, to the same process or to the next one after a crash.
Subscriptions keep the retain flag as published (MQTT 5 "retain as published"), so a
retained command is recognised even when it arrives live, and ask for retained
messages only when the subscription is new, so a persistent session is not sent the
same retained message on every reconnect. A broker that refuses MQTT 5 is spoken to in
MQTT 3.1.1 instead (clean session off), with a warning: there a retained command is
recognised only when it comes with a new subscription.

:class:`Outbox` holds outgoing messages until the broker has them, across reconnects,
and tells each message's sender whether it got there (:attr:`Outgoing.receipt`).

Foreign errors become :class:`~jarvis.home.schema.MqttConnectionError` (or
:class:`~jarvis.home.schema.MqttAuthError` when the broker refuses the credentials).
No message ever contains the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from jarvis.config import MqttSettings
from jarvis.home.schema import MqttAuthError, MqttConnectionError

log = logging.getLogger(__name__)

# CONNACK refusals that retrying will not fix (MQTT 3.1.1 codes 2, 4, 5 and their
# MQTT 5 reason codes): bad client id, bad user name or password, not authorized.
_AUTH_CODES = {2, 4, 5, 133, 134, 135}
_OLD_BROKER_CODES = {1, 132}
"""CONNACK "unacceptable protocol version" (MQTT 3.1.1) / "unsupported protocol version"."""
NEVER_EXPIRES = 0xFFFFFFFF
"""MQTT 5 session expiry interval: the broker keeps the session (subscriptions and the
commands queued for it) until Jarvis connects again, as MQTT 3.1.1's clean session off."""


@dataclass(frozen=True)
class Received:
    """One incoming message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    """Retained as published (a retained message, live or sent on subscribing)."""
    mid: int = 0
    """Its packet id (QoS 1 and 2): a message delivered again keeps it."""
    dup: bool = False
    """Delivered before and not acknowledged: this is a redelivery."""


class Connection(Protocol):
    async def subscribe(self, topic: str, qos: int) -> None: ...

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Returns once the broker has the message (PUBACK for QoS 1)."""

    def messages(self) -> AsyncIterator[Received]:
        """Incoming messages; raises :class:`MqttConnectionError` when the connection is
        lost (after the messages already received)."""

    def ack(self, message: Received) -> None:
        """Acknowledge ``message`` (a PUBACK): the broker forgets it. A QoS 1 message is
        never acknowledged otherwise; one that this connection received but that is
        not acknowledged before it closes is delivered again (``dup``) on the next. A
        no-op for QoS 0 and once this connection is closed."""


class Transport(Protocol):
    def connect(self) -> AbstractAsyncContextManager[Connection]:
        """Connect (raising MqttConnectionError/MqttAuthError); leaving the context
        disconnects cleanly, so the last will is not sent."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay is uniformly drawn from
    [d/2, d], d = min(maximum, initial * 2**n). Jitter keeps many satellites from
    reconnecting in lockstep after a broker restart."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial, self.maximum = initial, maximum
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    receipt: Callable[[bool], None] | None = field(default=None, compare=False)
    """Called once: True when the broker has the message, False when it is given up
    (dropped from a full outbox, or still queued when the bridge stops)."""


class Outbox:
    """Messages waiting for the broker: urgent (device commands), then ordinary ones in
    order, then the latest value of each state-like retained topic. Each message's
    ``receipt`` says whether it got there."""

    def __init__(self, limit: int) -> None:
        self._urgent: deque[Outgoing] = deque()
        self._normal: deque[Outgoing] = deque()
        self._latest: dict[str, Outgoing] = {}
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = False
        self.limit = limit
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._urgent) + len(self._normal) + len(self._latest)

    def put(self, item: Outgoing, *, urgent: bool = False, coalesce: bool = False) -> None:
        if urgent:
            self._urgent.append(item)
        elif coalesce:
            replaced = self._latest.pop(item.topic, None)
            if replaced is not None:
                _receipt(replaced, False)
            self._latest[item.topic] = item
        else:
            if len(self._normal) >= self.limit:
                _receipt(self._normal.popleft(), False)
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.warning("MQTT outbox full: %d old messages dropped", self.dropped)
            self._normal.append(item)
        self._idle.clear()
        self._wakeup.set()

    def requeue(self, item: Outgoing) -> None:
        """Put back a message whose publication did not complete."""
        self._urgent.appendleft(item)
        self._inflight = False
        self._idle.clear()
        self._wakeup.set()

    async def get(self) -> Outgoing:
        while not len(self):
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._urgent:
            item = self._urgent.popleft()
        elif self._normal:
            item = self._normal.popleft()
        else:
            item = self._latest.pop(next(iter(self._latest)))
        self._inflight = True
        return item

    def done(self, item: Outgoing) -> None:
        """``item`` (the last one from :meth:`get`) is with the broker."""
        self._inflight = False
        if not len(self):
            self._idle.set()
        _receipt(item, True)

    def abandon(self) -> int:
        """Give up every message still queued (the bridge is stopping); returns how many."""
        items = [*self._urgent, *self._normal, *self._latest.values()]
        self._urgent.clear()
        self._normal.clear()
        self._latest.clear()
        self._inflight = False
        self._idle.set()
        for item in items:
            _receipt(item, False)
        return len(items)

    async def drained(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def _receipt(item: Outgoing, delivered: bool) -> None:
    if item.receipt is not None:
        try:
            item.receipt(delivered)
        except Exception:  # a sender's bug must not stop the outbox
            log.exception("MQTT: the receipt for a message on %s failed", item.topic)


class _Message(aiomqtt.Message):
    """aiomqtt's message with paho's ``dup`` flag, which aiomqtt leaves out."""

    dup: bool = False


class _Client(aiomqtt.Client):
    """aiomqtt's client with paho's manual acknowledgement (:meth:`ack`) and the ``dup``
    flag of incoming messages, failing a connection attempt as soon as the connection
    is lost before the broker's CONNACK.

    aiomqtt 2.5 ignores a disconnection that comes before the CONNACK and waits out
    its whole timeout instead: a broker that refuses the TLS handshake (no client
    certificate), or one going down just after accepting the TCP connection, cost
    ``connect_timeout_s`` per attempt. Here the attempt fails at once with the reason.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client.manual_ack_set(True)

    def ack(self, mid: int, qos: int) -> None:
        """PUBACK (PUBCOMP for QoS 2) for the message ``mid``, if still connected."""
        if qos > 0 and not self._disconnected.done():
            self._client.ack(mid, qos)

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        received = _Message._from_paho_message(message)
        received.dup = bool(message.dup)
        try:
            self._queue.put_nowait(received)
        except asyncio.QueueFull:  # the queue is unbounded: never
            log.warning("MQTT: incoming queue full; a message waits for redelivery")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None = None) -> None:
        if not self._disconnected.done() and not self._connected.done():
            self._connected.set_exception(aiomqtt.MqttCodeError(
                reason_code, "Connection lost before the broker answered"))
            return
        super()._on_disconnect(client, userdata, flags, reason_code, properties)


class _AiomqttConnection:
    def __init__(self, client: _Client, *, mqtt5: bool = True) -> None:
        self._client = client
        self._mqtt5 = mqtt5

    async def subscribe(self, topic: str, qos: int) -> None:
        try:
            if self._mqtt5:
                granted = await self._client.subscribe(topic, options=SubscribeOptions(
                    qos=qos, retainAsPublished=True,
                    retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
            else:
                granted = await self._client.subscribe(topic, qos)
        except aiomqtt.MqttError as exc:
            raise MqttConnectionError(f"subscribe to {topic} failed: {exc}") from None
        refused = [code for code in granted if (code.is_failure if isinstance(code, ReasonCode)
                                                else code >= 0x80)]
        if refused:
            raise MqttConnectionError(f"the broker refused the subscription to {topic} "
                                      f"({refused[0]})")

    def ack(self, message: Received) -> None:
        self._client.ack(message.mid, message.qos)

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise MqttConnectionError(f"publish to {topic} failed: {exc}") from None

    async def messages(self) -> AsyncIterator[Received]:
        try:
            async for message in self._client.messages:
                payload = message.payload
                yield Received(
                    message.topic.value,
                    payload if isinstance(payload, bytes) else str(payload or "").encode(),
                    message.qos,
                    bool(message.retain),
                    message.mid,
                    bool(getattr(message, "dup", False)),
                )
        except aiomqtt.MqttError as exc:
            raise MqttConnectionError(f"connection lost: {exc}") from None


class AiomqttTransport:
    """The real transport. ``settings`` supply host, port, credentials, TLS and client id;
    ``receive_maximum`` is how many unacknowledged QoS 1 commands the broker may have
    out to Jarvis at once (those beyond wait at the broker)."""

    def __init__(self, settings: MqttSettings, will: Will, *, keepalive: int = 30,
                 timeout: float = 10.0, receive_maximum: int = 1000) -> None:
        self.settings = settings
        self.will = will
        self.keepalive = keepalive
        self.timeout = timeout
        self.receive_maximum = max(1, min(receive_maximum, 65535))
        self.mqtt5 = True
        """False once a broker has refused MQTT 5 (then MQTT 3.1.1, clean session off)."""
        self.paho_logger = logging.getLogger("jarvis.home.bridge.paho")

    def _client(self) -> _Client:
        s = self.settings
        tls = None
        if s.tls_ca is not None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(s.tls_ca),
                certfile=str(s.tls_cert) if s.tls_cert else None,
                keyfile=str(s.tls_key) if s.tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        session: dict[str, Any] = {"protocol": aiomqtt.ProtocolVersion.V311,
                                   "clean_session": False}
        if self.mqtt5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = NEVER_EXPIRES
            properties.ReceiveMaximum = self.receive_maximum
            session = {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False,
                       "properties": properties}
        return _Client(
            s.host, s.port,
            username=s.username or None,
            password=s.password or None,
            identifier=s.client_id,
            **session,
            will=aiomqtt.Will(self.will.topic, self.will.payload, self.will.qos,
                              self.will.retain),
            keepalive=self.keepalive,
            timeout=self.timeout,
            tls_params=tls,
            logger=self.paho_logger,
            # Without it Nagle's algorithm holds small packets (a PUBACK, a reply) for
            # the peer's delayed ACK: about 40 ms per hop on Linux.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        client = self._client()
        watched = _read_failures(client, self.settings.password)
        try:
            async with client:
                # aiomqtt replaces its futures while connecting: watch the new ones too.
                watched = _read_failures(client, self.settings.password, watched)
                yield _AiomqttConnection(client, mqtt5=self.mqtt5)
        except aiomqtt.MqttCodeError as exc:
            reason = _reason(exc, self.settings.password)
            code = getattr(exc.rc, "value", exc.rc)
            refused = isinstance(exc, aiomqtt.exceptions.MqttConnectError)
            if refused and code in _OLD_BROKER_CODES and self.mqtt5:
                self.mqtt5 = False
                log.warning("MQTT: the broker %s does not speak MQTT 5 (%s); using MQTT 3.1.1: "
                            "a command published retained while Jarvis listens then looks "
                            "like any other, and the broker's max_inflight_messages (20 on "
                            "mosquitto) limits the commands waiting for an answer",
                            self._where(), reason)
            if refused and code in _AUTH_CODES:
                raise MqttAuthError(
                    f"the broker {self._where()} refused the connection ({reason}): check "
                    "JARVIS_MQTT_USERNAME, JARVIS_MQTT_PASSWORD and JARVIS_MQTT_CLIENT_ID"
                ) from None
            raise MqttConnectionError(f"{self._where()}: {reason}") from None
        except aiomqtt.MqttError as exc:
            reason = _reason(exc, self.settings.password)
            raise MqttConnectionError(f"{self._where()}: {reason}") from None
        finally:
            _read_failures(client, self.settings.password, watched)

    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"


def _read_failures(client: aiomqtt.Client, secret: str,
                   watched: tuple[asyncio.Future[object], ...] = ()
                   ) -> tuple[asyncio.Future[object], ...]:
    """Make sure the reason a connection ended is read, whoever reads it.

    aiomqtt 2.5 records a lost connection as the exception of a future
    (``Client._disconnected``; a refused or late CONNACK on ``Client._connected``) that
    only message iteration, a failing publish or ``__aenter__`` reads. When the broker
    goes away while nobody is reading (during the subscriptions after a reconnect, or
    once our publisher has already failed), ``__aexit__`` returns without reading it and
    asyncio logs ``ERROR asyncio: Future exception was never retrieved`` when the client
    is collected. The bridge learns of the loss through the error it does get, so here
    the reason is only logged at debug level. Returns the futures watched so far
    (``watched`` and the new ones), so that each is read once."""
    futures = list(watched)
    for name in ("_connected", "_disconnected"):
        future = getattr(client, name, None)
        if not isinstance(future, asyncio.Future) or any(f is future for f in futures):
            continue
        futures.append(future)

        def read(done: asyncio.Future[object]) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                log.debug("MQTT: connection ended: %s", _reason(exc, secret))

        future.add_done_callback(read)
    return tuple(futures)


def _reason(exc: BaseException, secret: str) -> str:
    """The error text, shortened; aiomqtt/paho messages name codes and socket errors
    only, and the password is masked should one ever appear."""
    text = (str(exc) or type(exc).__name__)[:200]
    return text.replace(secret, "********") if secret else text
