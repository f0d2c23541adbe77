"""``jarvis satellite``: this machine's microphone and speaker as a Wyoming satellite.

A controller (the Jarvis hub, Home Assistant) connects to it; the satellite streams the
microphone to the controller and plays what the controller sends back. Nothing heavier
than a wake-word model runs here (no ASR, TTS or LLM is imported): it is meant for a
Raspberry Pi Zero 2 W.

The conversation, from the satellite's side (``→`` sent, ``←`` received)::

    ← describe                  → info (satellite: name, area, active wake words; wake)
    ← ping {text}               → pong {text}
    ← run-satellite             start (again); the microphone opens
       always streaming (no local wake word):
                                → run-pipeline {start_stage: wake, end_stage: tts,
                                                restart_on_end: true}
                                → audio-start {16000, 2, 1}  → audio-chunk ...
       local wake word: nothing until the model fires, then
                                → detection {name, timestamp}
                                → run-pipeline {start_stage: asr, end_stage: tts,
                                                wake_word_name}
                                → audio-start, the pre-roll (1.5 s before the detection,
                                  the wake phrase included), audio-chunk ... until
                                  ← transcript (or error), or 15 s pass
                                → audio-stop; back to listening for the wake word
    ← error (always streaming)  → audio-stop; 3 s later run-pipeline, audio-start again
    ← pause-satellite           → audio-stop (if a stream was open); the microphone closes
    ← audio-start / audio-chunk* / audio-stop (any PCM format): played as it arrives
                                → played, once the audio-stop has been heard

Only one controller drives the satellite: ``describe`` and ``ping`` are answered on any
connection, but any other event from a second connection makes it the controller and
closes the first. A controller that goes away stops the streaming (as a
``pause-satellite`` would). Bytes that are not Wyoming events close that connection
only; an event type the satellite does not know is logged once and ignored.

The microphone is read by :class:`~jarvis.audio.paced.PacedMicrophone`: blocking reads
in a thread of its own, never delivered faster than the sample clock allows (a device
without a clock, such as the ALSA ``file`` capture the tests use, would otherwise be
read at once and flood the controller). A microphone that cannot be opened, or stops,
is logged in one line and tried again every few seconds. Replies are played by
:mod:`jarvis.wyoming.satellite_playback`; a speaker that cannot be opened drops the
reply with a warning and ``played`` is still sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Info, Satellite, WakeModel, WakeProgram
from wyoming.ping import Pong
from wyoming.pipeline import PipelineStage, RunPipeline
from wyoming.snd import Played
from wyoming.wake import Detection

from jarvis import __version__
from jarvis.audio.errors import AudioDeviceError
from jarvis.audio.formats import ASR_RATE, Int16Array
from jarvis.audio.paced import PacedMicrophone
from jarvis.audio.stream import Speaker
from jarvis.speech.wakeword import WakeWordDetector
from jarvis.voice.listening import PREROLL_S, resolve_wake_word
from jarvis.wyoming.protocol import (
    MAX_LINE_BYTES,
    ProtocolError,
    WyomingError,
    encode_event,
    read_event,
)
from jarvis.wyoming.satellite_playback import Reply, ReplyPlayer
from jarvis.wyoming.sockets import ListenError, peer_name, remove_stale_socket
from jarvis.wyoming.zeroconf import Advertiser, advertise

log = logging.getLogger(__name__)

DEFAULT_URI = "tcp://0.0.0.0:10700"
WIDTH = 2
"""Bytes per sample of the microphone stream (16 kHz, 16-bit, mono)."""
MAX_BACKLOG_BYTES = 256 * 1024
"""Audio not yet taken by the controller (about 8 s) beyond which chunks are dropped."""
_MAX_NOTED_TYPES = 64
_INFORMATIONAL = frozenset({
    # What a controller tells a satellite about its pipeline: nothing to do here.
    "detect", "detection", "voice-started", "voice-stopped", "transcribe", "synthesize",
    "synthesize-start", "synthesize-chunk", "synthesize-stop", "synthesize-stopped",
    "run-pipeline", "pong", "info", "streaming-started", "streaming-stopped",
    "timer-started", "timer-updated", "timer-cancelled", "timer-finished", "played",
    "handled", "not-handled",
})


@dataclass(frozen=True)
class SatelliteOptions:
    """What ``jarvis satellite`` was asked for (its part of the settings)."""

    name: str
    area: str = ""
    uri: str = DEFAULT_URI
    """``tcp://HOST:PORT`` (port 0: any free port) or ``unix:///path``."""
    zeroconf: bool = True
    """Advertise a tcp satellite as ``_wyoming._tcp`` under :attr:`name`."""
    input_device: str = ""
    output_device: str = ""
    wake_word: str = ""
    """A bundled wake-word model listened for here; "" = always streaming."""
    wake_cutoff: float | None = None
    preroll_s: float = PREROLL_S
    listen_s: float = 15.0
    """Longest stream after a local detection when the controller says nothing."""
    retry_s: float = 3.0
    """Wait between attempts to open a microphone that failed."""
    chunk_samples: int = 1024


