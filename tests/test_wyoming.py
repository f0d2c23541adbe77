"""Jarvis as a Wyoming server, driven by the ``wyoming`` library's own client over TCP on
127.0.0.1: the real models, the real server, no Home Assistant needed.

One server (the real assistant: starter LLM, tiny.en, piper) serves the whole module on
a loop in a thread; each test talks to it the way Home Assistant does, a new connection
per request. The last test runs ``jarvis wyoming`` as a process with MQTT, to see a
device command of a Wyoming turn go out on a real broker through the one actuator.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.handle import Handled, HandledChunk, NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from jarvis.evaluation.wer import word_error_rate
from jarvis.voice.assembly import Assistant, build_assistant
from jarvis.voice.events import EventType, Source, TurnEvent
from jarvis.wyoming.server import WyomingServer, start_wyoming
from tests.support.mqtt import (
    EXAMPLE_DEVICES,
    HubProcess,
    LoopThread,
    Mosquitto,
    free_port,
    hub_settings,
    probe,
    process_env,
)
from tests.support.speech import JFK, JFK_TEXT

pytestmark = pytest.mark.slow

SHARED_JFK = Path(__file__).resolve().parents[2] / "shared" / "audio" / "jfk-16k-mono.wav"
IDLE_S = 1.0
READ_S = 30.0
"""Longest wait for one event (a real model answers well within it)."""


@dataclass
class Served:
    """The module's server and what it is built on."""

    server: WyomingServer
    assistant: Assistant
    loop: LoopThread
    events: list[TurnEvent] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.port, connect_timeout=5, read_timeout=READ_S)

    def turn_end(self, request: str) -> TurnEvent:
        return next(e for e in reversed(self.events)
                    if e.type is EventType.TURN_END and e.data.get("request") == request)


@pytest.fixture(scope="module")
def served(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("wyoming")
    settings = hub_settings(tmp, WYOMING_URI=f"tcp://127.0.0.1:{free_port()}",
                            WYOMING_ZEROCONF="false", WYOMING_IDLE_TIMEOUT_S=str(IDLE_S),
                            DEVICES_FILE=str(EXAMPLE_DEVICES), MAX_TOKENS="12",
                            VAD_MAX_UTTERANCE_S="15")

    async def start() -> tuple[Assistant, WyomingServer]:
        assistant = await build_assistant(settings, listen=False)
        return assistant, await start_wyoming(settings, assistant)

    assistant, server = loop_thread.run(start(), 180)
    result = Served(server, assistant, loop_thread)
    assistant.bus.subscribe(result.events.append)
    yield result

    async def stop() -> None:
        await server.stop()
        await assistant.close()

    loop_thread.run(stop(), 30)


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a client coroutine on its own loop (the server has its own, in its thread)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wav_pcm(path: Path) -> tuple[bytes, int, int, int]:
    with wave.open(str(path), "rb") as wav:
        return (wav.readframes(wav.getnframes()), wav.getframerate(), wav.getsampwidth(),
                wav.getnchannels())


async def read_until(client: AsyncTcpClient, *types: str) -> list[Event]:
    """Every event up to and including the first of ``types`` (EOF is an error)."""
    events: list[Event] = []
    while True:
        event = await client.read_event()
        assert event is not None, f"connection closed before {types}: {events}"
        events.append(event)
        if event.type in types:
            return events


async def transcribe(served: Served, pcm: bytes, rate: int, width: int, channels: int,
                     samples_per_chunk: int = 1024) -> list[Event]:
    async with served.client() as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate, width, channels).event())
        step = samples_per_chunk * width * channels
        for start in range(0, len(pcm), step):
            await client.write_event(AudioChunk(rate, width, channels,
                                                pcm[start:start + step]).event())
        await client.write_event(AudioStop().event())
        return await read_until(client, "transcript-stop")


def transcript_of(events: list[Event]) -> str:
    return next(Transcript.from_event(e).text for e in events if Transcript.is_type(e.type))


