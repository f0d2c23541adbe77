"""The always-on voice loop: audio in → VAD → ASR → dialogue turn → LLM token stream →
clause splitter → TTS audio stream → audio out, on one asyncio event loop.

Two tasks joined by a bounded queue: the *listener* feeds audio to the endpointer
(Silero VAD in a worker thread) and queues finished utterances; the *responder*
transcribes each one, handles the wake phrase, and runs the reply as its own task,
so barge-in can cancel it: generation stops within a token, queued audio is dropped
and playback is cut. Every stage emits :class:`~jarvis.voice.events.PipelineEvent`\\ s.

Streaming end to end: the TTS stream consumes the LLM's token stream, so the first
clause is spoken while the model is still writing the rest.

Speculation: when the endpointer reports a likely end (``JARVIS_VAD_SPECULATE_MS`` of
silence, before the ``JARVIS_VAD_SILENCE_MS`` endpoint), the turn starts at once on the
audio so far — transcription, the model's answer, the first clause's synthesis — but
holds everything anyone can observe: events are kept back, device commands wait, no
audio plays and the conversation is not touched. At the endpoint the turn is
*committed* (the held events go out and the audio plays); if speech resumes first, it
is cancelled without a trace and the utterance goes on. The audio is the same speech
either way, only the trailing silence differs.

Voice-to-voice latency is measured from the last voiced sample of the utterance
(the endpoint fires ``JARVIS_VAD_SILENCE_MS`` after it) to the moment the reply's
first audio is handed to the speaker; it includes the endpoint silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE
from jarvis.config import PipelineSettings
from jarvis.errors import JarvisError, PromptTooLongError
from jarvis.latency import LatencyTracker, RequestRecord
from jarvis.llm.base import GenerationStats, LLMBackend, TokenStream
from jarvis.llm.dialogue import Conversation
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.silero import Endpointer
from jarvis.speech.tts import PiperTts, TtsChunk
from jarvis.speech.vad import PauseDetected, SpeechResumed, SpeechStarted, UtteranceEnded
from jarvis.voice.events import EventType, PipelineEvent

log = logging.getLogger(__name__)

Listener = Callable[[PipelineEvent], None]
ACKNOWLEDGEMENT = "Yes?"


class AudioSink(Protocol):
    """Where replies are heard: plays a stream of TTS chunks, returns when done, stops
    at once when cancelled."""

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None: ...


@dataclass(frozen=True)
class Intercepted:
    """A request answered without the model (e.g. a device command)."""

    reply: str
    """What to say."""
    act: Callable[[], None] | None = None
    """The side effect (publishing the command), run once the turn is committed."""


@dataclass
class _Speculation:
    """A turn started at a likely end of the utterance, not yet committed."""

    held: list[PipelineEvent] = field(default_factory=list)
    """Events emitted by the turn, kept back until it is committed."""
    committed: bool = False
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[TurnResult] | None = None


_SPECULATION: contextvars.ContextVar[_Speculation | None] = contextvars.ContextVar(
    "jarvis_speculation", default=None)
"""Set inside a speculative turn's task (and inherited by the tasks it starts)."""


@dataclass
class Utterance:
    """A finished utterance and when its last voiced sample was heard."""

    audio: npt.NDArray[np.float32] = field(repr=False)
    last_voice_at: float
    """``time.monotonic()`` of the last voiced sample (endpoint time minus the silence)."""
    endpoint_silence_s: float = 0.0
    speculation: _Speculation | None = field(default=None, repr=False)
    """The turn already started on this utterance at its likely end, if any."""


@dataclass
class TurnResult:
    """One voice (or text) turn: what was heard, what was said, what it cost."""

    transcript: str
    reply: str = ""
    """What was actually spoken (cut short on barge-in)."""
    interrupted: bool = False
    ignored: bool = False
    latency: dict[str, float] = field(default_factory=dict)
    """Seconds: endpoint (the silence waited before the turn started: the likely end
    when it started speculatively), asr, llm_ttft, tts_first, voice_to_voice, total."""


