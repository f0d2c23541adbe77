"""The satellite's speaker: the replies a controller sends (``audio-start``,
``audio-chunk``\\*, ``audio-stop``, in any PCM format, each chunk in its own) played one
after another, each as it arrives, with ``played`` sent once its ``audio-stop`` has been
heard.

A reply is converted on arrival to mono float32 at the rate of its ``audio-start``; a
chunk that ends in the middle of a sample frame keeps the rest for the next one. What a
controller can make the satellite hold is bounded (:data:`MAX_REPLY_QUEUE_S`). A speaker
that cannot be opened, or fails while playing, drops the reply with a warning and
``played`` is still sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from wyoming.event import Event

from jarvis.audio.errors import AudioDeviceError
from jarvis.audio.formats import ASR_RATE, FloatArray, to_mono
from jarvis.audio.resample import resample
from jarvis.audio.stream import Speaker
from jarvis.wyoming.asr import decode_pcm, pcm_problem
from jarvis.wyoming.protocol import WyomingError, field

log = logging.getLogger(__name__)

MAX_REPLY_QUEUE_S = 120.0
"""Reply audio received and not yet played beyond which chunks are dropped (a controller
sends a reply faster than it plays; this bounds what it can make the satellite hold)."""


class Reply:
    """One reply being received: its format and the samples not played yet. ``owner``
    is the connection it came from (``played`` goes back only to the controller that
    is still the controller)."""

    def __init__(self, owner: object, rate: int, width: int, channels: int) -> None:
        self.owner = owner
        self.rate, self.width, self.channels = rate, width, channels
        self.queue: asyncio.Queue[FloatArray | None] = asyncio.Queue()
        self.ended = False
        """The end of the reply is in the queue."""
        self.finished = False
        """... and has been taken from it."""
        self.queued = 0
        """Samples in the queue."""
        self.dropped = 0
        self._rest = b""

    def feed(self, audio: bytes, rate: int, width: int, channels: int) -> None:
        """One chunk (its own format) as mono float32 at the reply's rate."""
        if (width, channels) != (self.width, self.channels):
            self._rest = b""
        frame = width * channels
        data = self._rest + audio
        usable = len(data) - len(data) % frame
        self._rest = data[usable:]
        if not usable:
            return
        samples = to_mono(decode_pcm(data[:usable], width).reshape(-1, channels))
        self.width, self.channels = width, channels
        if rate != self.rate:
            samples = resample(samples, rate, self.rate)
        if self.ended:
            return
        if self.queued + len(samples) > MAX_REPLY_QUEUE_S * self.rate:
            if not self.dropped:
                log.warning("reply: more than %g s of audio waiting to be played; dropping "
                            "the rest", MAX_REPLY_QUEUE_S)
            self.dropped += len(samples)
            return
        self.queued += len(samples)
        self.queue.put_nowait(samples)

    async def next(self) -> FloatArray | None:
        """The next samples to play; None at the end."""
        if self.finished:
            return None
        chunk = await self.queue.get()
        if chunk is None:
            self.finished = True
        else:
            self.queued -= len(chunk)
        return chunk

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(None)


def audio_format(event: Event) -> tuple[int, int, int]:
    """(rate, width, channels) of an ``audio-*`` event; WyomingError for one that is not
    PCM the satellite plays."""
    rate, width, channels = (field(event, "rate", int), field(event, "width", int),
                             field(event, "channels", int))
    problem = pcm_problem(rate, width, channels)
    if problem is not None:
        raise WyomingError(f"{event.type}: unsupported audio format: {problem}",
                           "unsupported_audio_format")
    return rate, width, channels


class ReplyPlayer:
    """The replies in the order they came, played on ``speaker`` by a task of its own
    (:meth:`start` … :meth:`stop`); ``played(reply)`` is called after each, whether it
    could be played or not."""

    def __init__(self, speaker: Speaker, played: Callable[[Reply], None]) -> None:
        self.speaker = speaker
        self._played = played
        self._replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._reply: Reply | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._play_replies())

    async def stop(self) -> None:
        """Stop playing (what is still queued is not played)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def handle(self, owner: object, event: Event) -> None:
        """An ``audio-start``, ``audio-chunk`` or ``audio-stop`` from ``owner``: a chunk
        or a stop without a start begins a reply of its own. WyomingError for a format
        that is not PCM."""
        kind = event.type
        if kind == "audio-start":
            self._begin(owner, *audio_format(event))
        elif kind == "audio-chunk":
            rate, width, channels = audio_format(event)
            if self._reply is None:
                self._begin(owner, rate, width, channels)
            assert self._reply is not None
            self._reply.feed(event.payload or b"", rate, width, channels)
        elif kind == "audio-stop":
            if self._reply is None:
                self._begin(owner, ASR_RATE, 2, 1)  # no audio came: any format will do
            self.end()

    def end(self) -> None:
        """The reply being received is complete (its controller went away, or was
        replaced): what came of it is played."""
        reply, self._reply = self._reply, None
        if reply is not None:
            reply.end()

    def _begin(self, owner: object, rate: int, width: int, channels: int) -> None:
        self.end()  # an audio-start without the previous audio-stop
        self._reply = Reply(owner, rate, width, channels)
        self._replies.put_nowait(self._reply)

    async def _play_replies(self) -> None:
        """One reply after another, each played as it arrives; ``played`` after each."""
        while True:
            reply = await self._replies.get()
            await self._play(reply)
            self._played(reply)

    async def _play(self, reply: Reply) -> None:
        first = await reply.next()
        if first is None:
            return  # no audio: the speaker is not even opened

        async def chunks() -> AsyncIterator[FloatArray]:
            chunk: FloatArray | None = first
            while chunk is not None:
                yield chunk
                chunk = await reply.next()

        try:
            seconds = await self.speaker.play(chunks(), reply.rate)
            log.debug("played %.2f s", seconds)
        except AudioDeviceError as exc:
            log.warning("%s: reply not played", exc)
        except Exception as exc:  # PortAudioError while writing: the speaker went away
            log.warning("speaker failed (%s): reply not played", exc)
        while await reply.next() is not None:  # what was not played
            pass