@dataclass
class Speech:
    rate: int
    width: int
    channels: int
    pcm: bytes
    starts: int
    first_chunk_s: float | None
    events: list[str]

    @property
    def samples(self) -> np.ndarray:
        return np.frombuffer(self.pcm, dtype="<i2")


async def collect_audio(client: AsyncTcpClient, until: str, sent_at: float,
                        earlier: Speech | None = None) -> Speech:
    """The audio up to the first ``until`` event (continuing ``earlier``'s stream)."""
    speech = Speech(0, 0, 0, b"", 0, None, [])
    if earlier is not None:
        speech.rate, speech.width, speech.channels = earlier.rate, earlier.width, earlier.channels
    while True:
        event = await client.read_event()
        assert event is not None, f"connection closed before {until}: {speech.events}"
        speech.events.append(event.type)
        if AudioStart.is_type(event.type):
            start = AudioStart.from_event(event)
            speech.rate, speech.width, speech.channels = start.rate, start.width, start.channels
            speech.starts += 1
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            assert (chunk.rate, chunk.width, chunk.channels) == (
                speech.rate, speech.width, speech.channels), "chunk format != audio-start"
            if speech.first_chunk_s is None:
                speech.first_chunk_s = time.monotonic() - sent_at
            speech.pcm += chunk.audio
        elif Error.is_type(event.type):
            raise AssertionError(f"error event: {event.data}")
        if event.type == until:
            return speech


# --------------------------------------------------------------------------- describe


def test_describe_answers_within_a_second_with_asr_tts_and_handle(served: Served) -> None:
    async def describe() -> tuple[Info, float]:
        started = time.monotonic()
        async with served.client() as client:
            await client.write_event(Describe().event())
            events = await asyncio.wait_for(read_until(client, "info"), 1.0)
        return Info.from_event(events[-1]), time.monotonic() - started

    info, seconds = run(describe())
    assert seconds < 1.0
    assert [p.name for p in info.asr] == ["Jarvis"] and info.asr[0].installed
    assert info.asr[0].supports_transcript_streaming and info.asr[0].models[0].languages == ["en"]
    assert info.tts[0].supports_synthesize_streaming
    assert info.tts[0].voices[0].name == "en_US-joe-medium"
    assert info.tts[0].voices[0].languages == ["en_US"]
    handle = info.handle[0]
    assert handle.installed and handle.supports_handled_streaming
    assert handle.supports_home_control  # the example device map is loaded
    assert not info.wake and not info.intent


# --------------------------------------------------------------------------- asr


def test_transcribe_jfk_in_1024_sample_chunks(served: Served) -> None:
    path = SHARED_JFK if SHARED_JFK.is_file() else JFK
    pcm, rate, width, channels = wav_pcm(path)
    events = run(transcribe(served, pcm, rate, width, channels))
    types = [e.type for e in events]
    # Streaming events for clients that read them; the plain transcript for the others.
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"]
    text = transcript_of(events)
    assert word_error_rate(JFK_TEXT, text) <= 0.10, text
    chunks = "".join(e.data["text"] for e in events if e.type == "transcript-chunk")
    assert chunks == text


def test_any_pcm_format_is_converted(served: Served) -> None:
    """48 kHz stereo 24-bit and 8 kHz 8-bit unsigned, chunks cut mid-frame: same words."""
    samples, rate, _, _ = wav_pcm(JFK)
    mono = np.frombuffer(samples, dtype="<i2").astype(np.float64) / 32768.0
    from jarvis.audio.resample import resample

    hi = resample(mono.astype(np.float32), rate, 48000)
    stereo = np.stack([hi, hi * 0.5], axis=1).reshape(-1)
    ints = np.clip(np.round(stereo * (1 << 23)), -(1 << 23), (1 << 23) - 1).astype("<i4")
    pcm24 = ints[:48000 * 2 * 4].view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    lo = resample(mono.astype(np.float32), rate, 8000)
    pcm8 = np.clip(np.round(lo * 128 + 128), 0, 255).astype(np.uint8).tobytes()

    async def both() -> tuple[str, str]:
        first = await transcribe(served, pcm24, 48000, 3, 2, samples_per_chunk=1000)
        second = await transcribe(served, pcm8, 8000, 1, 1, samples_per_chunk=333)
        return transcript_of(first), transcript_of(second)

    wide, narrow = run(both())
    assert "fellow americans" in wide.lower(), wide  # the first 4 s of the speech
    assert word_error_rate(JFK_TEXT, narrow) <= 0.25, narrow