class VoicePipeline:
    """Wires the engines together; owns the conversation and the reply in flight."""

    def __init__(
        self,
        backend: LLMBackend,
        asr: WhisperAsr,
        tts: PiperTts,
        settings: PipelineSettings,
        system_prompt: str,
        *,
        endpointer: Endpointer | None = None,
        tracker: LatencyTracker | None = None,
        silence_ms: int = 400,
    ) -> None:
        self.backend = backend
        self.asr = asr
        self.tts = tts
        self.settings = settings
        self.endpointer = endpointer
        self.tracker = tracker
        self.silence_s = silence_ms / 1000.0
        self.conversation = Conversation(system_prompt, max_turns=settings.history_turns)
        self.muted = False
        self.intercept: Callable[[str], Awaitable[Intercepted | None]] | None = None
        """Optional fast path tried before the LLM (the MQTT device matcher): the reply
        to speak and its side effect, or None to let the model answer. It may run
        speculatively, so it must not act by itself: :attr:`Intercepted.act` does."""
        self._listeners: list[Listener] = []
        self._reply: asyncio.Task[TurnResult] | None = None
        self._speculation: _Speculation | None = None
        self.speculations = {"started": 0, "committed": 0, "abandoned": 0}
        """Turns started at a likely end, and what became of them."""
        self._busy = False
        """A turn is being handled by the responder."""
        self._follow_up_until = 0.0
        self._wake = _words(settings.wake_word)

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every event (on the event loop; keep it quick)."""
        self._listeners.append(listener)

    def emit(self, type: EventType, text: str = "", stage: str = "", **data: Any) -> None:
        event = PipelineEvent(type, text, stage, data)
        speculation = _SPECULATION.get()
        if speculation is not None and not speculation.committed:
            speculation.held.append(event)
        else:
            self._publish(event)

    def _publish(self, event: PipelineEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken observer must not stop the assistant
                log.exception("pipeline event listener failed")

    @property
    def speaking(self) -> bool:
        return self._reply is not None and not self._reply.done()

    # ------------------------------------------------------------------ the loop

    async def run(self, source: AsyncIterable[npt.ArrayLike], sink: AudioSink) -> None:
        """Listen to ``source`` and answer through ``sink`` until the source ends (a
        file) or the task is cancelled (SIGINT/SIGTERM). Pending replies finish first
        when the source ends."""
        if self.endpointer is None:
            raise JarvisError("the pipeline needs an endpointer to listen")
        utterances: asyncio.Queue[Utterance | None] = asyncio.Queue(maxsize=8)
        responder = asyncio.create_task(self._respond_loop(utterances, sink))
        try:
            await self._listen(source, utterances, sink)
            await utterances.put(None)
            await responder
        finally:
            responder.cancel()
            await self._abandon_speculation()
            await self.cancel_reply()
            with contextlib.suppress(asyncio.CancelledError):
                await responder

    async def _listen(
        self, source: AsyncIterable[npt.ArrayLike], out: asyncio.Queue[Utterance | None],
        sink: AudioSink,
    ) -> None:
        endpointer = self.endpointer
        assert endpointer is not None
        endpointer.reset()
        self.emit(EventType.LISTENING)
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
            if not (self._busy or self.speaking or self._speculation is not None or out.qsize()):
                self._speculate(Utterance(event.audio, arrived - event.silence_s,
                                          event.silence_s), sink)
        elif isinstance(event, SpeechResumed):
            await self._abandon_speculation()
        elif isinstance(event, SpeechStarted):
            self.emit(EventType.SPEECH_STARTED)
            if self.settings.barge_in and self.speaking:
                t = time.monotonic()
                await self.cancel_reply()
                self.emit(EventType.BARGE_IN, stop_s=time.monotonic() - t)
        elif isinstance(event, UtteranceEnded):
            silence = self.silence_s if event.reason.value == "silence" else 0.0
            self.emit(EventType.SPEECH_ENDED, duration_s=event.duration_s)
            speculation, self._speculation = self._speculation, None
            await out.put(Utterance(event.audio, arrived - silence, silence, speculation))

    async def _respond_loop(self, queue: asyncio.Queue[Utterance | None], sink: AudioSink) -> None:
        while (utterance := await queue.get()) is not None:
            self._busy = True
            try:
                await self.voice_turn(utterance, sink)
            finally:
                self._busy = False
            self.emit(EventType.LISTENING)

    async def cancel_reply(self) -> None:
        """Stop the reply in flight (generation, synthesis and playback)."""
        reply = self._reply
        if reply is not None and not reply.done():
            reply.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reply

    # ------------------------------------------------------------------ speculation

    def _speculate(self, utterance: Utterance, sink: AudioSink) -> None:
        """Start the turn on a likely end of the utterance (see the module docstring)."""
        speculation = _Speculation()

        async def turn() -> TurnResult:
            _SPECULATION.set(speculation)
            return await self.voice_turn(utterance, sink)

        speculation.task = asyncio.create_task(turn())
        self._speculation = speculation
        self.speculations["started"] += 1

    async def _commit(self, speculation: _Speculation) -> TurnResult:
        """The endpoint confirmed the likely end: publish what the speculative turn held
        back, let it act and play, and wait for it."""
        speculation.committed = True
        self.speculations["committed"] += 1
        held, speculation.held = speculation.held, []
        for event in held:
            self._publish(event)
        speculation.gate.set()
        assert speculation.task is not None
        return await speculation.task

    async def _abandon_speculation(self) -> None:
        """Speech resumed (or we are shutting down): cancel the speculative turn; it has
        changed nothing anyone can see."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None and speculation.task is not None:
            self.speculations["abandoned"] += 1
            speculation.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speculation.task

    @staticmethod
    async def _committed() -> None:
        """Wait until this turn may act: at once unless it is an uncommitted speculation."""
        speculation = _SPECULATION.get()
        if speculation is not None:
            await speculation.gate.wait()

    @staticmethod
    def _uncommitted() -> bool:
        speculation = _SPECULATION.get()
        return speculation is not None and not speculation.committed

    # ------------------------------------------------------------------ one turn

    async def voice_turn(self, utterance: Utterance, sink: AudioSink) -> TurnResult:
        """Transcribe ``utterance`` and, if it is for Jarvis, answer it through ``sink``
        (or commit the turn already started on it)."""
        if utterance.speculation is not None:
            return await self._commit(utterance.speculation)
        try:
            transcript = await self.asr.transcribe_async(utterance.audio)
        except JarvisError as exc:
            self.emit(EventType.ERROR, str(exc), "asr")
            return TurnResult("", ignored=True)
        self.emit(EventType.TRANSCRIPT, transcript.text)
        latency = {"endpoint": utterance.endpoint_silence_s, "asr": transcript.latency_s}
        request = self._for_us(transcript.text)
        if request is None:
            self.emit(EventType.IGNORED, transcript.text)
            return TurnResult(transcript.text, ignored=True, latency=latency)
        if not request:  # the wake phrase alone: acknowledge, then listen without it
            await self._say(ACKNOWLEDGEMENT, sink)
            return TurnResult(transcript.text, reply=ACKNOWLEDGEMENT, latency=latency)
        if self.intercept is not None and (handled := await self.intercept(request)) is not None:
            await self._committed()  # e.g. a device command, done without the LLM
            if handled.act is not None:
                handled.act()
            await self._say(handled.reply, sink)
            self.conversation.add_turn(request, handled.reply)
            self.emit(EventType.REPLY_DONE, handled.reply, interrupted=False)
            return TurnResult(transcript.text, reply=handled.reply, latency=latency)
        return await self._run_reply(transcript.text, request, sink, utterance.last_voice_at,
                                     latency)

    async def _say(self, text: str, sink: AudioSink) -> None:
        """Speak a fixed text (no LLM), then keep listening without the wake phrase."""
        try:
            await sink.play(_gated(self.tts.stream(text)), self.tts.sample_rate)
        except JarvisError as exc:
            self.emit(EventType.ERROR, str(exc), "tts")
        self._follow_up_until = time.monotonic() + self.settings.follow_up_s

    async def text_turn(self, text: str, sink: AudioSink | None) -> TurnResult:
        """Answer typed (or MQTT) text; spoken through ``sink`` when one is given."""
        return await self._run_reply(text, text, sink, time.monotonic(), {})

    async def _run_reply(self, heard: str, request: str, sink: AudioSink | None,
                         since: float, latency: dict[str, float]) -> TurnResult:
        """Run the reply as its own task (barge-in cancels it) and return what was said,
        whether it finished or was interrupted."""
        await self.cancel_reply()
        result = TurnResult(heard, latency=latency)
        reply = asyncio.create_task(self._reply_task(result, request, sink, since))
        self._reply = reply
        try:
            await asyncio.wait({reply})  # an interrupted reply is a result, not an error
        except asyncio.CancelledError:  # we are being shut down: stop the reply too
            reply.cancel()
            raise
        if not reply.cancelled() and (exc := reply.exception()) is not None:
            raise exc
        return result

    async def _reply_task(self, result: TurnResult, request: str, sink: AudioSink | None,
                          since: float) -> TurnResult:
        latency = result.latency
        spoken = _SpokenText()
        llm: TokenStream | None = None
        t_start = time.monotonic()
        self.emit(EventType.THINKING, request)
        try:
            llm, stream = await self._stream_reply(request)
            pieces: list[str] = []

            async def tokens() -> AsyncIterator[str]:
                async for piece in stream:
                    if not pieces:
                        latency["llm_ttft"] = time.monotonic() - t_start
                        self.emit(EventType.FIRST_TOKEN)
                    pieces.append(piece)
                    yield piece

            if sink is None:
                async for _ in tokens():
                    pass
                spoken.add_all("".join(pieces))
            else:
                await sink.play(self._timed(self.tts.stream(tokens()), spoken, since, t_start,
                                            latency), self.tts.sample_rate)
            await self._committed()  # nothing was played (an empty reply): wait anyway
        except asyncio.CancelledError:
            result.interrupted = True
            raise
        except JarvisError as exc:
            stage = "tts" if type(exc).__name__.startswith("Tts") else (
                "audio" if type(exc).__name__.startswith("Audio") else "llm")
            self.emit(EventType.ERROR, str(exc), stage)
            await self._committed()
        finally:
            if llm is not None:
                llm.cancel()  # interrupted or failed: free the model now (no-op when done)
            result.reply = spoken.text()
            latency["total"] = time.monotonic() - t_start
            if not self._uncommitted():  # an abandoned speculation leaves no trace
                self._finish(result, request, llm.stats if llm is not None else None)
        return result

    async def _stream_reply(self, request: str) -> tuple[TokenStream, AsyncIterator[str]]:
        """Start the LLM stream, dropping the oldest turns if the history is too long."""
        while True:
            stream = self.backend.stream_chat(self.conversation.messages(request))
            iterator = stream.__aiter__()
            try:
                first = await iterator.__anext__()
            except StopAsyncIteration:
                first = ""
            except PromptTooLongError:
                if not self.conversation.turns:
                    raise
                del self.conversation.turns[0]
                continue
            return stream, _prepend(first, iterator)

    async def _timed(self, chunks: AsyncIterable[TtsChunk], spoken: _SpokenText, since: float,
                     t_start: float, latency: dict[str, float]) -> AsyncIterator[TtsChunk]:
        """Pass chunks to the sink, noting the first audio and what has been heard. A
        speculative turn's first chunk is synthesised, then waits for the commit."""
        async for chunk in chunks:
            if "voice_to_voice" not in latency:
                await self._committed()
                now = time.monotonic()
                latency["tts_first"] = now - t_start - latency.get("llm_ttft", 0.0)
                latency["voice_to_voice"] = now - since
                self.emit(EventType.FIRST_AUDIO, voice_to_voice_s=latency["voice_to_voice"])
            spoken.start(chunk)
            yield chunk
        spoken.finish_current()

    def _finish(self, result: TurnResult, request: str, stats: GenerationStats | None) -> None:
        if result.reply or result.interrupted:
            self.conversation.add_turn(request, result.reply or "...")
            self.backend.prepare(self.conversation.history())  # evaluated while we listen
        self._follow_up_until = time.monotonic() + self.settings.follow_up_s
        timings: dict[str, Any] = {f"{k}_s": v for k, v in result.latency.items()}
        self.emit(EventType.REPLY_DONE, result.reply, interrupted=result.interrupted,
                  speculative=_SPECULATION.get() is not None, **timings)
        if self.tracker is not None and "voice_to_voice" in result.latency:
            lat = result.latency
            self.tracker.record(RequestRecord(
                total_s=lat["voice_to_voice"], ttft_s=lat.get("llm_ttft"),
                stages={k: v for k, v in lat.items() if k not in ("voice_to_voice", "total")},
                prompt_tokens=stats.prompt_tokens if stats else 0,
                cached_tokens=stats.cached_tokens if stats else 0,
                cache_hit=stats.cache_hit if stats else None,
                label="voice"))

    # ------------------------------------------------------------------ wake phrase

    def _for_us(self, text: str) -> str | None:
        """The request in ``text``: all of it when no wake phrase is configured or a
        follow-up is still open, the words after the wake phrase, or None."""
        words = _words(text)
        if not words:
            return None
        if not self._wake or time.monotonic() < self._follow_up_until:
            return text.strip()
        n = len(self._wake)
        for start in range(min(3, len(words) - n + 1)):  # allow "ok, hey jarvis ..."
            window = words[start:start + n]
            if all(_sounds_alike(a, b) for a, b in zip(window, self._wake, strict=True)):
                rest = _after_words(text, start + n)
                self.emit(EventType.WAKE, rest)
                return rest
        return None


