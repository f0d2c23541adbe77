"""One room: Jarvis drives its Wyoming satellite as Home Assistant would, and answers
what is said there through the one responder.

::

    connect ─ describe → info (must have a "satellite") ─ run-satellite ─┐
       ▲                                                                   │
       │ backoff 1 s, 2 s, ... JARVIS_SATELLITE_RECONNECT_MAX_S            ▼
       └── unavailable ◄── closed / flood / no audio / no pong ── audio-chunk ... → the
                                                                   room's voice pipeline

The satellite's audio goes through :class:`~jarvis.wyoming.room_audio.RoomAudio` to a
:class:`~jarvis.voice.pipeline.VoicePipeline` of the room's own (its endpointer, its
wake word gate, its conversation ``room:<name>``), which hands each request to the
responder. The reply goes back as ``audio-start``/``audio-chunk``/``audio-stop``;
``voice-started``, ``voice-stopped``, ``transcript`` and ``detection`` tell the
satellite what the hub heard (a satellite with its own wake word stops streaming at
the ``transcript``).

Two kinds of satellite: one that streams all the time (``run-pipeline`` from the wake
stage: the hub's wake word decides), and one with a wake word of its own, which
streams only after it (``run-pipeline`` from the asr stage: everything it sends is a
request). Satellites have no echo cancellation: while the room's reply plays, the hub
hears silence from it, and barge-in is off.

Whatever goes wrong with one room (a name that does not resolve, a satellite that
floods, goes silent, sends garbage or is killed) is logged with the room's name, marks
that room unavailable (an ``EventType.ROOM`` event: MQTT shows it) and is retried;
other rooms never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.satellite import RunSatellite

from jarvis.audio.echo import EchoReference
from jarvis.config import Settings
from jarvis.errors import JarvisError
from jarvis.speech.silero import Endpointer
from jarvis.speech.wakeword import is_bundled
from jarvis.voice.assembly import Assistant
from jarvis.voice.events import EventType, Source, TurnEvent
from jarvis.voice.listening import (
    AWAKE_S,
    FrontEnd,
    make_front_end,
    plan_listening,
    strip_wake_phrase,
)
from jarvis.voice.pipeline import VoicePipeline
from jarvis.wyoming.protocol import MAX_LINE_BYTES, ProtocolError, encode_event, read_event
from jarvis.wyoming.room_audio import FloodError, RoomAudio, RoomAudioError
from jarvis.wyoming.room_sink import RoomSpeaker, SatelliteSink

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
INFO_TIMEOUT_S = 5.0
PING_EVERY_S = 5.0
PONG_TIMEOUT_S = 10.0
"""A satellite that has answered pings and stops answering for this long is gone."""
STEADY_S = 10.0
"""A session that lasted this long resets the reconnection backoff."""
_IGNORED = frozenset({"streaming-started", "streaming-stopped", "satellite-connected",
                      "satellite-disconnected", "info", "transcript", "voice-started",
                      "voice-stopped", "synthesize", "timer-started", "timer-updated",
                      "timer-cancelled", "timer-finished"})
"""Event types a satellite may send that need nothing from the hub (logged at DEBUG);
the ones it acts on are handled in :meth:`RoomLink._read`."""


class RoomError(JarvisError):
    """Why a room's session ended (its satellite is unreachable or misbehaves)."""


def conversation_of(room: str) -> str:
    """The conversation id of ``room``'s turns (an MQTT ask may join it)."""
    return f"room:{room}"


@dataclass
class RoomStats:
    """What happened in a room, for logs, tests and benchmarks."""

    attempts: int = 0
    """Connections tried."""
    sessions: int = 0
    """Sessions started (a satellite connected, described itself and was run)."""
    ignored_events: int = 0
    early_audio: int = 0
    """Audio chunks sent before ``run-satellite`` (dropped)."""
    played: int = 0
    """Replies the satellite said it finished playing (``played``; not every satellite
    says so)."""