# --------------------------------------------------------------------------- tts


def test_synthesize_gives_valid_pcm_that_says_the_text(served: Served) -> None:
    text = "Turn on the kitchen light."

    async def speak_then_hear() -> tuple[Speech, str]:
        async with served.client() as client:
            sent = time.monotonic()
            await client.write_event(Synthesize(text=text).event())
            speech = await collect_audio(client, "audio-stop", sent)
        heard = await transcribe(served, speech.pcm, speech.rate, speech.width, speech.channels)
        return speech, transcript_of(heard)

    speech, heard = run(speak_then_hear())
    assert (speech.rate, speech.width, speech.channels) == (22050, 2, 1)
    assert speech.events[0] == "audio-start" and speech.events[-1] == "audio-stop"
    assert speech.starts == 1 and len(speech.pcm) % 2 == 0
    assert 0.8 < len(speech.samples) / speech.rate < 4.0
    assert np.sqrt(np.mean(speech.samples.astype(np.float64) ** 2)) > 300  # not silence
    assert word_error_rate(text, heard) <= 0.2, heard  # tiny.en may drop a word


def test_streaming_synthesis_speaks_the_first_clause_before_the_text_ends(
        served: Served) -> None:
    first, rest = "Okay, here is the plan.", " The oven is warming up and dinner is at seven."

    async def stream() -> tuple[Speech, Speech, Speech]:
        async with served.client() as client:
            sent = time.monotonic()
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text=first).event())
            # Audio must come while the rest of the text has not been sent.
            before = await collect_audio(client, "audio-chunk", sent)
            await client.write_event(SynthesizeChunk(text=rest).event())
            await client.write_event(Synthesize(text=first + rest).event())  # compat: ignored
            await client.write_event(SynthesizeStop().event())
            after = await collect_audio(client, "synthesize-stopped", sent, before)
        async with served.client() as client:
            sent = time.monotonic()
            await client.write_event(Synthesize(text=first + rest).event())
            whole = await collect_audio(client, "audio-stop", sent)
        return before, after, whole

    before, after, whole = run(stream())
    assert before.events[0] == "audio-start" and before.first_chunk_s is not None
    assert after.events[-2:] == ["audio-stop", "synthesize-stopped"]
    assert before.starts + after.starts == 1
    # The text spoken once: the compat `synthesize` inside the stream was not spoken too.
    streamed = (len(before.pcm) + len(after.pcm)) / 2
    assert 0.8 < streamed / len(whole.samples) < 1.25, (streamed, len(whole.samples))


# --------------------------------------------------------------------------- handle


async def ask(served: Served, text: str, conversation_id: str | None, *,
              streaming: bool) -> tuple[list[Event], float | None]:
    """Home Assistant's way (read until handled / not-handled) or a streaming client's
    (read until handled-stop); also the time to the first text."""
    context = {"conversation_id": conversation_id} if conversation_id else None
    async with served.client() as client:
        sent = time.monotonic()
        await client.write_event(Transcript(text, context=context, language="en").event())
        events: list[Event] = []
        first: float | None = None
        while True:
            event = await client.read_event()
            assert event is not None, events
            events.append(event)
            if first is None and event.type in ("handled-chunk", "handled"):
                first = time.monotonic() - sent
            if streaming and event.type in ("handled-stop", "error"):
                return events, first
            if not streaming and event.type in ("handled", "not-handled", "error"):
                return events, first