class _SpokenText:
    """Tracks which sentences' audio has been handed to the speaker, so an interrupted
    reply is recorded as what the user actually heard. A sentence arrives as one or
    more TTS pieces; the share of an unfinished sentence that was heard is estimated
    from the audio already handed over at a typical speaking rate."""

    SECONDS_PER_CHAR = 0.065  # piper voices speak roughly 15 characters a second

    def __init__(self) -> None:
        self._done: list[str] = []
        self._sentence = ""
        self._heard_s = 0.0
        self._piece: TtsChunk | None = None
        self._since = 0.0

    def start(self, chunk: TtsChunk) -> None:
        sentence = chunk.sentence or chunk.text
        if sentence != self._sentence:
            self.finish_current()
            self._sentence, self._heard_s = sentence, 0.0
        elif self._piece is not None:
            self._heard_s += self._piece.duration_s
        self._piece, self._since = chunk, time.monotonic()

    def finish_current(self) -> None:
        if self._sentence:
            self._done.append(self._sentence)
        self._sentence, self._piece, self._heard_s = "", None, 0.0

    def add_all(self, text: str) -> None:
        self._done.append(text.strip())

    def text(self) -> str:
        """Finished sentences, plus the share of the current one already heard."""
        parts = list(self._done)
        if self._sentence and self._piece is not None:
            heard = self._heard_s + min(self._piece.duration_s, time.monotonic() - self._since)
            words = self._sentence.split()
            share = heard / max(1e-3, len(self._sentence) * self.SECONDS_PER_CHAR)
            cut = int(len(words) * min(1.0, share))
            if cut:
                parts.append(" ".join(words[:cut]) + ("" if cut == len(words) else "..."))
        return " ".join(p for p in parts if p).strip()


