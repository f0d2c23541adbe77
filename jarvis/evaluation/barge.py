"""One spoken exchange in the simulated room (:mod:`jarvis.evaluation.loopback`):
the person wakes Jarvis and asks; the reply plays and its echo reaches the microphone;
optionally the person talks over it. Used by the echo/barge-in tests and
``bench/barge_in_bench.py``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jarvis.audio.echo import EchoCanceller, EchoReference
from jarvis.audio.formats import ASR_RATE, FloatArray
from jarvis.config import PipelineSettings
from jarvis.evaluation.loopback import LoopbackRoom, NoPause, Quiet
from jarvis.evaluation.room import Room
from jarvis.speech.silero import Endpointer
from jarvis.speech.wakeword import WakeWordDetector
from jarvis.voice.events import EventType, TurnEvent
from jarvis.voice.listening import FrontEnd
from jarvis.voice.pipeline import VoicePipeline

EARLY = 250
"""ms before the measured onset from which the speaker going quiet counts as a reaction
to the interruption."""


@dataclass
class Trial:
    """What happened in one exchange."""

    echo_cancel: bool
    pause: bool
    answered: bool = False
    """The first request got a reply that started playing."""
    barge_ins: list[int] = field(default_factory=list)
    """Microphone position of each BARGE_IN (a reply cancelled because speech was
    confirmed over it)."""
    quiet: list[Quiet] = field(default_factory=list)
    """Every time the speaker went quiet before the reply's end (pause or cut)."""
    onset: int | None = None
    """Sample where the interruption's speech truly starts (None: no interruption)."""
    canceller: dict[str, float] = field(default_factory=dict)
    events: list[TurnEvent] = field(default_factory=list, repr=False)

    @property
    def _early(self) -> int | None:
        """Quiet from here on belongs to the interruption: the -40 dBFS onset of the
        clean recording can come a little after a soft first consonant that the VAD
        already hears."""
        return None if self.onset is None else self.onset - EARLY * ASR_RATE // 1000

    @property
    def false_pauses(self) -> int:
        """Times the speaker went quiet with nobody speaking over it (or before they
        did): each is a stutter if it resumed, a false barge-in if the reply was cut."""
        early = self._early
        return sum(early is None or q.sample < early for q in self.quiet)

    @property
    def false_barge_in(self) -> bool:
        """The reply was cut (BARGE_IN) with nobody speaking over it (or before they
        did)."""
        early = self._early
        return any(early is None or at < early for at in self.barge_ins)

    @property
    def stop_ms(self) -> float | None:
        """From the interruption's true onset to the speaker going quiet (ms; 0 when it
        went quiet within ``EARLY`` ms before it)."""
        early = self._early
        if self.onset is None or early is None:
            return None
        after = [q.sample for q in self.quiet if q.sample >= early]
        return max(0.0, (after[0] - self.onset) * 1000.0 / ASR_RATE) if after else None


async def exchange(
    pipeline_for: Any, room: Room, request: FloatArray, *,
    interruption: FloatArray | None = None, interrupt_after_s: float = 1.0,
    echo_cancel: bool = True, pause: bool = True, wake_word: str | None = "hey_jarvis",
    endpointer: Endpointer, max_s: float = 40.0,
) -> Trial:
    """Run one exchange. ``pipeline_for(front_end)`` builds the pipeline (barge-in on)
    around the given front end; ``request`` (16 kHz) is said at 0.3 s; with an
    ``interruption`` it is said ``interrupt_after_s`` after the reply starts playing."""
    reference = EchoReference() if echo_cancel else None
    canceller = EchoCanceller(reference) if reference is not None else None
    detector = (WakeWordDetector(wake_word, cutoff=PipelineSettings.wake_threshold)
                if wake_word else None)
    front = FrontEnd(endpointer, detector=detector, canceller=canceller)
    pipeline: VoicePipeline = pipeline_for(front)
    loopback = LoopbackRoom(room, reference=reference)
    trial = Trial(echo_cancel, pause)
    done = asyncio.Event()
    started: list[int] = []
    finished: list[TurnEvent] = []

    def on_first_sample(at: int) -> None:
        if started:
            return
        started.append(at)
        trial.answered = True
        if interruption is not None:
            trial.onset = loopback.say(interruption, at + int(interrupt_after_s * ASR_RATE))

    loopback.on_first_sample = on_first_sample

    def on_event(event: TurnEvent) -> None:
        trial.events.append(event)
        if event.type is EventType.BARGE_IN:
            trial.barge_ins.append(loopback.position)
        elif event.type is EventType.TURN_END and started:
            # Done when the reply ended; with an interruption, when that was answered too.
            finished.append(event)
            if interruption is None or len(finished) >= 2:
                done.set()

    pipeline.subscribe(on_event)
    loopback.say(request, int(0.3 * ASR_RATE))
    sink: Any = loopback if pause else NoPause(loopback)
    runner = asyncio.create_task(pipeline.run(loopback.microphone(), sink))
    try:
        await asyncio.wait_for(done.wait(), max_s)
    except TimeoutError:
        pass
    finally:
        loopback.close()
        await asyncio.wait({runner}, timeout=30)
        if not runner.done():
            runner.cancel()
    trial.quiet = list(loopback.quiet)
    if canceller is not None:
        trial.canceller = canceller.stats()
    return trial


def median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None
