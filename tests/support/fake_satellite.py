"""A scripted Wyoming satellite *server* for fault injection: the hub connects to it as
its controller, as it would to a real ``wyoming-satellite``.

    sat = FakeSatellite(normal(audio), name="kitchen")
    port = await sat.start()
    ...                                   # the hub connects to 127.0.0.1:port
    await sat.wait_for("run-satellite")
    reply = await sat.wait_for_reply(timeout=30)
    await sat.stop()

It answers ``describe`` with an ``info`` holding a ``satellite`` (its name), ``ping``
with ``pong`` (the same ``text``), starts its :class:`Behaviour` on ``run-satellite``
(once per connection; ``pause-satellite`` stops it) and records every event the hub
sends (:attr:`FakeSatellite.received`), the reply audio grouped by
``audio-start``/``audio-stop`` (:attr:`FakeSatellite.replies`), and monotonic times of
what it sent (:attr:`FakeSatellite.marks`).

Behaviours (see the factory functions): :func:`normal`, :func:`unknown_events`,
:func:`audio_before_run`, :func:`flood`, :func:`silent`, :func:`rate_48k_stereo`.
Like the real ``wyoming-satellite`` 1.0.0 they stream ``audio-chunk`` events only, no
``audio-start``/``audio-stop`` (``Normal.send_audio_start`` adds an ``audio-start``).
:meth:`FakeSatellite.kill` drops every connection mid-stream, as a satellite that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.info import Attribution, Info, Satellite
from wyoming.pipeline import PipelineStage, RunPipeline

from jarvis.wyoming.protocol import MAX_LINE_BYTES, ProtocolError, encode_event, read_event
from tests.support.sat_mic import resample, to_int16, voiced_span

RATE = 16000
"""The rate of the audio the behaviours are given."""
CHUNK_FRAMES = 1024
WIDTH = 2

Int16Array = npt.NDArray[np.int16]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Received:
    """An event the hub sent, when (``time.monotonic()``) and on which connection
    (1, 2, ... in order of acceptance)."""

    event: Event
    t: float
    connection: int


@dataclass
class Reply:
    """Audio the hub sent: from an ``audio-start`` (or a first ``audio-chunk`` without
    one) to the ``audio-stop``."""

    rate: int
    width: int
    channels: int
    connection: int
    started_at: float
    audio: bytearray = field(default_factory=bytearray)
    first_chunk_at: float | None = None
    stopped_at: float | None = None
    had_audio_start: bool = True

    @property
    def complete(self) -> bool:
        """True once the ``audio-stop`` came."""
        return self.stopped_at is not None

    @property
    def seconds(self) -> float:
        """The length of :attr:`audio`."""
        return len(self.audio) / (self.rate * self.width * self.channels)


# --------------------------------------------------------------------------- connection


class Link:
    """One hub connection: writes whole events, so the stream task and the answers to
    the hub never interleave bytes."""

    def __init__(self, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.reader, self.writer = reader, writer
        self.stream_task: asyncio.Task[None] | None = None

    async def send(self, event: Event) -> None:
        """Write ``event`` and wait until the socket buffer drains."""
        self.writer.write(encode_event(event))
        await self.writer.drain()

    def abort(self, reset: bool) -> None:
        """Close the socket at once, dropping what is unsent (with ``reset``, an RST)."""
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def stop_stream(self) -> None:
        if self.stream_task is not None:
            self.stream_task.cancel()


# --------------------------------------------------------------------------- behaviours


class Behaviour:
    """What the satellite does besides answering: hooks called by
    :class:`FakeSatellite`. Subclasses override :meth:`on_connect` (runs before the
    hub's events are read) and :meth:`on_run` (runs as a task from ``run-satellite``
    until the connection ends or ``pause-satellite``)."""

    async def on_connect(self, sat: FakeSatellite, link: Link) -> None:
        """Right after the hub connects."""

    async def on_run(self, sat: FakeSatellite, link: Link) -> None:
        """After ``run-satellite``."""


def run_pipeline_event(start: PipelineStage = PipelineStage.WAKE) -> Event:
    """What wyoming-satellite sends on ``run-satellite`` when it streams always and has a
    speaker: ``run-pipeline`` from wake to tts (from asr: after its own wake word)."""
    return RunPipeline(start_stage=start, end_stage=PipelineStage.TTS).event()


UNKNOWN_EVENTS = (
    Event(type="frobnicate", data={"level": 11, "nested": {"list": [1, 2, 3]}},
          payload=b"\x00\x01not audio\xff"),
    Event(type="x-vendor-led", data={"color": "blue"}),
    Event(type="satellite-frobnicated"),
)
"""Events no Wyoming peer knows: with data and a payload, with data, bare."""


@dataclass
class Normal(Behaviour):
    """On ``run-satellite``: ``run-pipeline`` (wake → tts), then ``audio`` as 1024-frame
    ``audio-chunk`` events paced in real time, then silent chunks in real time until the
    connection ends. ``audio`` is 16 kHz mono (int16, or floats in [-1, 1]); it is sent
    at ``rate`` with ``channels`` identical channels. ``unknown_every`` > 0 slips an
    unknown event in every that many chunks; ``unknown_first`` sends
    :data:`UNKNOWN_EVENTS` on connect and before ``run-pipeline``."""

    audio: Int16Array
    rate: int = RATE
    channels: int = 1
    lead_s: float = 0.0
    send_audio_start: bool = False
    unknown_first: bool = False
    unknown_every: int = 0
    local_wake: bool = False
    """Like wyoming-satellite with a wake word of its own: ``detection``, then
    ``run-pipeline`` from asr and ``audio-start``, the audio, until the hub's
    ``transcript``; then ``audio-stop`` and nothing more."""

    def __post_init__(self) -> None:
        self.audio = as_int16(self.audio)

    async def on_connect(self, sat: FakeSatellite, link: Link) -> None:
        if self.unknown_first:
            await link.send(UNKNOWN_EVENTS[0])

    async def on_run(self, sat: FakeSatellite, link: Link) -> None:
        if self.unknown_first:
            for event in UNKNOWN_EVENTS:
                await link.send(event)
        if self.local_wake:
            await link.send(Event(type="detection", data={"name": "hey_jarvis"}))
        await link.send(run_pipeline_event(
            PipelineStage.ASR if self.local_wake else PipelineStage.WAKE))
        sat.mark("run_pipeline")
        if self.send_audio_start or self.local_wake:
            await link.send(AudioStart(rate=self.rate, width=WIDTH,
                                       channels=self.channels).event())
        await self.stream(sat, link)

    async def stream(self, sat: FakeSatellite, link: Link) -> None:
        """Lead silence, the audio, then silence forever, each chunk when due."""
        mono = np.concatenate([np.zeros(round(self.lead_s * RATE), dtype=np.int16),
                               self.audio])
        span = voiced_span(mono, RATE)
        converted = convert(mono, self.rate)
        last_voiced = round(span[1] * self.rate / RATE) if span else len(converted) - 1
        frames = len(converted) + (-len(converted) % CHUNK_FRAMES)
        pcm = interleave(np.concatenate(
            [converted, np.zeros(frames - len(converted), dtype=np.int16)]), self.channels)
        frame_bytes = WIDTH * self.channels
        silence = bytes(CHUNK_FRAMES * frame_bytes)
        t0 = time.monotonic()
        sent = 0
        heard = len(sat.transcripts)
        while True:
            if self.local_wake and len(sat.transcripts) > heard:
                await link.send(AudioStop().event())  # the hub heard it: back to waking
                sat.mark("stream_stopped")
                return
            start = sent * frame_bytes
            chunk = pcm[start:start + len(silence)] if sent < frames else silence
            sent += CHUNK_FRAMES
            await asyncio.sleep(max(0.0, t0 + sent / self.rate - time.monotonic()))
            await link.send(AudioChunk(rate=self.rate, width=WIDTH, channels=self.channels,
                                       audio=chunk).event())
            sat.frames_sent += CHUNK_FRAMES
            if sent - CHUNK_FRAMES <= last_voiced < sent:
                sat.mark("speech_end")
            if sent == frames:
                sat.mark("audio_end")
            if self.unknown_every and (sent // CHUNK_FRAMES) % self.unknown_every == 0:
                await link.send(UNKNOWN_EVENTS[(sent // CHUNK_FRAMES) % len(UNKNOWN_EVENTS)])


@dataclass
class AudioBeforeRun(Normal):
    """Right after the hub connects, before any ``run-satellite``: ``before_s`` of the
    audio as ``audio-chunk`` events, at once (unpaced); then :class:`Normal`."""

    before_s: float = 1.0

    async def on_connect(self, sat: FakeSatellite, link: Link) -> None:
        await super().on_connect(sat, link)
        early = convert(self.audio[:round(self.before_s * RATE)], self.rate)
        pcm = interleave(early, self.channels)
        step = CHUNK_FRAMES * WIDTH * self.channels
        for start in range(0, len(pcm), step):
            await link.send(AudioChunk(rate=self.rate, width=WIDTH, channels=self.channels,
                                       audio=pcm[start:start + step]).event())
        sat.mark("audio_before_run")


@dataclass
class Flood(Behaviour):
    """On ``run-satellite``: ``run-pipeline``, then ``seconds`` of 16 kHz noise (about a
    third of full scale) as fast as the socket takes it, repeated until the connection
    ends."""

    seconds: float = 60.0
    seed: int = 0

    async def on_run(self, sat: FakeSatellite, link: Link) -> None:
        rng = np.random.default_rng(self.seed)
        noise = to_int16(rng.uniform(-0.33, 0.33, round(self.seconds * RATE)))
        chunks = [AudioChunk(rate=RATE, width=WIDTH, channels=1,
                             audio=noise[i:i + CHUNK_FRAMES].tobytes()).event()
                  for i in range(0, len(noise) - CHUNK_FRAMES + 1, CHUNK_FRAMES)]
        await link.send(run_pipeline_event())
        sat.mark("run_pipeline")
        while True:
            for event in chunks:
                await link.send(event)
                sat.frames_sent += CHUNK_FRAMES
            sat.mark("flood_pass")


class Silent(Behaviour):
    """On ``run-satellite``: ``run-pipeline``, then never any audio; the connection
    stays open (and ``describe``/``ping`` are still answered)."""

    async def on_run(self, sat: FakeSatellite, link: Link) -> None:
        await link.send(run_pipeline_event())
        sat.mark("run_pipeline")


@dataclass
class EchoRoom(Behaviour):
    """A satellite in a room that echoes: its microphone hears ``audio`` (16 kHz
    mono), plus every reply the hub sends, played in real time from the reply's first
    chunk and heard ``echo_delay_s`` later at ``echo_gain``; and, ``interrupt_after_s``
    into the first reply, ``interrupt`` (someone talking over the reply)."""

    audio: Int16Array
    lead_s: float = 0.3
    echo_gain: float = 0.5
    echo_delay_s: float = 0.08
    interrupt: Int16Array | None = None
    interrupt_after_s: float = 1.0

    def __post_init__(self) -> None:
        self.audio = as_int16(self.audio)
        if self.interrupt is not None:
            self.interrupt = as_int16(self.interrupt)

    async def on_run(self, sat: FakeSatellite, link: Link) -> None:
        await link.send(run_pipeline_event())
        speech = np.concatenate([np.zeros(round(self.lead_s * RATE), np.int16), self.audio])
        t0 = time.monotonic()
        sent = 0
        barge_at: float | None = None
        while True:
            t = t0 + sent / RATE
            mic = np.zeros(CHUNK_FRAMES, np.float64)
            own = speech[sent:sent + CHUNK_FRAMES]
            mic[:len(own)] += own
            mic += self._echo(sat, t)
            if self.interrupt is not None:
                first = sat.replies[0].first_chunk_at if sat.replies else None
                if barge_at is None and first is not None:
                    barge_at = first + self.interrupt_after_s
                if barge_at is not None and t >= barge_at:
                    at = round((t - barge_at) * RATE)
                    part = self.interrupt[at:at + CHUNK_FRAMES]
                    mic[:len(part)] += part
                    if "interrupt" not in sat.marks:
                        sat.mark("interrupt")
            sent += CHUNK_FRAMES
            await asyncio.sleep(max(0.0, t0 + sent / RATE - time.monotonic()))
            await link.send(AudioChunk(rate=RATE, width=WIDTH, channels=1, audio=np.clip(
                mic, -32768, 32767).astype(np.int16).tobytes()).event())
            sat.frames_sent += CHUNK_FRAMES

    def _echo(self, sat: FakeSatellite, t: float) -> npt.NDArray[np.float64]:
        """The replies' sound at the microphone over the chunk starting at ``t``."""
        out = np.zeros(CHUNK_FRAMES, np.float64)
        for reply in sat.replies:
            if reply.first_chunk_at is None or reply.channels != 1:
                continue
            played = np.frombuffer(bytes(reply.audio), np.int16)
            start = (t - reply.first_chunk_at - self.echo_delay_s) * reply.rate
            positions = start + np.arange(CHUNK_FRAMES) * reply.rate / RATE
            inside = (positions >= 0) & (positions < len(played) - 1)
            if inside.any():
                out[inside] += self.echo_gain * np.interp(
                    positions[inside], np.arange(len(played)), played)
        return out


