"""A room's speaker: replies sent to its satellite as ``audio-start``, ``audio-chunk``s
and ``audio-stop``, at the pace they are played.

The chunks go out :data:`LEAD_S` ahead of where the satellite's playback is, not all at
once: so that a barge-in can stop a reply (:meth:`SatelliteSink.pause` stops sending;
cancelling sends ``audio-stop``), the satellite never holds more than that. Each chunk
is also handed, as it is sent, to the room's echo reference, from which the room's echo
canceller takes the reply out of what the satellite's microphone hears (a satellite
plays what it receives at once: the echo follows the reference by the network, the
satellite's sound card and the room; the canceller measures that delay).

Without echo cancellation the room is half duplex: its microphone is heard as silence
until the reply has been played (:meth:`RoomAudio.mute_until`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event

from jarvis.audio.echo import EchoReference
from jarvis.audio.formats import to_int16
from jarvis.speech.tts import TtsChunk
from jarvis.wyoming.room_audio import RoomAudio

LEAD_S = 0.2
"""How far ahead of the satellite's playback replies are sent (what a cut leaves to
play)."""
PLAYBACK_TAIL_S = 0.3
"""After a reply's last sample is due on the satellite, how long its microphone is
still treated as hearing it (network and device buffers), when half duplex."""
PIECE_SAMPLES = 1024
"""Samples per ``audio-chunk`` (46 ms at 22.05 kHz)."""


@dataclass
class RoomSpeaker:
    """What the sink needs of the room: its connection, its microphone, its echo
    reference (None when echo cancellation is off) and whether it is half duplex."""

    send: Callable[[Event], Awaitable[None]]
    send_now: Callable[[Event], None]
    audio: Callable[[], RoomAudio]
    reference: Callable[[], EchoReference | None]
    half_duplex: Callable[[], bool]
    replies: list[float] = field(default_factory=list)
    """Seconds of each reply sent (cut replies are shorter)."""
    first_sent: list[float] = field(default_factory=list)
    """``time.monotonic()`` when each reply's first audio went to the satellite."""


class SatelliteSink:
    """Plays replies on the room's satellite (a :class:`~jarvis.voice.responder.AudioSink`
    that can pause, for barge-in); returns once the reply has been heard."""

    def __init__(self, room: RoomSpeaker, *, lead_s: float = LEAD_S) -> None:
        self.room = room
        self.lead_s = lead_s
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._heard_until = 0.0

    @property
    def playing(self) -> bool:
        """The satellite has reply audio to play now (waiting for the voice to
        synthesise more is not playing: the echo canceller's watch must not fret)."""
        return time.monotonic() < self._heard_until

    def pause(self) -> None:
        """Stop sending (a possible barge-in): the satellite plays what it holds."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None:
        room = self.room
        start: float | None = None
        """When the reply's first sample is heard (shifted on by pauses)."""
        sent_s = 0.0
        self._resumed.set()  # a pause was for the reply before (a barge-in cut it)
        try:
            async for chunk in chunks:
                pcm = to_int16(chunk.samples)
                for i in range(0, len(pcm), PIECE_SAMPLES):
                    piece = pcm[i:i + PIECE_SAMPLES]
                    if not self._resumed.is_set():
                        paused = time.monotonic()
                        await self._resumed.wait()
                        if start is not None:
                            start += time.monotonic() - paused
                    if start is None:
                        start = time.monotonic() + self.lead_s
                        await room.send(AudioStart(rate=rate, width=2, channels=1).event())
                    await asyncio.sleep(max(0.0, start + sent_s - self.lead_s
                                            - time.monotonic()))
                    await room.send(AudioChunk(rate=rate, width=2, channels=1,
                                               audio=piece.tobytes()).event())
                    if not sent_s:
                        room.first_sent.append(time.monotonic())
                    reference = room.reference()
                    if reference is not None:  # a satellite plays what it gets at once
                        reference.push(piece, rate)
                    sent_s += len(piece) / rate
                    self._heard_until = start + sent_s - self.lead_s
                    if room.half_duplex():
                        room.audio().mute_until(start + sent_s + PLAYBACK_TAIL_S)
            if start is not None:  # the satellite still plays what it holds
                await asyncio.sleep(max(0.0, start + sent_s - time.monotonic()))
        finally:
            if start is not None:
                room.send_now(AudioStop().event())
                room.replies.append(sent_s)