async def _gated(chunks: AsyncIterable[TtsChunk]) -> AsyncIterator[TtsChunk]:
    """``chunks``, each held until the turn is committed (only the first ever waits)."""
    async for chunk in chunks:
        await VoicePipeline._committed()
        yield chunk


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if first:
        yield first
    async for piece in rest:
        yield piece


_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _sounds_alike(heard: str, expected: str) -> bool:
    """Word match that forgives one letter in longer words: speech recognition writes
    "jarvis" as "jervis" or "jarvus" often enough to matter for a wake phrase."""
    if heard == expected:
        return True
    if min(len(heard), len(expected)) < 5 or abs(len(heard) - len(expected)) > 1:
        return False
    previous = list(range(len(expected) + 1))
    for i, a in enumerate(heard, 1):
        current = [i]
        for j, b in enumerate(expected, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1] <= 1


def _after_words(text: str, count: int) -> str:
    """``text`` without its first ``count`` words (and the punctuation after them)."""
    matches = list(re.finditer(r"[A-Za-z0-9']+", text))
    if count >= len(matches):
        return ""
    return text[matches[count].start():].strip()


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

    def on_event(event: PipelineEvent) -> None:
        if event.type in (EventType.REPLY_DONE, EventType.IGNORED, EventType.ERROR):
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