def echo_room(audio: npt.NDArray[np.generic], *,
              interrupt: npt.NDArray[np.generic] | None = None,
              interrupt_after_s: float = 1.0) -> EchoRoom:
    """A room whose satellite hears the replies (see :class:`EchoRoom`)."""
    return EchoRoom(as_int16(audio), interrupt=None if interrupt is None
                    else as_int16(interrupt), interrupt_after_s=interrupt_after_s)


def normal(audio: npt.NDArray[np.generic], *, lead_s: float = 0.0) -> Normal:
    """Paced audio after ``run-satellite``, then silence (see :class:`Normal`)."""
    return Normal(as_int16(audio), lead_s=lead_s)


def unknown_events(audio: npt.NDArray[np.generic], *, every: int = 16) -> Normal:
    """:func:`normal`, with :data:`UNKNOWN_EVENTS` on connect, before ``run-pipeline``
    and one every ``every`` chunks in the audio stream."""
    return Normal(as_int16(audio), unknown_first=True, unknown_every=every)


def audio_before_run(audio: npt.NDArray[np.generic], *, before_s: float = 1.0) -> Normal:
    """Unasked-for audio right after connecting, then :func:`normal`."""
    return AudioBeforeRun(as_int16(audio), before_s=before_s)


def flood(seconds: float = 60.0) -> Flood:
    """Noise as fast as the socket takes it after ``run-satellite``."""
    return Flood(seconds)