def local_wake_model(wake_word: str) -> str | None:
    """The bundled model ``JARVIS_WAKE_WORD`` names, or None (off, or a phrase that only a
    transcript can match: the controller has to listen for it). ConfigError for a name
    shaped like a model that is not bundled."""
    model, _phrase = resolve_wake_word(wake_word)
    return model


def _mic_problem(exc: AudioDeviceError, device: str) -> str:
    """The error's one line, naming JARVIS_INPUT_DEVICE where it does not already."""
    text = str(exc)
    if "JARVIS_INPUT_DEVICE" in text:
        return text
    return f"{text} (JARVIS_INPUT_DEVICE={device!r})" if device else \
        f"{text} (the default microphone; choose one with JARVIS_INPUT_DEVICE)"


# --------------------------------------------------------------------------- controller


class Controller:
    """One connection to the satellite: events out without awaiting (one ``bytes`` per
    event, so nothing interleaves), and audio dropped rather than queued without bound
    when the controller does not read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer_name(writer)
        self.dropped = 0

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def send(self, event: Event) -> None:
        if not self.closed:
            self.writer.write(encode_event(event))

    def send_audio(self, event: Event) -> None:
        if self.closed:
            return
        if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG_BYTES:
            if not self.dropped:
                log.warning("controller %s does not take the audio: dropping chunks",
                            self.peer)
            self.dropped += 1
            return
        self.writer.write(encode_event(event))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


# --------------------------------------------------------------------------- satellite


class WyomingSatellite:
    """The satellite: ``async with WyomingSatellite(options):`` serves until the block
    ends. :attr:`port` is the TCP port listened on."""

    def __init__(self, options: SatelliteOptions) -> None:
        self.options = options
        self.port = 0
        self.detector: WakeWordDetector | None = None
        self.speaker = Speaker(options.output_device)
        self.player = ReplyPlayer(self.speaker, self._played)
        self._server: asyncio.AbstractServer | None = None
        self._advertiser: Advertiser | None = None
        self._info: Event | None = None
        self._controller: Controller | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._running = False
        self._listener: asyncio.Task[None] | None = None
        self._mic_open = False
        self._streaming = False
        self._stream_samples = 0
        self._heard = 0
        self._deadline = 0.0
        self._resume_at = 0.0
        self._preroll: deque[Int16Array] = deque()
        self._preroll_len = 0
        self._noted: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the wake-word model (if any), try the devices, listen, advertise."""
        options = self.options
        if options.wake_word:
            self.detector = await asyncio.to_thread(
                WakeWordDetector, options.wake_word, cutoff=options.wake_cutoff)
        self._info = self._build_info().event()
        await self._probe_devices()
        parts = urlsplit(options.uri)
        try:
            if parts.scheme == "unix":
                path = options.uri[len("unix://"):]
                remove_stale_socket(Path(path), options.uri)
                self._server = await asyncio.start_unix_server(self._serve, path,
                                                               limit=MAX_LINE_BYTES)
                where = options.uri
            else:
                host = parts.hostname or "0.0.0.0"
                self._server = await asyncio.start_server(
                    self._serve, host, parts.port, limit=MAX_LINE_BYTES, reuse_address=True)
                self.port = int(self._server.sockets[0].getsockname()[1])
                where = f"tcp://{parts.netloc.rsplit(':', 1)[0]}:{self.port}"
        except OSError as exc:
            raise ListenError(f"cannot listen on {options.uri}: {exc.strerror or exc}") from None
        self.player.start()
        mode = (f"wake word {self.detector.name} (local)" if self.detector
                else "always streaming")
        log.info("satellite %r listening on %s: %s", options.name, where, mode)
        if parts.scheme == "tcp" and options.zeroconf:
            self._advertiser = await advertise(options.name, self.port, parts.hostname or "")

    async def stop(self) -> None:
        """Stop listening, close every connection and the devices."""
        if self._advertiser is not None:
            await self._advertiser.stop()
            self._advertiser = None
        if self._server is not None:
            self._server.close()
        await self._set_running(False)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.player.stop()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self.detector is not None:
            self.detector.close()

    async def __aenter__(self) -> WyomingSatellite:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _build_info(self) -> Info:
        options = self.options
        jarvis = Attribution(name="Jarvis", url="")
        active = [self.detector.name] if self.detector else []
        info = Info(satellite=Satellite(
            name=options.name, area=options.area or None, installed=True,
            attribution=jarvis, version=__version__,
            description="Jarvis satellite: microphone and speaker over Wyoming",
            has_vad=False, active_wake_words=active, max_active_wake_words=1,
            supports_trigger=False))
        if self.detector is not None:
            info.wake.append(WakeProgram(
                name="jarvis-wake", attribution=jarvis, installed=True, version=__version__,
                description="microWakeWord on the satellite's microphone",
                models=[WakeModel(
                    name=self.detector.name, phrase=self.detector.phrase, languages=["en"],
                    installed=True, version=None, description=self.detector.phrase,
                    attribution=Attribution(name="microWakeWord (Kevin Ahrendt)",
                                            url="https://github.com/kahrendt/microWakeWord"))]))
        return info

    async def _probe_devices(self) -> None:
        """Open and close both devices once, so a problem shows in the first lines of
        the log rather than when a controller arrives. Neither stops the satellite."""
        try:
            async with PacedMicrophone(self.options.input_device) as mic:
                log.info("%s at %d Hz", mic.label, mic.device_rate)
        except AudioDeviceError as exc:
            log.error("%s; it is tried again when a controller starts the satellite",
                      _mic_problem(exc, self.options.input_device))
        try:
            device = await self.speaker.check(22050)
            log.info("speaker %s", device.label())
        except AudioDeviceError as exc:
            log.warning("%s: replies will not be played", exc)

    # ------------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection. Its task ends quietly when :meth:`stop` cancels it: the
        asyncio of Python 3.11 (3.11.7 here, Raspberry Pi OS's 3.11.2) logs a cancelled
        connection task as an unhandled error, traceback and all."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._connection(reader, writer)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        connection = Controller(reader, writer)
        log.debug("%s connected", connection.peer)
        try:
            while not connection.closed:
                try:
                    event = await read_event(reader)
                except ProtocolError as exc:
                    log.warning("%s: not a Wyoming event (%s); closing that connection",
                                connection.peer, exc)
                    break
                if event is None:
                    break
                try:
                    await self._handle(connection, event)
                except WyomingError as exc:
                    log.warning("%s: %s", connection.peer, exc)
                    connection.send(Error(text=str(exc), code=exc.code).event())
        except (ConnectionError, OSError) as exc:
            log.debug("%s: %s", connection.peer, exc)
        finally:
            connection.close()
            self._connections.discard(task)
            if self._controller is connection:
                log.info("controller %s disconnected", connection.peer)
                self._controller = None
                await self._set_running(False)
                self.player.end()

    async def _handle(self, connection: Controller, event: Event) -> None:
        kind = event.type
        if kind == "describe":
            assert self._info is not None
            connection.send(self._info)
            return
        if kind == "ping":
            connection.send(Pong(text=event.data.get("text")).event())
            return
        if connection.closed:
            return  # replaced by another controller: what it still sent is not read
        if self._controller is not connection:
            await self._take_over(connection)
        if kind == "run-satellite":
            await self._run()
        elif kind == "pause-satellite":
            log.info("paused by the controller")
            await self._set_running(False)
        elif kind in ("audio-start", "audio-chunk", "audio-stop"):
            self.player.handle(connection, event)
        elif kind == "transcript" and self.detector is not None:
            if self._streaming:  # the request is over
                self._end_stream()
                self._reset_wake()
        elif kind == "error":
            log.warning("controller: %s", str(event.data.get("text"))[:200])
            if self._streaming:
                self._end_stream()
                self._reset_wake()
                if self.detector is None:
                    # Its pipeline failed and will not restart by itself (Home Assistant
                    # waits for a new run-pipeline): ask again, but not in a tight loop.
                    self._resume_at = time.monotonic() + self.options.retry_s
        elif kind in _INFORMATIONAL:
            log.debug("controller: %s", kind)
        elif kind not in self._noted and len(self._noted) < _MAX_NOTED_TYPES:
            self._noted.add(kind)  # bounded: a client inventing types cannot grow it
            log.warning("controller sent %r, which a satellite does not expect; ignored",
                        kind[:64])

    async def _take_over(self, connection: Controller) -> None:
        """``connection`` becomes the controller; the previous one is closed and the
        satellite waits for the new one's ``run-satellite``."""
        previous = self._controller
        if previous is None:
            log.info("controller %s connected", connection.peer)
            self._controller = connection
            return
        log.info("controller %s takes over from %s (closed)", connection.peer, previous.peer)
        self._end_stream()  # the audio-stop goes to the previous controller
        self.player.end()
        previous.close()
        self._controller = connection
        await self._set_running(False)

    # ------------------------------------------------------------------ microphone

    async def _run(self) -> None:
        """``run-satellite``: (re)start streaming or listening for the wake word."""
        if not self._running:
            log.info("started by the controller")
            await self._set_running(True)
            return
        self._end_stream()
        self._reset_wake()
        self._resume_at = 0.0
        if self.detector is None and self._mic_open:
            self._begin_stream(PipelineStage.WAKE)

    async def _set_running(self, running: bool) -> None:
        self._running = running
        self._resume_at = 0.0
        if running and self._listener is None:
            self._listener = asyncio.create_task(self._listen())
        elif not running:
            self._end_stream()
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            self._mic_open = False
            self._reset_wake()

    async def _listen(self) -> None:
        """The microphone while the satellite runs; opened again after a failure."""
        failed = ""
        while True:
            try:
                async with PacedMicrophone(self.options.input_device,
                                           chunk_samples=self.options.chunk_samples) as mic:
                    if failed:
                        log.info("%s is back", mic.label)
                        failed = ""
                    self._mic_open = True
                    self._heard = 0
                    if self.detector is None:
                        self._begin_stream(PipelineStage.WAKE)
                    async for chunk in mic:
                        self._on_chunk(chunk)
                    raise AudioDeviceError(f"the {mic.label} stream ended")
            except AudioDeviceError as exc:
                self._mic_open = False
                self._end_stream()
                self._reset_wake()
                problem = _mic_problem(exc, self.options.input_device)
                if problem != failed:
                    log.error("%s; trying again every %g s", problem, self.options.retry_s)
                    failed = problem
                await asyncio.sleep(self.options.retry_s)

    def _on_chunk(self, chunk: Int16Array) -> None:
        self._heard += len(chunk)
        if self.detector is None:  # always streaming
            if not self._streaming and self._resume_at and time.monotonic() >= self._resume_at:
                self._resume_at = 0.0
                self._begin_stream(PipelineStage.WAKE)
            if self._streaming:
                self._send_audio(chunk)
            return
        if self._streaming:
            self._send_audio(chunk)
            if time.monotonic() > self._deadline:
                log.info("no answer from the controller in %g s: listening for the wake "
                         "word again", self.options.listen_s)
                self._end_stream()
                self._reset_wake()
            return
        self._preroll.append(chunk)
        self._preroll_len += len(chunk)
        keep = int(self.options.preroll_s * ASR_RATE) + len(chunk)
        while self._preroll_len - len(self._preroll[0]) >= keep:
            self._preroll_len -= len(self._preroll.popleft())
        detection = self.detector.process(chunk)
        if detection is None:
            return
        after = self.detector.position - detection.sample  # heard after it fired
        at_ms = (self._heard - after) * 1000 // ASR_RATE
        log.info("wake word %s (%.2f)", detection.name, detection.probability)
        if self._controller is None:
            return
        self._controller.send(Detection(name=detection.name, timestamp=at_ms).event())
        preroll = np.concatenate(self._preroll)
        preroll = preroll[-(int(self.options.preroll_s * ASR_RATE) + after):]
        self._begin_stream(PipelineStage.ASR, wake_word=detection.name)
        size = self.options.chunk_samples
        for start in range(0, len(preroll), size):
            self._send_audio(preroll[start:start + size])
        self._deadline = time.monotonic() + self.options.listen_s

    def _reset_wake(self) -> None:
        self._preroll.clear()
        self._preroll_len = 0
        if self.detector is not None and self.detector.position:
            self.detector.reset()

    def _begin_stream(self, start: PipelineStage, wake_word: str | None = None) -> None:
        controller = self._controller
        if controller is None or not self._running:
            return
        controller.send(RunPipeline(start_stage=start, end_stage=PipelineStage.TTS,
                                    wake_word_name=wake_word,
                                    restart_on_end=start is PipelineStage.WAKE).event())
        controller.send(AudioStart(rate=ASR_RATE, width=WIDTH, channels=1,
                                   timestamp=0).event())
        self._streaming = True
        self._stream_samples = 0
        log.debug("streaming to %s", controller.peer)

    def _send_audio(self, pcm: Int16Array) -> None:
        if self._controller is None:
            return
        self._controller.send_audio(AudioChunk(
            rate=ASR_RATE, width=WIDTH, channels=1, audio=pcm.astype("<i2").tobytes(),
            timestamp=self._stream_samples * 1000 // ASR_RATE).event())
        self._stream_samples += len(pcm)

    def _end_stream(self) -> None:
        if not self._streaming:
            return
        self._streaming = False
        if self._controller is not None:
            self._controller.send(AudioStop(
                timestamp=self._stream_samples * 1000 // ASR_RATE).event())

    # ------------------------------------------------------------------ speaker

    def _played(self, reply: Reply) -> None:
        """A reply is over: ``played``, if its controller still is the controller."""
        if reply.owner is self._controller and self._controller is not None:
            self._controller.send(Played().event())