@dataclass
class _Listener:
    """A room's voice pipeline and how its speaker is heard."""

    pipeline: VoicePipeline
    reference: EchoReference | None
    """The echo canceller's far end (None without echo cancellation)."""
    half_duplex: bool
    """The microphone is heard as silence while a reply plays."""


class RoomLink:
    """Drives one satellite for as long as :meth:`run` runs (cancel it to stop)."""

    def __init__(self, name: str, uri: str, assistant: Assistant, settings: Settings) -> None:
        if assistant.asr is None or assistant.tts is None:
            raise JarvisError("satellites need speech: build the assistant with ASR and TTS")
        self.name = name
        self.uri = uri
        self.assistant = assistant
        self.settings = settings
        self.audio = RoomAudio(name)
        self.stats = RoomStats()
        self.available = False
        self.reason = "connecting"
        self.connected = asyncio.Event()
        """Set while a session is running (tests and benchmarks wait on it)."""
        self._writer: asyncio.StreamWriter | None = None
        self._pipelines: dict[tuple[bool, str], _Listener] = {}
        self._listener: _Listener | None = None
        self.speaker = RoomSpeaker(self.send, self.send_now, lambda: self.audio,
                                   self._reference, self._half_duplex)
        """The room's speaker: its satellite (what was sent: ``speaker.replies``)."""
        self._pipeline_task: asyncio.Task[None] | None = None
        self._running_key: tuple[bool, str] | None = None
        """The pipeline listening now (see :meth:`_pipeline_key`); None before the
        satellite streams."""
        self._wake_name = ""
        """The satellite's own wake word (from its ``detection``), if it has one."""
        self._expect_audio_since: float | None = None
        self._pong_at: float | None = None
        self._ping_at = 0.0
        self._unknown: set[str] = set()
        self._unsubscribe = assistant.bus.subscribe(self._on_event)
        self._released_at: float | None = None
        """A local-wake satellite's stream: when to give up on hearing a request."""
        self._failure = ""
        """Why the session is being ended from the hub's side ("" when it is not)."""
        self._published: tuple[bool, str] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, serve, and after any failure mark the room unavailable and try
        again with a growing wait."""
        self._publish(False, "connecting")
        delay = 1.0
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._session()
                    reason = self._failure or "the satellite closed the connection"
                except RoomError as exc:
                    reason = str(exc)
                except ProtocolError as exc:
                    reason = f"it sent something that is not Wyoming: {exc}"
                except (ConnectionError, OSError) as exc:
                    reason = f"the connection failed ({type(exc).__name__}: {exc})"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must end this session only
                    log.exception("room %s: internal error", self.name)
                    reason = f"internal error ({type(exc).__name__})"
                finally:
                    await self._end_session()
                if time.monotonic() - started >= STEADY_S:
                    delay = 1.0
                # Said once per reason: a satellite that stays away for a month must not
                # fill the log (the retries go on; DEBUG shows each).
                log.log(logging.DEBUG if reason == self.reason else logging.WARNING,
                        "room %s: unavailable: %s; trying %s again in %.0f s%s", self.name,
                        reason, self.uri, delay,
                        "" if reason == self.reason else " (and on, quietly, until it answers)")
                self._publish(False, reason)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.satellites.reconnect_max_s)
        finally:
            self._unsubscribe()

    async def _session(self) -> None:
        self.stats.attempts += 1
        reader, writer = await self._connect()
        self._writer, self._failure = writer, ""
        await self.send(Describe().event())
        await self._read_info(reader)
        await self.send(RunSatellite().event())
        self.audio = RoomAudio(self.name)
        self.stats.sessions += 1
        self.available = True
        self.connected.set()
        self._publish(True, "connected")
        log.info("room %s: satellite at %s is running", self.name, self.uri)
        tasks = {asyncio.create_task(self._watch()), asyncio.create_task(self._read(reader))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the reason the session ended
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        parts = urlsplit(self.uri)
        try:
            if parts.scheme == "unix":
                opened = asyncio.open_unix_connection(self.uri[len("unix://"):],
                                                      limit=MAX_LINE_BYTES)
            else:
                opened = asyncio.open_connection(parts.hostname, parts.port,
                                                 limit=MAX_LINE_BYTES)
            return await asyncio.wait_for(opened, CONNECT_TIMEOUT_S)
        except socket.gaierror as exc:
            raise RoomError(f"the host name {parts.hostname!r} does not resolve "
                            f"({exc.strerror}); check JARVIS_SATELLITES") from None
        except asyncio.TimeoutError:
            raise RoomError(f"{self.uri} did not answer within {CONNECT_TIMEOUT_S:g} s") \
                from None
        except OSError as exc:
            raise RoomError(f"cannot connect to {self.uri}: {exc.strerror or exc}") from None

    async def _read_info(self, reader: asyncio.StreamReader) -> None:
        deadline = time.monotonic() + INFO_TIMEOUT_S
        while True:
            try:
                event = await asyncio.wait_for(read_event(reader),
                                               max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RoomError(f"no answer to 'describe' within {INFO_TIMEOUT_S:g} s: is "
                                f"{self.uri} a Wyoming satellite?") from None
            if event is None:
                raise RoomError("the satellite closed the connection before describing "
                                "itself")
            if event.type == "info":
                satellite = event.data.get("satellite")
                if not isinstance(satellite, dict):
                    raise RoomError(f"{self.uri} is a Wyoming service but not a satellite "
                                    "(its info has no 'satellite'): point JARVIS_SATELLITES "
                                    "at wyoming-satellite or `jarvis satellite`")
                log.info("room %s: satellite %r (%s)", self.name, satellite.get("name"),
                         satellite.get("description") or "no description")
                return
            self._early(event)

    def _early(self, event: Event) -> None:
        """An event before ``run-satellite``: audio is dropped (counted, logged once)."""
        if event.type == "audio-chunk":
            if not self.stats.early_audio:
                log.warning("room %s: the satellite sends audio before it was asked to "
                            "run (before run-satellite); dropped", self.name)
            self.stats.early_audio += 1
        elif event.type == "ping":
            self.send_now(Pong(text=event.data.get("text")).event())
        else:
            self._note_unknown(event.type, before_run=True)

    async def _end_session(self) -> None:
        self.connected.clear()
        self.available = False
        self._running_key = self._listener = None
        self._expect_audio_since = None
        self._pong_at = None
        self._released_at = None
        self.audio.close()
        task, self._pipeline_task = self._pipeline_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    # ------------------------------------------------------------------ reading

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (event := await read_event(reader)) is not None:
            kind = event.type
            if kind == "audio-chunk":
                self._on_audio(event)
            elif kind == "run-pipeline":
                stage = event.data.get("start_stage")
                if isinstance(name := event.data.get("wake_word_name"), str):
                    self._wake_name = name
                self._start_stream(local_wake=stage == "asr")
            elif kind == "detection":  # its own wake word fired; a run-pipeline follows
                if isinstance(name := event.data.get("name"), str):
                    self._wake_name = name
            elif kind == "audio-start":
                self._expect_audio_since = self._expect_audio_since or time.monotonic()
            elif kind == "audio-stop":
                # The satellite ended its stream: whatever was being said is complete.
                self._expect_audio_since = None
                self.audio.silence(self.settings.vad.silence_ms / 1000 + 0.1)
            elif kind == "ping":
                self.send_now(Pong(text=event.data.get("text")).event())
            elif kind == "pong":
                self._pong_at = time.monotonic()
            elif kind == "played":  # the reply has been heard: the room listens again
                self.stats.played += 1
                self.audio.unmute()
            elif kind == "error":
                log.warning("room %s: the satellite reports an error: %s", self.name,
                            str(event.data.get("text"))[:200])
            elif kind in _IGNORED:
                log.debug("room %s: %s", self.name, kind)
            else:
                self._note_unknown(kind)

    def _on_audio(self, event: Event) -> None:
        data = event.data
        try:
            fmt = (int(data["rate"]), int(data["width"]), int(data["channels"]))
        except (KeyError, TypeError, ValueError):
            raise RoomError("an audio-chunk without a valid rate, width and channels") \
                from None
        if self._running_key is None:
            self._start_stream(local_wake=False)  # streaming without run-pipeline
        try:
            self.audio.feed(event.payload or b"", fmt)
        except (RoomAudioError, FloodError) as exc:
            raise RoomError(str(exc)) from None
        self._expect_audio_since = time.monotonic()

    def _note_unknown(self, kind: str, *, before_run: bool = False) -> None:
        self.stats.ignored_events += 1
        if kind not in self._unknown:
            self._unknown.add(kind)
            log.warning("room %s: ignoring %r from the satellite (%s)", self.name, kind[:60],
                        "sent before run-satellite" if before_run else "not an event a "
                        "satellite sends")

    # ------------------------------------------------------------------ the pipeline

    def _start_stream(self, *, local_wake: bool) -> None:
        """The satellite streams: with its own wake word (everything is a request) or
        all the time (the hub's wake word decides)."""
        self._expect_audio_since = time.monotonic()
        if local_wake:
            self._released_at = time.monotonic() + AWAKE_S
        key = self._pipeline_key(local_wake)
        if key == self._running_key and self._pipeline_task is not None:
            return
        if self._pipeline_task is not None:  # the other kind of stream: start over
            self._pipeline_task.cancel()
            self.audio.close()
            self.audio = RoomAudio(self.name)
        self._running_key = key
        self._pipeline_task = asyncio.create_task(self._listen(key))

    def _pipeline_key(self, local_wake: bool) -> tuple[bool, str]:
        """Which pipeline: a local-wake one knows the satellite's wake phrase (its
        pre-roll carries it: it is taken off the request)."""
        name = self._wake_name.strip().lower().replace(" ", "_")
        return (local_wake, name if local_wake and is_bundled(name) else "")

    def _reference(self) -> EchoReference | None:
        return self._listener.reference if self._listener is not None else None

    def _half_duplex(self) -> bool:
        return self._listener is None or self._listener.half_duplex

    async def _listen(self, key: tuple[bool, str]) -> None:
        listener = self._pipelines.get(key)
        if listener is None:
            listener = await asyncio.to_thread(self._make_pipeline, *key)
            self._pipelines[key] = listener
        self._listener = listener
        if listener.reference is not None:
            listener.reference.clear()
        audio = self.audio
        try:
            await listener.pipeline.run(audio.chunks(), SatelliteSink(self.speaker))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("room %s: the voice pipeline failed", self.name)
            self._failure = f"its voice pipeline failed ({type(exc).__name__}; see the log)"
            if self._writer is not None:
                self._writer.close()  # the session ends, the room reconnects

    def _make_pipeline(self, local_wake: bool, wake_model: str) -> _Listener:
        """The room's voice loop. Streaming all the time, it is the local microphone's:
        the hub's wake word, echo cancellation with the replies sent as the reference
        and barge-in as JARVIS_ECHO_CANCEL and JARVIS_BARGE_IN say (half duplex when
        there is no echo cancellation). After the satellite's own wake word, all it
        sends is the request, and speech over a reply (it woke again) interrupts it."""
        settings = self.settings
        pipeline_settings = settings.pipeline
        endpointer = Endpointer(settings.vad)
        front: FrontEnd
        reference: EchoReference | None = None
        if local_wake:
            # With no gate, the pipeline takes the wake phrase (in the satellite's
            # pre-roll) off the transcript.
            pipeline_settings = replace(pipeline_settings, wake_word=wake_model)
            front, barge_in, half_duplex = FrontEnd(endpointer), True, False
        else:
            plan = plan_listening(pipeline_settings, speaker=True, microphone=True)
            reference = EchoReference() if plan.echo_cancel else None
            front = make_front_end(plan, endpointer, reference,
                                   threshold=pipeline_settings.wake_threshold)
            barge_in, half_duplex = plan.barge_in, not plan.echo_cancel and not plan.barge_in
            log.info("room %s: %s", self.name, "; ".join(plan.lines()))
        asr = self.assistant.asr
        assert asr is not None
        pipeline = VoicePipeline(self.assistant.responder, asr, pipeline_settings,
                                 front_end=front, silence_ms=settings.vad.silence_ms,
                                 conversation_id=conversation_of(self.name),
                                 barge_in=barge_in, source=Source.SATELLITE, room=self.name)
        return _Listener(pipeline, reference, half_duplex)

    # ------------------------------------------------------------------ watchdog

    async def _watch(self) -> None:
        """Pings; a stream announced but silent; a local-wake stream with no request."""
        timeout = self.settings.satellites.audio_timeout_s
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now - self._ping_at >= PING_EVERY_S:
                self._ping_at = now
                self.send_now(Ping(text=str(int(now))).event())
            if self._pong_at is not None and now - self._pong_at > PONG_TIMEOUT_S:
                raise RoomError(f"the satellite stopped answering pings "
                                f"({now - self._pong_at:.0f} s without a pong)")
            since = self._expect_audio_since
            if since is not None and now - since > timeout:
                raise RoomError(f"the satellite announced its audio but sent none for "
                                f"{now - since:.0f} s (JARVIS_SATELLITE_AUDIO_TIMEOUT_S)")
            if self._released_at is not None and now > self._released_at:
                # Its wake word fired but nobody spoke: let it go back to its wake word.
                self._released_at = None
                self.send_now(Event("transcript", {"text": ""}))

    # ------------------------------------------------------------------ to the satellite

    def send_now(self, event: Event) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode_event(event))

    async def drain(self) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise ConnectionResetError("the satellite is gone")
        await writer.drain()

    async def send(self, event: Event) -> None:
        self.send_now(event)
        await self.drain()

    def _on_event(self, event: TurnEvent) -> None:
        """Tell the satellite what the hub heard in its room (as Home Assistant does)."""
        if event.room != self.name or self._writer is None:
            return
        kind = event.type
        if kind is EventType.SPEECH_STARTED:
            self._released_at = None
            self.send_now(Event("voice-started", {}))
        elif kind is EventType.SPEECH_ENDED:
            self.send_now(Event("voice-stopped", {}))
        elif kind is EventType.WAKE_WORD:
            self.send_now(Event("detection", {"name": str(event.data.get("phrase", ""))}))
        elif kind is EventType.TRANSCRIPT:
            local_wake, model = self._running_key or (False, "")
            phrase = model.replace("_", " ")
            if local_wake and phrase and not any(
                    c.isalnum() for c in strip_wake_phrase(event.text, phrase)):
                # The wake phrase alone ("hey jarvis ... what time is it"): the
                # transcript would stop its stream before the request; keep it open.
                self._released_at = time.monotonic() + AWAKE_S
                return
            self.send_now(Event("transcript", {"text": event.text}))

    def _publish(self, available: bool, reason: str) -> None:
        """Say the room came or went (once per change: retries do not repeat it)."""
        if self._published == (available, reason):
            return
        self._published = (available, reason)
        self.available, self.reason = available, reason
        self.assistant.bus.publish(TurnEvent(
            EventType.ROOM, source=Source.SATELLITE, conversation_id=conversation_of(self.name),
            room=self.name, data={"available": available, "reason": reason,
                                  "uri": self.uri}))