def test_handle_a_question_streaming_and_not(served: Served) -> None:
    async def both() -> tuple[list[Event], list[Event]]:
        plain, _ = await ask(served, "What is the capital of France?", "ha-1", streaming=False)
        streamed, _ = await ask(served, "And of Italy?", "ha-1", streaming=True)
        return plain, streamed

    plain, streamed = run(both(), 120)
    reply = Handled.from_event(plain[-1])
    assert plain[-1].type == "handled" and reply.text
    assert reply.context == {"conversation_id": "ha-1"}
    types = [e.type for e in streamed]
    assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"]
    pieces = "".join(HandledChunk.from_event(e).text for e in streamed
                     if e.type == "handled-chunk")
    assert pieces == Handled.from_event(streamed[-2]).text and pieces
    # Home Assistant's conversation id is the conversation: the second turn was answered
    # with the first in its history, whose evaluated state the cache kept.
    first, second = (served.turn_end("What is the capital of France?"),
                     served.turn_end("And of Italy?"))
    assert first.source is Source.WYOMING and first.conversation_id == "ha-1"
    conversation = served.assistant.responder.conversations.get("ha-1").conversation
    assert [request for request, _ in conversation.turns] == [
        "What is the capital of France?", "And of Italy?"]
    assert second.data["stats"]["cached_tokens"] >= first.data["stats"]["prompt_tokens"]


def test_handle_a_device_command_streaming_and_not(served: Served) -> None:
    async def both() -> tuple[list[Event], list[Event]]:
        plain, _ = await ask(served, "Turn on the kitchen light.", "ha-2", streaming=False)
        streamed, _ = await ask(served, "Switch the kitchen light off.", "ha-2",
                                streaming=True)
        return plain, streamed

    plain, streamed = run(both())
    assert Handled.from_event(plain[-1]).text == "Turning on the kitchen light."
    assert [e.type for e in streamed] == ["handled-start", "handled-chunk", "handled",
                                          "handled-stop"]
    assert Handled.from_event(streamed[2]).text == "Turning off the kitchen light."
    on = served.turn_end("Turn on the kitchen light.")
    assert on.data["intent"] == "local"
    assert [(a["device"], a["action"]) for a in on.data["actions"]] == [("kitchen_light", "on")]


def test_a_request_the_responder_refuses_is_not_handled(served: Served) -> None:
    events, _ = run(ask(served, "   ", None, streaming=False))
    assert events[-1].type == "not-handled"
    assert "empty" in (NotHandled.from_event(events[-1]).text or "")


# --------------------------------------------------------------------------- Home Assistant