def silent() -> Silent:
    """``run-pipeline`` and then no audio at all."""
    return Silent()


def local_wake(audio: npt.NDArray[np.generic]) -> Normal:
    """A satellite whose own wake word fired: it streams ``audio`` as the request."""
    return Normal(audio, local_wake=True)


def rate_48k_stereo(audio: npt.NDArray[np.generic]) -> Normal:
    """:func:`normal`, with the audio sent as 48 kHz stereo s16 (1024-frame chunks)."""
    return Normal(as_int16(audio), rate=48000, channels=2)


# --------------------------------------------------------------------------- audio


def as_int16(audio: npt.NDArray[np.generic]) -> Int16Array:
    """``audio`` as int16: int16 as is, floats in [-1, 1] scaled and clipped."""
    if audio.dtype == np.int16:
        return np.asarray(audio, dtype=np.int16).reshape(-1)
    if np.issubdtype(audio.dtype, np.floating):
        return to_int16(np.asarray(audio, dtype=np.float64).reshape(-1))
    raise TypeError(f"audio must be int16 or float samples, not {audio.dtype}")


def convert(mono16k: Int16Array, rate: int) -> Int16Array:
    """16 kHz mono s16 at ``rate`` (linear interpolation)."""
    if rate == RATE:
        return mono16k
    return to_int16(resample(mono16k.astype(np.float64) / 32768.0, RATE, rate))


