"""One Wyoming connection: read events, answer them, in order.

Home Assistant opens a connection per request (a ``describe``, an utterance, a
synthesis, a conversation turn); other clients may send several requests on one. The
connection is served until the client closes it, it stays silent for the idle timeout
(a request being answered does not count), or it sends something that ends it:

==========================================  =============================================
what the client sends                       what it gets
==========================================  =============================================
bytes that are not events (garbage, a       ``error`` (``bad_event``), then the connection
truncated or oversized header)              closes: the framing is lost
an event type this server does not serve    ``error`` (``unknown_event``); it may go on
``audio-chunk`` without ``audio-start``,    ``error`` (``no_audio_start``, ...), closed
an unsupported format, audio longer than    (Home Assistant would otherwise wait for a
the utterance limit, text with no words     ``transcript`` or an ``audio-stop``)
==========================================  =============================================

Every one of these is logged with the client's address. The models are shared: this
class holds only the state of its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.ping import Pong
from wyoming.tts import SynthesizeStopped

from jarvis.errors import JarvisError
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.tts import PiperTts
from jarvis.voice.responder import Responder
from jarvis.wyoming.asr import AudioStream, recognise
from jarvis.wyoming.handle import handle
from jarvis.wyoming.info import PROGRAM
from jarvis.wyoming.protocol import ProtocolError, WyomingError, encode_event, field, read_event
from jarvis.wyoming.tts import TextStream, synthesize

log = logging.getLogger(__name__)

LINGER_S = 2.0
"""After an error, how long the server reads (and drops) what the client still sends."""
LINGER_BYTES = 8 << 20


@dataclass(frozen=True)
class Services:
    """What every connection shares: the loaded engines and the one responder."""

    responder: Responder
    asr: WhisperAsr | None
    tts: PiperTts | None
    info: Event
    """The ``info`` event, built once."""
    max_utterance_s: float
    idle_timeout_s: float


class Connection:
    """Serves one client; :meth:`run` returns when the connection is over."""

    def __init__(self, services: Services, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: str) -> None:
        self.services = services
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.requests = 0
        self._audio: AudioStream | None = None
        self._text: TextStream | None = None
        self._closing = False

    # ------------------------------------------------------------------ writing

    def send_now(self, event: Event) -> None:
        """Put ``event`` on the socket without waiting (flow control comes with the
        next :meth:`send`)."""
        if not self.writer.is_closing():
            self.writer.write(encode_event(event))

    async def send(self, event: Event) -> None:
        self.send_now(event)
        await self.writer.drain()

    async def error(self, exc: WyomingError) -> None:
        """Answer ``exc`` with an ``error`` event and log it."""
        log.warning("wyoming %s: %s (%s)%s", self.peer, exc, exc.code,
                    "; closing the connection" if self._closing else "")
        with contextlib.suppress(ConnectionError):
            await self.send(Error(text=str(exc), code=exc.code).event())

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        timeout = self.services.idle_timeout_s
        try:
            while not self._closing:
                try:
                    event = await asyncio.wait_for(read_event(self.reader), timeout)
                except asyncio.TimeoutError:
                    log.info("wyoming %s: nothing received for %.1f s; closing the "
                             "connection", self.peer, timeout)
                    break
                except ProtocolError as exc:
                    self._closing = True
                    await self.error(exc)
                    break
                if event is None:
                    break
                try:
                    await self.dispatch(event)
                except WyomingError as exc:
                    self._closing = exc.code != "unknown_event"
                    await self.error(exc)
        except ConnectionError as exc:
            log.info("wyoming %s: the client went away (%s)", self.peer,
                     type(exc).__name__)
        finally:
            if self._text is not None:
                await self._text.cancel()
            if self._closing:
                await self._linger()
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()

    async def _linger(self) -> None:
        """Closing after an error: say nothing more will come, then read what the client
        had already sent (for a little while) before closing. Closing a socket with
        unread data resets the connection, and the client could lose the error event."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.TimeoutError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            deadline = time.monotonic() + LINGER_S
            discarded = 0
            while discarded < LINGER_BYTES:
                data = await asyncio.wait_for(self.reader.read(1 << 16),
                                              max(0.0, deadline - time.monotonic()))
                if not data:
                    return
                discarded += len(data)

    async def dispatch(self, event: Event) -> None:
        kind = event.type
        if kind == "describe":
            await self.send(self.services.info)
        elif kind == "ping":
            await self.send(Pong(text=field(event, "text", str, required=False)).event())
        elif kind == "select-program":
            name = field(event, "name", str)
            if name != PROGRAM:
                raise WyomingError(f"select-program: no program {name!r} here (only "
                                   f"{PROGRAM!r})", "unknown_program")
        elif kind in ("transcribe", "audio-start", "audio-chunk", "audio-stop"):
            await self._speech_to_text(event)
        elif kind in ("synthesize", "synthesize-start", "synthesize-chunk", "synthesize-stop"):
            await self._text_to_speech(event)
        elif kind == "transcript":
            await self._handle(event)
        else:
            raise WyomingError(f"unknown event type {kind[:60]!r}", "unknown_event")

    # ------------------------------------------------------------------ asr

    async def _speech_to_text(self, event: Event) -> None:
        asr = self.services.asr
        if asr is None:
            raise WyomingError("speech to text is not served here (no ASR model loaded)",
                               "unsupported")
        kind = event.type
        if kind == "transcribe":
            self._audio = None  # a new request
            return
        if kind == "audio-start":
            if self._audio is not None:
                raise WyomingError("audio-start in the middle of an audio stream",
                                   "audio_already_started")
            self._audio = AudioStream(field(event, "rate", int), field(event, "width", int),
                                      field(event, "channels", int),
                                      max_s=self.services.max_utterance_s)
            self.requests += 1
            await self.send(TranscriptStart(language=asr.settings.language or None).event())
            return
        stream = self._audio
        if stream is None:
            raise WyomingError(f"{kind} without audio-start: send audio-start (rate, width, "
                               "channels) first", "no_audio_start")
        if kind == "audio-chunk":
            fmt = (field(event, "rate", int), field(event, "width", int),
                   field(event, "channels", int))
            stream.feed(event.payload or b"", fmt)
            return
        self._audio = None  # audio-stop
        started = time.perf_counter()
        try:
            result = await recognise(asr, stream.finish())
        except JarvisError as exc:
            raise WyomingError(f"speech recognition failed: {exc}", "asr_failed") from None
        if result.text:
            self.send_now(TranscriptChunk(text=result.text).event())
        await self.send(Transcript(text=result.text, language=result.language).event())
        await self.send(TranscriptStop().event())
        log.info("wyoming %s: %.2f s of audio -> %r in %.3f s", self.peer, stream.seconds,
                 result.text, time.perf_counter() - started)

    # ------------------------------------------------------------------ tts

    async def _text_to_speech(self, event: Event) -> None:
        tts = self.services.tts
        if tts is None:
            raise WyomingError("text to speech is not served here (no voice loaded)",
                               "unsupported")
        kind = event.type
        stream = self._text
        if kind == "synthesize":
            if stream is not None:
                return  # the whole text again, for servers that do not stream: ignored
            text = field(event, "text", str)
            self.requests += 1
            try:
                await synthesize(tts, text, self.send)
            except JarvisError as exc:
                raise WyomingError(f"synthesize: {exc}", "tts_failed") from None
        elif kind == "synthesize-start":
            if stream is not None:
                raise WyomingError("synthesize-start in the middle of a text stream",
                                   "synthesize_already_started")
            self.requests += 1
            self._text = TextStream(tts, self.send)
        elif stream is None:
            raise WyomingError(f"{kind} without synthesize-start", "no_synthesize_start")
        elif kind == "synthesize-chunk":
            if (failure := stream.failed) is not None:
                raise WyomingError(f"synthesis failed: {failure}", "tts_failed")
            stream.add(field(event, "text", str))
        else:  # synthesize-stop
            self._text = None
            try:
                await stream.finish()
            except JarvisError as exc:
                raise WyomingError(f"synthesis failed: {exc}", "tts_failed") from None
            await self.send(SynthesizeStopped().event())

    # ------------------------------------------------------------------ handle

    async def _handle(self, event: Event) -> None:
        self.requests += 1
        handling = await handle(self.services.responder, event, self.send, self.send_now,
                                self.peer)
        if handling.failed:
            self._closing = True