def test_the_exact_home_assistant_sequence(served: Served) -> None:
    """data.py (describe, 1 s), stt.py, conversation.py, tts.py (until the first
    audio-stop, into a WAV) and the streaming tts (two tasks: write text, read audio)."""
    pcm = wav_pcm(JFK)[0]

    async def home_assistant() -> tuple[Info, str, str, bytes, bytes]:
        async with served.client() as client:  # data.py: Describe, 1 s for the Info
            await client.write_event(Describe().event())
            info = Info.from_event((await asyncio.wait_for(read_until(client, "info"), 1))[-1])
        async with served.client() as client:  # stt.py
            await client.write_event(Transcribe(language="en").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            for start in range(0, len(pcm), 2048):
                await client.write_event(AudioChunk(rate=16000, width=2, channels=1,
                                                    audio=pcm[start:start + 2048]).event())
            await client.write_event(AudioStop().event())
            while True:
                event = await client.read_event()
                assert event is not None
                if Transcript.is_type(event.type):
                    heard = Transcript.from_event(event).text
                    break
        async with served.client() as client:  # conversation.py
            await client.write_event(Transcript(
                "turn on the kitchen light", language="en",
                context={"conversation_id": "01JTESTULID", "device_id": "abc"}).event())
            while True:
                event = await client.read_event()
                assert event is not None and not Error.is_type(event.type)
                if Handled.is_type(event.type) or NotHandled.is_type(event.type):
                    answer = Handled.from_event(event).text or ""
                    break
        async with served.client() as client:  # tts.py, non-streaming
            voice = SynthesizeVoice(name=info.tts[0].voices[0].name)
            await client.write_event(Synthesize(text=answer, voice=voice).event())
            with io.BytesIO() as wav_io:
                writer: wave.Wave_write | None = None
                while True:
                    event = await client.read_event()
                    assert event is not None
                    if AudioStop.is_type(event.type):
                        break
                    if AudioChunk.is_type(event.type):
                        chunk = AudioChunk.from_event(event)
                        if writer is None:
                            writer = wave.open(wav_io, "wb")  # noqa: SIM115 (as HA does)
                            writer.setframerate(chunk.rate)
                            writer.setsampwidth(chunk.width)
                            writer.setnchannels(chunk.channels)
                        writer.writeframes(chunk.audio)
                assert writer is not None
                writer.close()
                wav_bytes = wav_io.getvalue()
        streamed = await _ha_streaming_tts(served, ["Dinner ", "is ready. ", "Come and ",
                                                    "get it while it is hot."])
        return info, heard, answer, wav_bytes, streamed

    info, heard, answer, wav_bytes, streamed = run(home_assistant())
    assert info.asr and info.tts and info.handle
    assert word_error_rate(JFK_TEXT, heard) <= 0.10
    assert answer == "Turning on the kitchen light."
    with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (22050, 2, 1)
        assert wav.getnframes() > 0.5 * 22050
    assert streamed[:4] == b"RIFF" and len(streamed) > 44 + 22050  # header, then > 0.5 s


async def _ha_streaming_tts(served: Served, pieces: list[str]) -> bytes:
    """Home Assistant's async_stream_tts_audio: a background task writes the text
    (start, chunks, the whole text for old servers, stop) while the audio is read until
    synthesize-stopped, a WAV header first."""
    async with served.client() as client:
        async def write() -> None:
            await client.write_event(SynthesizeStart().event())
            for piece in pieces:
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(Synthesize(text="".join(pieces)).event())
            await client.write_event(SynthesizeStop().event())

        writer = asyncio.create_task(write())
        out = b""
        header_sent = False
        while event := await client.read_event():
            if header_sent and AudioChunk.is_type(event.type):
                out += AudioChunk.from_event(event).audio
            elif not header_sent and AudioStart.is_type(event.type):
                start = AudioStart.from_event(event)
                with io.BytesIO() as wav_io:
                    wav_file: wave.Wave_write = wave.open(wav_io, "wb")  # noqa: SIM115
                    with wav_file:
                        wav_file.setframerate(start.rate)
                        wav_file.setsampwidth(start.width)
                        wav_file.setnchannels(start.channels)
                    out += wav_io.getvalue()
                header_sent = True
            elif SynthesizeStopped.is_type(event.type):
                break
        await writer
        return out


# --------------------------------------------------------------------------- bad input


async def exchange(served: Served, raw: bytes) -> list[Event]:
    """Send raw bytes, say nothing more is coming (a half-close), and read every event
    until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()
        events: list[Event] = []
        while (event := await asyncio.wait_for(async_read_event(reader), READ_S)) is not None:
            events.append(event)
        assert reader.at_eof(), "the server sent something that is not an event"
        return events
    finally:
        writer.close()


def _frame(event: Event) -> bytes:
    from jarvis.wyoming.protocol import encode_event

    return encode_event(event)


BAD_INPUTS: dict[str, tuple[bytes, str]] = {
    "audio without audio-start": (
        _frame(AudioChunk(16000, 2, 1, b"\0" * 2048).event()), "no_audio_start"),
    "audio-stop without audio-start": (_frame(AudioStop().event()), "no_audio_start"),
    "unknown sample width": (_frame(AudioStart(16000, 5, 1).event()),
                             "unsupported_audio_format"),
    "a 1 Hz sample rate": (_frame(AudioStart(1, 2, 1).event()), "unsupported_audio_format"),
    "zero channels": (_frame(AudioStart(16000, 2, 0).event()), "unsupported_audio_format"),
    "rate that is not a number": (b'{"type": "audio-start", "data": {"rate": "fast", '
                                  b'"width": 2, "channels": 1}}\n', "bad_event"),
    "longer than the utterance limit": (
        _frame(AudioStart(16000, 2, 1).event())
        + b"".join(_frame(AudioChunk(16000, 2, 1, b"\0" * 32000).event()) for _ in range(16))
        + _frame(AudioStop().event()), "audio_too_long"),
    "garbage bytes": (b"\x00\xff\xfe garbage that is not JSON\n", "bad_event"),
    "a JSON header that is not an object": (b"[1, 2, 3]\n", "bad_event"),
    "a header without a type": (b'{"data": {}}\n', "bad_event"),
    "a truncated JSON header": (b'{"type": "describe", "da', "bad_event"),
    "data shorter than announced": (b'{"type": "synthesize", "data_length": 40}\n{"text"',
                                    "bad_event"),
    "a payload over the limit": (b'{"type": "audio-chunk", "payload_length": 99999999}\n',
                                 "too_large"),
    "text with no words": (_frame(Synthesize(text=" ... ").event()), "tts_failed"),
    "synthesize-chunk without synthesize-start": (
        _frame(SynthesizeChunk(text="hi").event()), "no_synthesize_start"),
    "an unknown program": (_frame(Event("select-program", {"name": "whisper"})),
                           "unknown_program"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_an_error_and_a_log_line(served: Served, name: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    raw, code = BAD_INPUTS[name]
    caplog.set_level(logging.WARNING, logger="jarvis.wyoming")
    events = run(exchange(served, raw))
    assert [e.type for e in events if e.type not in ("transcript-start",)] == ["error"], events
    assert Error.from_event(events[-1]).code == code
    assert any(code in r.getMessage() for r in caplog.records), caplog.text


def test_an_unknown_event_type_is_answered_and_the_connection_goes_on(served: Served) -> None:
    async def go() -> list[Event]:
        async with served.client() as client:
            await client.write_event(Event("make-coffee", {"strength": 11}))
            await client.write_event(Describe().event())
            return await read_until(client, "info")

    events = run(go())
    assert [e.type for e in events] == ["error", "info"]
    assert Error.from_event(events[0]).code == "unknown_event"


def test_a_silent_client_is_closed_after_the_idle_timeout(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jarvis.wyoming")

    async def silent() -> tuple[list[Event], float]:
        started = time.monotonic()
        async with served.client() as client:
            events: list[Event] = []
            while (event := await client.read_event()) is not None:
                events.append(event)
        return events, time.monotonic() - started

    events, seconds = run(silent())
    assert events == [] and IDLE_S <= seconds < IDLE_S + 5
    assert any("nothing received" in r.getMessage() for r in caplog.records)


def test_fifty_connections_at_once_and_bad_clients_do_not_stop_the_others(
        served: Served) -> None:
    async def describe() -> str:
        async with served.client() as client:
            await client.write_event(Describe().event())
            return (await read_until(client, "info"))[-1].type

    async def flood() -> tuple[list[str], str, list[list[Event]]]:
        opened = [served.client() for _ in range(50)]
        await asyncio.gather(*(c.connect() for c in opened))  # 50 open at the same time
        try:
            bad = asyncio.gather(*(exchange(served, raw) for raw, _ in BAD_INPUTS.values()))
            infos = asyncio.gather(*(_describe_on(c) for c in opened))
            synthesis = _synthesize_samples(served, "Still here.")
            answers, samples, errors = await asyncio.gather(infos, synthesis, bad)
            assert served.server.connections >= 50  # every one answered and still open
        finally:
            await asyncio.gather(*(c.disconnect() for c in opened))
        return answers, await describe() if samples else "no audio", errors

    answers, after, errors = run(flood(), 120)
    assert answers == ["info"] * 50
    assert after == "info"
    assert all(events and events[-1].type == "error" for events in errors)


async def _describe_on(client: AsyncTcpClient) -> str:
    await client.write_event(Describe().event())
    return (await read_until(client, "info"))[-1].type


async def _synthesize_samples(served: Served, text: str) -> int:
    async with served.client() as client:
        sent = time.monotonic()
        await client.write_event(Synthesize(text=text).event())
        return len((await collect_audio(client, "audio-stop", sent)).samples)


# --------------------------------------------------------------------------- entry points


def test_hub_runs_wyoming_when_the_uri_is_set() -> None:
    from jarvis.cli.wyoming import hub_services
    from tests.support.speech import default_settings

    assert hub_services(default_settings()) == []
    from jarvis.config import load_settings

    on = load_settings({"JARVIS_CACHE_DIR": "", "JARVIS_WYOMING_URI": "tcp://127.0.0.1:10700"})
    assert len(hub_services(on)) == 1


def test_jarvis_wyoming_with_mqtt_sends_device_commands_through_the_bridge(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """``jarvis wyoming`` with JARVIS_MQTT_HOST: the hub and the Wyoming server share
    the responder, so a conversation turn's device command goes out over MQTT once,
    the hub's own MQTT asks still work, and SIGTERM stops both cleanly."""
    import signal

    port = free_port()
    env = process_env(mosquitto, tmp_path, WYOMING_ZEROCONF="false", SITE="wytest")
    script = ("import sys; from jarvis.cli.main import main; "
              f"sys.exit(main(['wyoming', '--uri', 'tcp://127.0.0.1:{port}']))")

    async def scenario() -> tuple[list[str], int]:
        hub = HubProcess(env, tmp_path, script=script)
        try:
            await hub.wait_line("hub ready", timeout=120)
            await hub.wait_line("Wyoming server on", timeout=5)
            async with probe(mosquitto.port, "zigbee2mqtt/#", "homeassistant-cmd/#",
                             "jarvis/wytest/#") as p:
                await p.wait_for(lambda t, b: t == "jarvis/wytest/availability"
                                 and b == b"online")
                start = len(p.messages)
                client = AsyncTcpClient("127.0.0.1", port, read_timeout=READ_S)
                async with client:
                    await client.write_event(Transcript(
                        "Open the blinds", context={"conversation_id": "x"}).event())
                    answer = (await read_until(client, "handled", "not-handled", "error"))[-1]
                assert Handled.from_event(answer).text == "Opening the blinds."
                topic, payload = await p.wait_for(
                    lambda t, b: t.startswith("homeassistant-cmd/") or
                    t.startswith("zigbee2mqtt/"), start=start)
                await p.publish("jarvis/wytest/cmd/ask", json.dumps({"text": "hi", "id": "q"}))
                await p.wait_for(lambda t, b: t == "jarvis/wytest/reply"
                                 and json.loads(b)["id"] == "q", start=start)
                sent = [t for t, _, _, _ in p.messages[start:]
                        if t.startswith(("homeassistant-cmd/", "zigbee2mqtt/"))]
            hub.signal(signal.SIGTERM)
            return [topic, payload.decode(), *sent], await hub.exit_code(60)
        finally:
            hub.kill()

    out, code = run(scenario(), 240)
    assert out[0] == "homeassistant-cmd/cover/living_room_blinds/set" and out[1] == "OPEN"
    assert out[2:] == [out[0]]  # once
    assert code == 0

