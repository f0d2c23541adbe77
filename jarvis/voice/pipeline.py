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
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE
from jarvis.config import PipelineSettings
from jarvis.errors import JarvisError
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.silero import Endpointer
from jarvis.speech.vad import PauseDetected, SpeechResumed, SpeechStarted, UtteranceEnded
from jarvis.voice.events import EventType, Listener, Outcome, Source, Stage, TurnEvent
from jarvis.voice.responder import AudioSink, Responder
from jarvis.voice.turn import SpeculationGate, Turn, TurnResult
from jarvis.voice.wake import WakePhrase

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


class VoicePipeline:
    """Listens, endpoints, transcribes; hands each request to the responder."""

    def __init__(
        self,
        responder: Responder,
        asr: WhisperAsr,
        settings: PipelineSettings,
        *,
        endpointer: Endpointer | None = None,
        silence_ms: int = 300,
        conversation_id: str = MICROPHONE_CONVERSATION,
        speculation_timeout_s: float = 5.0,
    ) -> None:
        self.responder = responder
        self.asr = asr
        self.settings = settings
        self.endpointer = endpointer
        self.silence_s = silence_ms / 1000.0
        self.conversation_id = conversation_id
        self.speculation_timeout_s = speculation_timeout_s
        self.muted = False
        self.wake = WakePhrase(settings.wake_word, settings.follow_up_s)
        self._current: _Running | None = None
        self._speculation: _Running | None = None
        self.speculations = {"started": 0, "committed": 0, "abandoned": 0}
        """Turns started at a likely end, and what became of them."""
        self._busy = False
        """A turn is being handled by the turn loop."""

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every event (on the event loop; keep it quick)."""
        self.responder.bus.subscribe(listener)

    def _loop_event(self, type: EventType, **data: object) -> None:
        self.responder.bus.publish(TurnEvent(type, source=Source.MICROPHONE,
                                             conversation_id=self.conversation_id, data=data))

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
        if self.endpointer is None:
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
        endpointer = self.endpointer
        assert endpointer is not None
        endpointer.reset()
        self._loop_event(EventType.LISTENING)
        async for chunk in source:
            if self.muted:
                continue
            arrived = time.monotonic()
            for event in await asyncio.to_thread(endpointer.process, chunk):
                await self._on_vad(event, arrived, out, sink)
        for event in await asyncio.to_thread(endpointer.flush):
            await self._on_vad(event, time.monotonic(), out, sink)

    async def _on_vad(
        self, event: object, arrived: float, out: asyncio.Queue[Utterance | None], sink: AudioSink
    ) -> None:
        if isinstance(event, PauseDetected):
            if not (self._busy or self.responder.busy or self._speculation is not None
                    or out.qsize()):
                self._speculate(Utterance(event.audio, arrived - event.silence_s,
                                          event.silence_s), sink)
        elif isinstance(event, SpeechResumed):
            await self._abandon_speculation()
        elif isinstance(event, SpeechStarted):
            self._loop_event(EventType.SPEECH_STARTED)
            if self.settings.barge_in and self.speaking:
                t = time.monotonic()
                await self.cancel_reply()
                self._loop_event(EventType.BARGE_IN, stop_s=time.monotonic() - t)
        elif isinstance(event, UtteranceEnded):
            silence = self.silence_s if event.reason.value == "silence" else 0.0
            self._loop_event(EventType.SPEECH_ENDED, duration_s=event.duration_s)
            speculation, self._speculation = self._speculation, None
            await out.put(Utterance(event.audio, arrived - silence, silence, speculation))

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
        turn = Turn(Source.MICROPHONE, self.conversation_id, gate=gate,
                    since=utterance.last_voice_at)
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
        if task.cancelled():
            return TurnResult(running.turn.id, Outcome.CANCELLED, interrupted=True)
        result = task.result()
        if result.outcome is Outcome.ANSWERED:
            self.wake.replied()
        return result

    async def _turn(self, utterance: Utterance, turn: Turn, sink: AudioSink) -> TurnResult:
        turn.stage = Stage.ASR
        try:
            transcript = await self.asr.transcribe_async(utterance.audio)
        except JarvisError as exc:
            return self.responder.fail(turn, Stage.ASR, exc)
        turn.transcript = transcript.text
        turn.latency["asr"] = transcript.latency_s
        self.responder.emit(turn, EventType.TRANSCRIPT, transcript.text,
                            duration_s=transcript.duration_s)
        turn.stage = Stage.WAKE
        request, woke = self.wake.request(transcript.text)
        if woke:
            self.responder.emit(turn, EventType.WAKE, request or "")
        if request is None:
            return self.responder.ignore(turn)
        turn.request = request
        if not request:  # the wake phrase alone: acknowledge, then listen without it
            return await self.responder.acknowledge(turn, ACKNOWLEDGEMENT, sink)
        return await self.responder.respond(turn, sink)


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
                       gap_s: float = 0.8) -> AsyncIterator[npt.NDArray[np.float32]]:
    """A microphone for demos and benchmarks: each request (16 kHz) in real time, the
    next one only after the pipeline has answered the previous one."""
    answered = asyncio.Event()

    def on_event(event: TurnEvent) -> None:
        if event.type is EventType.TURN_END:
            answered.set()

    pipeline.subscribe(on_event)
    for audio in requests:
        answered.clear()
        async for chunk in file_chunks(audio, realtime=True, tail_silence_s=0.0):
            yield chunk
        while not answered.is_set():
            yield np.zeros(512, dtype=np.float32)
            await asyncio.sleep(0.032)
        async for chunk in file_chunks(np.zeros(int(gap_s * ASR_RATE), np.float32),
                                       realtime=True, tail_silence_s=0.0):
            yield chunk