def interleave(mono: Int16Array, channels: int) -> bytes:
    """``mono`` as s16le frames of ``channels`` identical samples."""
    return np.repeat(mono.astype("<i2")[:, None], channels, axis=1).tobytes()


# --------------------------------------------------------------------------- server


class FakeSatellite:
    """A Wyoming satellite server on 127.0.0.1 driven by a :class:`Behaviour`."""

    def __init__(self, behaviour: Behaviour, name: str = "fake-satellite") -> None:
        self.behaviour = behaviour
        self.name = name
        self.port = 0
        self.connections = 0
        """Connections accepted so far."""
        self.received: list[Received] = []
        self.replies: list[Reply] = []
        self.errors: list[str] = []
        """Protocol errors in what the hub sent (the connection was then closed)."""
        self.marks: dict[str, float] = {}
        """``time.monotonic()`` of the last ``run_pipeline``, ``speech_end`` (the chunk
        with the last voiced sample sent), ``audio_end``, ``audio_before_run``..."""
        self.frames_sent = 0
        self.killed = False
        self._server: asyncio.Server | None = None
        self._links: dict[int, Link] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Condition | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1 (``port``, or a free one: a satellite back after a
        crash comes back on its old port); the port."""
        self._changed = asyncio.Condition()
        self.killed = False
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port,
                                                  limit=MAX_LINE_BYTES, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, close every connection, end every task."""
        if self._server is not None:
            self._server.close()
        streams = [link.stream_task for link in self._links.values() if link.stream_task]
        for link in list(self._links.values()):
            link.stop_stream()
            link.writer.close()
        tasks = [t for t in [*self._tasks, *streams] if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    async def __aenter__(self) -> FakeSatellite:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def kill(self, reset: bool = False) -> None:
        """Die: stop accepting and drop every connection at once, mid-event if it
        comes to that (unsent bytes are discarded; ``reset`` sends an RST instead of a
        FIN). :meth:`stop` still cleans up afterwards."""
        self.killed = True
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            link.stop_stream()
            link.abort(reset)
        self.mark("killed")

    def mark(self, name: str) -> None:
        """Note ``time.monotonic()`` under ``name`` in :attr:`marks`."""
        self.marks[name] = time.monotonic()

    # ----------------------------------------------------------------- views

    @property
    def events(self) -> list[Event]:
        """Every event received, in order."""
        return [r.event for r in self.received]

    @property
    def types(self) -> list[str]:
        """The types of :attr:`events`."""
        return [r.event.type for r in self.received]

    @property
    def active_connections(self) -> int:
        """Connections open now."""
        return len(self._links)

    @property
    def reply_audio(self) -> bytes:
        """All reply audio received, concatenated."""
        return b"".join(bytes(r.audio) for r in self.replies)

    @property
    def reply_rate(self) -> int | None:
        """The rate of the last reply (None before any)."""
        return self.replies[-1].rate if self.replies else None

    @property
    def transcripts(self) -> list[str]:
        """The ``text`` of each ``transcript`` event received."""
        return [str(e.data.get("text", "")) for e in self.events if e.type == "transcript"]

    # ----------------------------------------------------------------- waiting

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0,
                         what: str = "condition") -> None:
        """Return once ``predicate()`` holds (checked on every event, connection and
        disconnection); :class:`TimeoutError` naming ``what`` and the events seen."""
        assert self._changed is not None, "not started"
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what} not reached within {timeout} s; received "
                               f"{self._summary()}") from None

    async def wait_for(self, event_type: str, timeout: float = 5.0, *,
                       count: int = 1) -> Event:
        """The ``count``-th event of ``event_type`` received (waiting for it)."""
        def matching() -> list[Event]:
            return [e for e in self.events if e.type == event_type]

        await self.wait_until(lambda: len(matching()) >= count, timeout,
                              f"{count} x {event_type!r}")
        return matching()[count - 1]

    async def wait_for_connections(self, count: int = 1, timeout: float = 5.0) -> None:
        """Return once ``count`` connections have been accepted in all."""
        await self.wait_until(lambda: self.connections >= count, timeout,
                              f"{count} connection(s)")

    async def wait_for_disconnect(self, timeout: float = 5.0) -> None:
        """Return once no connection is open."""
        await self.wait_until(lambda: not self._links, timeout, "no open connection")

    async def wait_for_reply(self, timeout: float = 30.0, *, count: int = 1) -> Reply:
        """The ``count``-th complete reply (``audio-stop`` received)."""
        def complete() -> list[Reply]:
            return [r for r in self.replies if r.complete]

        await self.wait_until(lambda: len(complete()) >= count, timeout,
                              f"{count} complete reply(ies)")
        return complete()[count - 1]

    def _summary(self) -> str:
        types = self.types
        shown = ", ".join(types[-15:])
        return f"{len(types)} events [{'..., ' if len(types) > 15 else ''}{shown}]"

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    # ----------------------------------------------------------------- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        link = Link(self.connections, reader, writer)
        self._links[link.number] = link
        await self._notify()
        try:
            await self.behaviour.on_connect(self, link)
            await self._read_loop(link)
        except (ConnectionError, OSError):
            pass  # the hub went away, or we were killed
        except asyncio.CancelledError:
            pass  # stop(): the connection handler's end is ours (asyncio would log it)
        finally:
            link.stop_stream()
            self._links.pop(link.number, None)
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._notify()

    async def _read_loop(self, link: Link) -> None:
        while True:
            try:
                event = await read_event(link.reader)
            except ProtocolError as exc:
                self.errors.append(str(exc))
                return
            if event is None:
                return
            self.received.append(Received(event, time.monotonic(), link.number))
            await self._answer(link, event)
            await self._notify()

    async def _answer(self, link: Link, event: Event) -> None:
        """Answer ``describe``/``ping``, start or stop the behaviour, collect replies."""
        kind = event.type
        if kind == "describe":
            await link.send(self._info().event())
        elif kind == "ping":
            await link.send(Event(type="pong", data={"text": event.data.get("text")}))
        elif kind == "run-satellite":
            if link.stream_task is None or link.stream_task.done():
                link.stream_task = asyncio.create_task(self._run(link))
        elif kind == "pause-satellite":
            link.stop_stream()
        elif kind in ("audio-start", "audio-chunk", "audio-stop"):
            self._collect_reply(link, event)

    async def _run(self, link: Link) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.behaviour.on_run(self, link)

    def _info(self) -> Info:
        attribution = Attribution(name="jarvis tests", url="")
        return Info(satellite=Satellite(name=self.name, attribution=attribution,
                                        installed=True, description=self.name,
                                        version="fake"))

    def _collect_reply(self, link: Link, event: Event) -> None:
        now = time.monotonic()
        current = self.replies[-1] if self.replies else None
        open_reply = current if current is not None and not current.complete else None
        if event.type == "audio-start" or open_reply is None:
            open_reply = Reply(rate=int(event.data.get("rate", 0)),
                               width=int(event.data.get("width", WIDTH)),
                               channels=int(event.data.get("channels", 1)),
                               connection=link.number, started_at=now,
                               had_audio_start=event.type == "audio-start")
            self.replies.append(open_reply)
        if event.type == "audio-chunk":
            if open_reply.first_chunk_at is None:
                open_reply.first_chunk_at = now
            open_reply.audio += event.payload or b""
        elif event.type == "audio-stop":
            open_reply.stopped_at = now
