"""The always-on voice loop: audio in → VAD → ASR → wake phrase → a :class:`Turn` for
the one :class:`~jarvis.voice.responder.Responder` (device map, LLM, TTS) → audio out, on
one asyncio event loop.

The *listener* feeds audio to the endpointer (Silero VAD in a worker thread) and queues
finished utterances; the *turn loop* takes them one at a time. Each voice turn runs as
its own task, so barge-in can interrupt it: generation stops within a token, queued
audio is dropped and playback is cut.

Speculation: when the endpointer reports a likely end (``JARVIS_VAD_SPECULATE_MS`` of
silence, before the ``JARVIS_VAD_SILENCE_MS`` endpoint), the turn starts at once on the
audio so far, with a :class:`~jarvis.voice.turn.SpeculationGate`: transcription, the
model's answer and the first clause's synthesis run, but events, device commands, audio
and the history wait. At the endpoint the turn is committed; if speech resumes first
(or the gate times out) it is cancelled without a trace. The audio is the same speech
either way, only the trailing silence differs.

Voice-to-voice latency is measured from the last voiced sample of the utterance
(the endpoint fires ``JARVIS_VAD_SILENCE_MS`` after it) to the moment the reply's
first audio is handed to the speaker; it includes the endpoint silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE
from jarvis.config import PipelineSettings
from jarvis.errors import JarvisError
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.silero import Endpointer
from jarvis.speech.vad import (
    OnsetRejected,
    PauseDetected,
    SpeechOnset,
    SpeechResumed,
    SpeechStarted,
    UtteranceEnded,
)
from jarvis.speech.wakeword import WakeWordDetector
from jarvis.voice.events import EventType, Listener, Outcome, Source, Stage, TurnEvent
from jarvis.voice.listening import (
    AWAKE_S,
    FrontEnd,
    ReferenceWatch,
    confirmed_request,
    resolve_wake_word,
    strip_wake_phrase,
)
from jarvis.voice.responder import AudioSink, Responder
from jarvis.voice.turn import SpeculationGate, Turn, TurnResult
from jarvis.voice.wake import WakePhrase

log = logging.getLogger(__name__)

ACKNOWLEDGEMENT = "Yes?"
MICROPHONE_CONVERSATION = "microphone"


@dataclass
class _Running:
    """A voice turn in flight: started speculatively, or at the endpoint."""

    turn: Turn
    task: asyncio.Task[TurnResult] | None = None


@dataclass
class Utterance:
    """A finished utterance and when its last voiced sample was heard."""

    audio: npt.NDArray[np.float32] = field(repr=False)
    last_voice_at: float
    """``time.monotonic()`` of the last voiced sample (endpoint time minus the silence)."""
    endpoint_silence_s: float = 0.0
    speculation: _Running | None = field(default=None, repr=False)
    """The turn already started on this utterance at its likely end, if any."""
    woke: str = ""
    """The wake phrase the wake-word model heard in it ("" if none)."""
    started_at: float = 0.0
    """``time.monotonic()`` when its speech was confirmed."""
    addressed: bool = False
    """It started in the follow-up window, or over a reply (barge-in): for Jarvis
    without a wake word."""


class Pausable(Protocol):
    """A sink that can go quiet at once and go on (the speaker): barge-in pauses on the
    first frame of possible speech, and cancels only once it is confirmed."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class VoicePipeline:
    """Listens, endpoints, transcribes; hands each request to the responder."""

    def __init__(
        self,
        responder: Responder,
        asr: WhisperAsr,
        settings: PipelineSettings,
        *,
        endpointer: Endpointer | None = None,
        front_end: FrontEnd | None = None,
        silence_ms: int = 300,
        conversation_id: str = MICROPHONE_CONVERSATION,
        speculation_timeout_s: float = 5.0,
        barge_in: bool | None = None,
        source: Source = Source.MICROPHONE,
        room: str = "",
    ) -> None:
        self.responder = responder
        self.asr = asr
        self.settings = settings
        model, phrase = resolve_wake_word(settings.wake_word)
        if front_end is None and endpointer is not None:
            detector = (WakeWordDetector(model, cutoff=settings.wake_threshold) if model
                        else None)
            front_end = FrontEnd(endpointer, detector=detector)
        self.front_end = front_end
        self.barge_in = bool(settings.barge_in if barge_in is None else barge_in)
        self.silence_s = silence_ms / 1000.0
        self.conversation_id = conversation_id
        self.source = source
        self.room = room
        """The room this pipeline listens in ("" for the assistant's own microphone):
        its events and turns carry it."""
        self.speculation_timeout_s = speculation_timeout_s
        self.muted = False
        # With a wake-word model the gate does the waking (and the phrase is taken off
        # the transcript when it is there); a phrase is matched on the transcript.
        self.wake = WakePhrase(phrase, settings.follow_up_s)
        self.model_phrase = model.replace("_", " ") if model else ""
        self._started: tuple[float, bool] = (0.0, False)
        """When the utterance being heard started, and whether it was addressed then."""
        self._awake_until = 0.0
        """Utterances starting before this follow a confirmed wake word."""
        self._paused: tuple[Pausable, float] | None = None
        """The sink paused for a possible barge-in, and when."""
        self._current: _Running | None = None
        self._speculation: _Running | None = None
        self.speculations = {"started": 0, "committed": 0, "abandoned": 0}
        """Turns started at a likely end, and what became of them."""
        self._busy = False
        """A turn is being handled by the turn loop."""

    @property
    def endpointer(self) -> Endpointer | None:
        """The endpointer the front end feeds (None for a pipeline that only answers
        given utterances)."""
        return self.front_end.endpointer if self.front_end is not None else None

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every event (on the event loop; keep it quick)."""
        self.responder.bus.subscribe(listener)

    def _loop_event(self, type: EventType, **data: object) -> None:
        self.responder.bus.publish(TurnEvent(type, source=self.source,
                                             conversation_id=self.conversation_id, data=data,
                                             room=self.room))

    @property
    def speaking(self) -> bool:
        """A committed voice turn is being answered (generated or played)."""
        current = self._current
        return (current is not None and current.task is not None and not current.task.done()
                and not current.turn.uncommitted)

    # ------------------------------------------------------------------ the loop

    async def run(self, source: AsyncIterable[npt.ArrayLike], sink: AudioSink) -> None:
        """Listen to ``source`` and answer through ``sink`` until the source ends (a
        file) or the task is cancelled (SIGINT/SIGTERM). Pending turns finish first
        when the source ends."""
        if self.front_end is None:
            raise JarvisError("the pipeline needs an endpointer to listen")
        utterances: asyncio.Queue[Utterance | None] = asyncio.Queue(maxsize=8)
        turns = asyncio.create_task(self._turn_loop(utterances, sink))
        try:
            await self._listen(source, utterances, sink)
            await utterances.put(None)
            await turns
        finally:
            turns.cancel()
            await self._abandon_speculation()
            await self.cancel_reply()
            with contextlib.suppress(asyncio.CancelledError):
                await turns

    async def _listen(
        self, source: AsyncIterable[npt.ArrayLike], out: asyncio.Queue[Utterance | None],
        sink: AudioSink,
    ) -> None:
        front = self.front_end
        assert front is not None
        front.reset()
        self._loop_event(EventType.LISTENING)
        watch = (ReferenceWatch(front.canceller.reference)
                 if front.canceller is not None else None)
        async for chunk in source:
            if self.muted:
                continue
            arrived = time.monotonic()
            front.hold_open = self.barge_in and self.speaking
            if watch is not None and (message := watch.check(_playing(sink))):
                log.warning("%s", message)
            heard = await asyncio.to_thread(front.process, np.asarray(chunk, np.float32))
            if heard.wake is not None:
                self._loop_event(EventType.WAKE_WORD, phrase=heard.wake.phrase,
                                 probability=round(heard.wake.probability, 3))
            for event in heard.events:
                await self._on_vad(event, arrived, out, sink)
        for event in await asyncio.to_thread(front.flush):
            await self._on_vad(event, time.monotonic(), out, sink)

    async def _on_vad(
        self, event: object, arrived: float, out: asyncio.Queue[Utterance | None], sink: AudioSink
    ) -> None:
        if isinstance(event, PauseDetected):
            # Other conversations' turns (other rooms, MQTT) do not hold speculation back:
            # the engine answers them together.
            if not (self._busy or self._speculation is not None or out.qsize()):
                woke = self._claim_wake(event.start_sample + len(event.audio), consume=False)
                self._speculate(Utterance(event.audio, arrived - event.silence_s,
                                          event.silence_s, woke=woke,
                                          started_at=self._started[0],
                                          addressed=self._started[1]), sink)
        elif isinstance(event, SpeechResumed):
            await self._abandon_speculation()
        elif isinstance(event, SpeechOnset):
            # Possible speech over the reply: quiet at once, decide when it is confirmed.
            if self.barge_in and self.speaking and self._paused is None and _pausable(sink):
                sink.pause()
                self._paused = (sink, time.monotonic())
        elif isinstance(event, OnsetRejected):
            self._resume_playback()
        elif isinstance(event, SpeechStarted):
            self._loop_event(EventType.SPEECH_STARTED)
            self._started = (arrived, self.wake.following_up()
                             or (self.barge_in and self.speaking))
            if self.barge_in and self.speaking:
                # Quiet already if paused at the onset; else quiet once cancelled.
                t = time.monotonic()
                paused_at = self._paused[1] if self._paused is not None else None
                await self.cancel_reply()
                self._loop_event(
                    EventType.BARGE_IN,
                    stop_s=0.0 if paused_at is not None else time.monotonic() - t,
                    paused_s=t - paused_at if paused_at is not None else 0.0)
            self._resume_playback()
        elif isinstance(event, UtteranceEnded):
            silence = self.silence_s if event.reason.value == "silence" else 0.0
            self._loop_event(EventType.SPEECH_ENDED, duration_s=event.duration_s)
            speculation, self._speculation = self._speculation, None
            await out.put(Utterance(event.audio, arrived - silence, silence, speculation,
                                    woke=self._claim_wake(event.end_sample),
                                    started_at=self._started[0], addressed=self._started[1]))

    def _claim_wake(self, end_sample: int, *, consume: bool = True) -> str:
        front = self.front_end
        return front.claim_wake(end_sample, consume=consume) if front is not None else ""

    def _resume_playback(self) -> None:
        """Undo a barge-in pause: the reply goes on (or, cancelled, has nothing left)."""
        paused, self._paused = self._paused, None
        if paused is not None:
            paused[0].resume()

    async def _turn_loop(self, queue: asyncio.Queue[Utterance | None], sink: AudioSink) -> None:
        while (utterance := await queue.get()) is not None:
            self._busy = True
            try:
                await self.voice_turn(utterance, sink)
            finally:
                self._busy = False
            self._loop_event(EventType.LISTENING)

    async def cancel_reply(self) -> None:
        """Stop the voice turn in flight (generation, synthesis and playback)."""
        current = self._current
        if current is None or current.task is None or current.task.done():
            return
        if not self.responder.interrupt(current.turn.id):
            current.task.cancel()  # still transcribing: nothing said yet
        await asyncio.wait({current.task})

    # ------------------------------------------------------------------ speculation

    def _new_turn(self, utterance: Utterance, *, speculative: bool) -> Turn:
        gate = SpeculationGate(self.speculation_timeout_s) if speculative else None
        turn = Turn(self.source, self.conversation_id, gate=gate,
                    since=utterance.last_voice_at, room=self.room)
        turn.latency["endpoint"] = utterance.endpoint_silence_s
        return turn

    def _speculate(self, utterance: Utterance, sink: AudioSink) -> None:
        """Start the turn on a likely end of the utterance (see the module docstring)."""
        running = _Running(self._new_turn(utterance, speculative=True))
        running.task = asyncio.create_task(self._turn(utterance, running.turn, sink))
        self._speculation = running
        self.speculations["started"] += 1

    async def _abandon_speculation(self) -> None:
        """Speech resumed (or we are shutting down): cancel the speculative turn; it has
        changed nothing anyone can see."""
        running, self._speculation = self._speculation, None
        if running is not None and running.task is not None:
            self.speculations["abandoned"] += 1
            running.task.cancel()
            await asyncio.wait({running.task})

    # ------------------------------------------------------------------ one turn

    async def voice_turn(self, utterance: Utterance, sink: AudioSink) -> TurnResult:
        """Transcribe ``utterance`` and, if it is for Jarvis, answer it through ``sink``
        (or commit the turn already started on it)."""
        running = utterance.speculation
        if running is not None and running.task is not None and not running.task.done():
            self.speculations["committed"] += 1
            self.responder.commit(running.turn)
        else:
            running = _Running(self._new_turn(utterance, speculative=False))
            running.task = asyncio.create_task(self._turn(utterance, running.turn, sink))
        self._current = running
        task = running.task
        assert task is not None
        try:
            await asyncio.wait({task})  # an interrupted turn is a result, not an error
        except asyncio.CancelledError:  # we are being shut down: stop the turn too
            task.cancel()
            raise
        self._paused = None  # the reply is over: nothing is left to resume
        if task.cancelled():
            return TurnResult(running.turn.id, Outcome.CANCELLED, interrupted=True)
        result = task.result()
        if result.outcome is Outcome.ANSWERED:
            self.wake.replied()
            if self.front_end is not None:
                self.front_end.open_for(self.settings.follow_up_s)
        return result

    async def _turn(self, utterance: Utterance, turn: Turn, sink: AudioSink) -> TurnResult:
        try:
            return await self._heard(utterance, turn, sink)
        except Exception as exc:  # a bug in one turn must not end listening
            return self.responder.fail(turn, turn.stage, exc)

    async def _heard(self, utterance: Utterance, turn: Turn, sink: AudioSink) -> TurnResult:
        """Transcribe, check the wake word, and hand the request to the responder (which
        ends the turn itself, whatever happens there)."""
        turn.stage = Stage.ASR
        transcript = await self.asr.transcribe_async(utterance.audio,
                                                     wake_phrase=utterance.woke)
        turn.transcript = transcript.text
        turn.latency["asr"] = transcript.latency_s
        self.responder.emit(turn, EventType.TRANSCRIPT, transcript.text,
                            duration_s=transcript.duration_s)
        turn.stage = Stage.WAKE
        gated = self.front_end is not None and self.front_end.gated
        if utterance.woke:
            # The model woke us; whisper reading the phrase at the start confirms it
            # (or the model was fooled by "hey Janice": back to sleep), and the request
            # is what was read after it.
            request: str | None = confirmed_request(transcript, utterance.woke)
            woke = request is not None
            if woke:
                self._awake_until = time.monotonic() + AWAKE_S
            elif self.front_end is not None:
                self.front_end.sleep()
        elif self.model_phrase:
            # No wake word needed: a follow-up, speech over a reply, the rest after a
            # confirmed wake word ("hey jarvis ... what time is it"), a file given as the
            # request. The phrase is taken off the text if it is there. Anything else
            # the open gate let through is not for us.
            addressed = (utterance.addressed or utterance.started_at < self._awake_until
                         or not gated)
            request = (strip_wake_phrase(transcript.text, self.model_phrase)
                       if addressed and any(c.isalnum() for c in transcript.text) else None)
            woke = False
        else:
            request, woke = self.wake.request(transcript.text)
        if woke:
            self.responder.emit(turn, EventType.WAKE, request or "")
        if request is None:
            return self.responder.ignore(turn)
        turn.request = request
        if not request:  # the wake phrase alone: acknowledge, then listen without it
            return await self.responder.acknowledge(turn, ACKNOWLEDGEMENT, sink)
        return await self.responder.respond(turn, sink)


def _playing(sink: object) -> bool:
    """The sink says it is playing a reply now (the speaker does)."""
    return bool(getattr(sink, "playing", False))


def _pausable(sink: object) -> TypeGuard[Pausable]:
    return callable(getattr(sink, "pause", None)) and callable(getattr(sink, "resume", None))


async def file_chunks(audio: npt.ArrayLike, *, realtime: bool, chunk_s: float = 0.032,
                      tail_silence_s: float = 1.0) -> AsyncIterator[npt.NDArray[np.float32]]:
    """16 kHz mono audio as microphone-sized chunks, paced in real time if asked, with
    trailing silence so the last utterance reaches its endpoint."""
    samples = np.concatenate([np.asarray(audio, dtype=np.float32).reshape(-1),
                              np.zeros(int(tail_silence_s * ASR_RATE), dtype=np.float32)])
    step = max(1, int(chunk_s * ASR_RATE))
    start = time.monotonic()
    for i in range(0, len(samples), step):
        if realtime:
            due = start + i / ASR_RATE
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        yield samples[i:i + step]


async def spoken_turns(pipeline: VoicePipeline, requests: list[npt.NDArray[np.float32]],
                       gap_s: float = 0.8, timeout_s: float = 60.0,
                       ) -> AsyncIterator[npt.NDArray[np.float32]]:
    """A microphone for demos and benchmarks: each request (16 kHz) in real time, the
    next one only after the pipeline has answered the previous one (or after
    ``timeout_s`` of silence: a request the wake word did not catch has no turn)."""
    answered = asyncio.Event()

    def on_event(event: TurnEvent) -> None:
        if event.type is EventType.TURN_END:
            answered.set()

    pipeline.subscribe(on_event)
    for audio in requests:
        answered.clear()
        async for chunk in file_chunks(audio, realtime=True, tail_silence_s=0.0):
            yield chunk
        deadline = time.monotonic() + timeout_s
        while not answered.is_set() and time.monotonic() < deadline:
            yield np.zeros(512, dtype=np.float32)
            await asyncio.sleep(0.032)
        async for chunk in file_chunks(np.zeros(int(gap_s * ASR_RATE), np.float32),
                                       realtime=True, tail_silence_s=0.0):
            yield chunk
