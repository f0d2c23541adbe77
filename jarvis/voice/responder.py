"""The one responder: every turn, whatever its entry point, is answered here.

    request ─ "start over"? ─ device map (matcher → grammar fallback) ─ LLM (with the
    conversation's history, under the repetition guard) ─ TTS ─ sink

Each step emits :class:`~jarvis.voice.events.TurnEvent`\\ s on the bus, and every turn
ends with exactly one ``TURN_END`` (answered, ignored, cancelled or failed, and where).
A speculative turn (see :mod:`jarvis.voice.turn`) holds its events, its device
commands, its audio and the history back until it is committed, and leaves no trace
at all when it is abandoned.

``respond`` never raises for a failed stage (the result says what failed); it
re-raises ``CancelledError`` untouched, except for a turn stopped through
:meth:`Responder.interrupt` (barge-in, a cancel command), which returns its result:
what was said up to the interruption.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from jarvis.audio.errors import AudioError
from jarvis.devices.device_map import DeviceCommand
from jarvis.devices.handler import DeviceHandler
from jarvis.errors import BackendError, JarvisError, ModelError, PromptTooLongError
from jarvis.latency import LatencyTracker, RequestRecord
from jarvis.llm.base import ChatMessage, GenerationOptions, LLMBackend, TokenStream
from jarvis.llm.dialogue import Conversation
from jarvis.speech.tts import PiperTts, TtsChunk, TtsError
from jarvis.voice.conversations import RESET_REPLY, Conversations, split_reset
from jarvis.voice.events import EventBus, EventType, Outcome, Stage, TurnEvent
from jarvis.voice.repetition import RepeatedOpening, ReplyGuard
from jarvis.voice.spoken import SpokenText
from jarvis.voice.turn import RequestError, Turn, TurnResult, validate_request

log = logging.getLogger(__name__)

Actuator = Callable[[Sequence[DeviceCommand]], None]
"""Sends device commands (the MQTT bridge's publish); called once per turn, after the
turn is committed."""


class AudioSink(Protocol):
    """Where replies are heard: plays a stream of TTS chunks, returns when done, stops
    at once when cancelled."""

    async def play(self, chunks: AsyncIterable[TtsChunk], rate: int) -> None: ...


class Responder:
    """Answers turns; owns the conversations and the latency of every turn."""

    def __init__(self, backend: LLMBackend, conversations: Conversations, *,
                 tts: PiperTts | None = None, devices: DeviceHandler | None = None,
                 bus: EventBus | None = None, repetition_guard: bool = True) -> None:
        self.backend = backend
        self.conversations = conversations
        self.tts = tts
        self.devices = devices
        self.bus = bus or EventBus()
        self.repetition_guard = repetition_guard
        self.actuator: Actuator | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        """Turns being answered, by id, in arrival order."""
        self._interrupted: set[str] = set()
        self.regenerated = 0
        """Replies the repetition guard threw away and asked again without history."""

    # ------------------------------------------------------------------ events

    def emit(self, turn: Turn, type: EventType, text: str = "", *, stage: Stage | None = None,
             outcome: Outcome | None = None, **data: Any) -> None:
        event = TurnEvent(type, turn.id, turn.source, turn.conversation_id or "", text, stage,
                          outcome, data, room=turn.room)
        if turn.gate is None or not turn.gate.hold(event):
            self.bus.publish(event)

    def commit(self, turn: Turn) -> None:
        """The endpoint confirmed a speculative turn: let it be seen and heard."""
        if turn.gate is not None:
            turn.gate.commit(self.bus.publish)

    # ------------------------------------------------------------------ control

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def interrupt(self, turn_id: str | None = None) -> bool:
        """Stop a turn (default: the oldest one being answered, i.e. the one the model
        serves now); its ``respond`` returns what was said so far. False if none."""
        if turn_id is None:
            turn_id = next(iter(self._tasks), None)
        task = self._tasks.get(turn_id) if turn_id is not None else None
        if task is None or task.done() or turn_id is None:
            return False
        self._interrupted.add(turn_id)
        task.cancel()
        return True

    async def say(self, text: str, sink: AudioSink) -> bool:
        """Speak ``text`` as it is (an announcement, not a request); False without TTS."""
        if self.tts is None or not text.strip():
            return False
        await sink.play(self.tts.stream(text), self.tts.sample_rate)
        return True

    # ------------------------------------------------------------------ a turn

    async def respond(self, turn: Turn, sink: AudioSink | None = None) -> TurnResult:
        """Answer ``turn`` (spoken through ``sink`` when given and ``turn.speak``)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks[turn.id] = task
        result = TurnResult(turn.id, Outcome.ANSWERED, turn.transcript, turn.request)
        spoken = SpokenText()
        started = time.monotonic()
        try:
            await self._respond(turn, sink if turn.speak else None, result, spoken)
        except asyncio.CancelledError:
            result.outcome, result.interrupted = Outcome.CANCELLED, True
            if not result.stats:  # stopped before the model's first piece
                result.stats = _cancelled_stats(0)
            if turn.id not in self._interrupted:
                self._end(turn, result, spoken, started)
                raise
            _uncancel()
        except RequestError as exc:
            self._fail(turn, result, Stage.RECEIVED, str(exc), exc.code)
        except JarvisError as exc:
            self._failed(turn, result, _stage_of(exc, turn.stage), exc)
        except Exception as exc:  # a bug must not end the loop: report it as a failure
            self._failed(turn, result, turn.stage, exc)
        finally:
            self._tasks.pop(turn.id, None)
            self._interrupted.discard(turn.id)
        self._end(turn, result, spoken, started)
        return result

    async def _respond(self, turn: Turn, sink: AudioSink | None, result: TurnResult,
                       spoken: SpokenText) -> None:
        request = validate_request(turn.request)
        reset, request = split_reset(request)
        result.request = request
        entry = self.conversations.get(turn.conversation_id)
        async with entry.lock:
            if reset:
                await turn.committed()
                self.conversations.reset(turn.conversation_id)
                entry = self.conversations.get(turn.conversation_id)
                if not request:
                    result.intent = "control"
                    await self._speak_fixed(turn, RESET_REPLY, sink, spoken)
                    return
            self.emit(turn, EventType.THINKING, request)
            if self.devices is not None:
                turn.stage = Stage.DEVICES
                answer = await self.devices.handle(request)
                if answer is not None:
                    turn.latency["devices"] = answer.seconds
                    result.intent = answer.intent
                    await turn.committed()  # a speculative turn acts only once committed
                    self._act(answer.commands, result)
                    await self._speak_fixed(turn, answer.reply, sink, spoken)
                    self._remember(turn, entry.conversation, request, spoken.text())
                    return
            await self._answer(turn, entry.conversation, request, sink, result, spoken)

    def _act(self, commands: Sequence[DeviceCommand], result: TurnResult) -> None:
        result.actions = [c.describe() for c in commands]
        if not commands:
            return
        if self.actuator is None:
            log.warning("device commands not sent (no MQTT bridge): %s",
                        ", ".join(f"{c.device.id}.{c.action.name}" for c in commands))
            return
        self.actuator(commands)

    async def _speak_fixed(self, turn: Turn, text: str, sink: AudioSink | None,
                           spoken: SpokenText) -> None:
        """A reply without the model (device answers, acknowledgements)."""
        if turn.on_text is not None:
            turn.on_text(text)
        if sink is None or self.tts is None:
            await turn.committed()
            spoken.add_all(text)
            return
        turn.stage = Stage.TTS
        await sink.play(self._timed(turn, self.tts.stream(text), spoken, time.monotonic()),
                        self.tts.sample_rate)

    async def acknowledge(self, turn: Turn, text: str, sink: AudioSink | None) -> TurnResult:
        """A whole turn answered with a fixed ``text`` (e.g. "Yes?" to the wake phrase)."""
        result = TurnResult(turn.id, Outcome.ANSWERED, turn.transcript, turn.request,
                            intent="control")
        spoken = SpokenText()
        started = time.monotonic()
        try:
            await self._speak_fixed(turn, text, sink, spoken)
        except JarvisError as exc:
            stage = _stage_of(exc, turn.stage)
            self._fail(turn, result, stage, str(exc), f"{stage.value}_failed")
        self._end(turn, result, spoken, started)
        return result

    def ignore(self, turn: Turn) -> TurnResult:
        """End a turn that was not for Jarvis (no wake phrase, nothing heard)."""
        result = TurnResult(turn.id, Outcome.IGNORED, turn.transcript, turn.request)
        self._end(turn, result, SpokenText(), turn.since)
        return result

    def fail(self, turn: Turn, stage: Stage, exc: Exception) -> TurnResult:
        """End a turn whose ``stage`` failed before it reached the responder (ASR, the
        wake check). An exception that is not a :class:`JarvisError` is a bug: it is
        logged with its traceback and reported as ``internal_error``, and the caller
        goes on listening."""
        result = TurnResult(turn.id, Outcome.FAILED, turn.transcript, turn.request)
        self._failed(turn, result, stage, exc)
        self._end(turn, result, SpokenText(), turn.since)
        return result

    # ------------------------------------------------------------------ the model

    async def _answer(self, turn: Turn, conversation: Conversation, request: str,
                      sink: AudioSink | None, result: TurnResult, spoken: SpokenText) -> None:
        turn.stage = Stage.LLM
        t_start = time.monotonic()
        pieces = self._reply_pieces(turn, conversation, request, result, t_start)
        if sink is None or self.tts is None:
            released: list[str] = []
            try:
                async for piece in pieces:
                    released.append(piece)
            finally:  # interrupted too: what was shown is what was said
                spoken.add_all("".join(released))
            await turn.committed()
        else:
            await sink.play(self._timed(turn, self.tts.stream(pieces), spoken, t_start),
                            self.tts.sample_rate)
            await turn.committed()  # nothing was played (an empty reply): wait anyway
        if not result.stats.get("repeated") and not result.stats.get("looped"):
            self._remember(turn, conversation, request, spoken.text())

    async def _reply_pieces(self, turn: Turn, conversation: Conversation, request: str,
                            result: TurnResult, t_start: float) -> AsyncIterator[str]:
        """The reply's text as the repetition guard releases it. A reply that opens like
        an earlier one is thrown away (nothing of it was released) and asked once more
        without the history."""
        earlier = [reply for _, reply in conversation.turns]
        options = GenerationOptions(max_tokens=turn.max_tokens) if turn.max_tokens else None
        first = True
        for attempt in range(2):
            fresh = attempt == 1
            guard = ReplyGuard(earlier, raise_on_repeat=(
                not fresh and self.repetition_guard and bool(earlier)))
            stream = await self._open(conversation, request, options, fresh=fresh)
            received = 0
            try:
                async for piece in stream:
                    received += 1
                    if first:
                        first = False
                        turn.latency["llm_ttft"] = time.monotonic() - t_start
                        self.emit(turn, EventType.FIRST_TOKEN)
                    out = guard.feed(piece)
                    if out:
                        yield self._released(turn, out)
                    if guard.looped:
                        break
                tail = guard.finish()
            except RepeatedOpening as exc:
                log.info("turn %s: the reply opened like an earlier one (%r); asking again "
                         "without the history", turn.id, str(exc))
                result.regenerated = True
                self.regenerated += 1
                continue
            finally:
                stream.cancel()  # a no-op when it finished; frees the model otherwise
                # Stopped mid-stream, the backend's own count arrives later: count here.
                result.stats = (_stats(stream) if stream.stats is not None
                                else _cancelled_stats(received))
            if tail:
                yield self._released(turn, tail)
            result.stats["repeated"] = guard.repeated
            result.stats["looped"] = guard.looped
            return

    @staticmethod
    def _released(turn: Turn, text: str) -> str:
        if turn.on_text is not None:
            turn.on_text(text)
        return text

    async def _open(self, conversation: Conversation, request: str,
                    options: GenerationOptions | None, *, fresh: bool) -> _Prepended:
        """Start the model's stream; when the history no longer fits the context, the
        oldest turns go first."""
        while True:
            messages = ([ChatMessage("system", conversation.system_prompt),
                         ChatMessage("user", request)] if fresh
                        else conversation.messages(request))
            if fresh and not conversation.system_prompt:
                messages = messages[1:]
            stream = self.backend.stream_chat(messages, options)
            iterator = stream.__aiter__()
            try:
                first = await iterator.__anext__()
            except StopAsyncIteration:
                first = ""
            except PromptTooLongError:
                if fresh or not conversation.turns:
                    raise
                del conversation.turns[0]
                continue
            return _Prepended(stream, first, iterator)

    # ------------------------------------------------------------------ audio

    async def _timed(self, turn: Turn, chunks: AsyncIterable[TtsChunk], spoken: SpokenText,
                     t_start: float) -> AsyncIterator[TtsChunk]:
        """Pass chunks to the sink, noting the first audio and what has been heard. A
        speculative turn's first chunk is synthesised, then waits for the commit."""
        async for chunk in chunks:
            if "tts_first" not in turn.latency:
                await turn.committed()
                now = time.monotonic()
                turn.latency["tts_first"] = now - t_start - turn.latency.get("llm_ttft", 0.0)
                turn.latency["voice_to_voice"] = now - turn.since
                turn.stage = Stage.AUDIO
                self.emit(turn, EventType.FIRST_AUDIO,
                          voice_to_voice_s=turn.latency["voice_to_voice"])
            spoken.start(chunk)
            yield chunk
        spoken.finish_current()

    # ------------------------------------------------------------------ the end

    def _remember(self, turn: Turn, conversation: Conversation, request: str,
                  reply: str) -> None:
        if turn.conversation_id is None or not reply:
            return
        conversation.add_turn(request, reply)
        self.backend.prepare(conversation.history())  # evaluated while we listen

    def _failed(self, turn: Turn, result: TurnResult, stage: Stage, exc: Exception) -> None:
        """Report ``exc`` as the turn's failure in ``stage``: a :class:`JarvisError` by its
        message, anything else as a bug (logged with its traceback, ``internal_error``)."""
        if isinstance(exc, JarvisError):
            self._fail(turn, result, stage, str(exc), f"{stage.value}_failed")
            return
        log.error("turn %s failed in %s", turn.id, stage.value, exc_info=exc)
        self._fail(turn, result, stage, f"{type(exc).__name__}: {exc}"[:300], "internal_error")

    def _fail(self, turn: Turn, result: TurnResult, stage: Stage, message: str,
              code: str) -> None:
        result.outcome, result.failed_stage = Outcome.FAILED, stage
        result.error, result.error_code = message, code
        self.emit(turn, EventType.ERROR, message, stage=stage, code=code)

    def _end(self, turn: Turn, result: TurnResult, spoken: SpokenText, started: float) -> None:
        """Emit the turn's one ``TURN_END``; an abandoned speculation leaves no trace."""
        result.reply = spoken.text()
        turn.latency["total"] = time.monotonic() - started
        result.latency = dict(turn.latency)
        if turn.uncommitted:
            return
        if result.outcome is Outcome.CANCELLED and result.reply and turn.conversation_id:
            entry = self.conversations.get(turn.conversation_id)
            entry.conversation.add_turn(result.request, result.reply)  # what was heard
        turn.stage = Stage.DONE
        self.emit(turn, EventType.TURN_END, result.reply, stage=result.failed_stage,
                  outcome=result.outcome, transcript=result.transcript,
                  request=result.request, interrupted=result.interrupted,
                  actions=result.actions, intent=result.intent, error=result.error,
                  code=result.error_code, regenerated=result.regenerated,
                  speculative=turn.gate is not None,
                  latency=dict(result.latency), stats=dict(result.stats))


class _Prepended:
    """A token stream whose first piece was already read (to catch a too-long prompt)."""

    def __init__(self, stream: TokenStream, first: str, rest: AsyncIterator[str]) -> None:
        self._stream = stream
        self._first = first
        self._rest = rest

    @property
    def stats(self) -> Any:
        return self._stream.stats

    def cancel(self) -> None:
        self._stream.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        if self._first:
            yield self._first
        async for piece in self._rest:
            yield piece


def _cancelled_stats(received: int) -> dict[str, object]:
    """A reply stopped before the backend's own count came: the pieces received."""
    return {"completion_tokens": received, "finish_reason": "cancelled"}


def _stats(stream: TokenStream | _Prepended) -> dict[str, object]:
    stats = stream.stats
    if stats is None:
        return {}
    return {"prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
            "completion_tokens": stats.completion_tokens, "cache_hit": stats.cache_hit,
            "finish_reason": stats.finish_reason, "ttft_s": stats.ttft_s,
            "total_s": stats.total_s, "queue_s": stats.queue_s, "stages": dict(stats.stages)}


def _stage_of(exc: JarvisError, current: Stage) -> Stage:
    """Which stage an error belongs to: the TTS stream consumes the model's stream, so
    the stage the turn was in does not always say."""
    if isinstance(exc, TtsError):
        return Stage.TTS
    if isinstance(exc, AudioError):
        return Stage.AUDIO
    if isinstance(exc, (BackendError, ModelError, PromptTooLongError)):
        return Stage.LLM
    return current


def _uncancel() -> None:
    """Forget a cancellation we asked for and handled (Python 3.11+ counts them)."""
    task = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        task.uncancel()


def tracker_listener(tracker: LatencyTracker) -> Callable[[TurnEvent], None]:
    """Feed ``tracker`` from ``TURN_END`` events: voice turns count from the user's
    last word to the first reply audio, text turns their whole time; failures count as
    errors; ignored and cancelled turns are not requests."""

    def on_event(event: TurnEvent) -> None:
        if event.type is not EventType.TURN_END:
            return
        if event.outcome not in (Outcome.ANSWERED, Outcome.FAILED):
            return
        latency: dict[str, float] = dict(event.data.get("latency", {}))
        stats: dict[str, Any] = dict(event.data.get("stats", {}))
        total = latency.get("voice_to_voice", latency.get("total", 0.0))
        tracker.record(RequestRecord(
            total_s=total, ttft_s=latency.get("llm_ttft"),
            stages={k: v for k, v in latency.items() if k not in ("voice_to_voice", "total")},
            prompt_tokens=int(stats.get("prompt_tokens", 0) or 0),
            cached_tokens=int(stats.get("cached_tokens", 0) or 0),
            completion_tokens=int(stats.get("completion_tokens", 0) or 0),
            cache_hit=stats.get("cache_hit") if isinstance(stats.get("cache_hit"), bool)
            else None,
            error=(str(event.data.get("error")) or "failed")[:200]
            if event.outcome is Outcome.FAILED else None,
            label=event.source.value if event.source else ""))

    return on_event
