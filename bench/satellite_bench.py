#!/usr/bin/env python3
"""Voice to voice through Wyoming satellites: the same spoken requests answered through
the assistant's own microphone pipeline and through a real ``wyoming-satellite`` 1.0.0,
in one run; then four rooms speaking at the same moment against each room alone.

One process is the hub: :func:`~jarvis.voice.assembly.build_assistant` on the starter
models (``JARVIS_WAKE_WORD=off``, ``JARVIS_TEMPERATURE=0``, ``JARVIS_MAX_TOKENS`` from
``--max-tokens``, caches in a temporary directory; other ``JARVIS_*`` variables of the
environment apply, e.g. ``JARVIS_PARALLEL``) drives the satellites through
:class:`~jarvis.wyoming.rooms.Rooms`, one room each. Every satellite is a
``python -m wyoming_satellite`` process from the peers virtualenv
(``~/.cache/jarvis/peers``, built on first use: see tests/support/peers.py) on a free
127.0.0.1 port, with ``tests/support/sat_mic.py`` as its microphone (the request WAVs
paced in real time, each spoken when the bench creates its trigger file,
``--wait-for``) and ``tests/support/sat_snd.py`` as its speaker (the reply audio
appended to a file, with the ``time.monotonic()`` its first sample arrived).

**Satellite vs local microphone** (part ``local``): each round, each request once
through each path, in alternating order, ~1.5 s apart (a reply has finished playing
before the next request starts):

* *local*: the assistant's own voice pipeline (as ``jarvis run`` builds it for the
  microphone) fed by ``file_chunks(..., realtime=True)``, each chunk held until its last
  sample is due (as a sound card and sat_mic deliver; file_chunks alone hands each 32 ms
  chunk over when its first sample is due), replying to a sink that plays in real time;
  voice to voice = the turn's ``latency['voice_to_voice']`` (the VAD's last voiced
  sample → the first reply audio handed to the sink);
* *satellite*: the same WAV spoken into the satellite's microphone; voice to voice =
  sat_snd's ``first_audio`` − sat_mic's ``speech_end`` (``CLOCK_MONOTONIC`` is
  system-wide). Beside it: the hub's own ``voice_to_voice`` of the room's turn, the
  *delivery* (the hub hands the first audio to its SatelliteSink → sat_snd has it: TCP,
  the satellite, and the snd command, which wyoming-satellite 1.0.0 starts anew for
  every reply), the snd command's start-up measured on its own, and the *reference*
  (the hub's last voiced sample, from its VAD, − sat_mic's ``speech_end``).
  satellite = hub + delivery + reference.

The two definitions differ: sat_mic's ``speech_end`` is when the 1024-frame chunk holding
the last voiced sample (by RMS) was written, up to 64 ms after that sample, and Silero
hears speech end somewhat later than the RMS threshold does. So both paths are also
measured *from the last voiced sample* itself (by sat_mic's RMS rule, on each path's
sample clock) to the first reply audio (local: handed to the sink; satellite: at
sat_snd): the like-for-like comparison.

Target: satellite − local ≤ 50 ms (difference of the medians).

**Four rooms at once** (part ``rooms``): kitchen, bedroom, office, garage, each with its
own request; each round every room alone (one after another), then all four triggered
at the same moment. A reply counts as answered in its room when the room's turn ended
``answered``, its own satellite played audio and no other satellite did meanwhile, and
(at once) that audio, transcribed with the hub's ASR, has at least half the words of the
room's ``TURN_END`` reply, or more of them than of any other room's reply. The local
engine answers up to ``JARVIS_PARALLEL`` conversations in one batch.

Before measuring, every request is answered once (not counted: the local path each
request, one satellite request, the four rooms at once), and each conversation is reset
before every request, so both paths find the same
warm context cache (the system prompt and each request). The TTS phrase cache is off:
every reply is synthesised, as the same requests repeat every round. The local path
runs while the satellites stream silence to the hub (as in a house with satellites).

    .venv/bin/python bench/satellite_bench.py [--rounds 5] [--max-tokens 24]
        [--only local|rooms] [--json FILE] [--keep]

On 2 cores: ~3.5 minutes for ``--rounds 1`` (loading and warm-up included), ~2.5 more
for every further round (both parts). ``--keep`` keeps the temporary folder: each
satellite's log, its mic and snd marks, the reply audio it got.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from jarvis.audio.formats import ASR_RATE, to_float32
from jarvis.audio.resample import resample
from jarvis.config import Settings, load_settings
from jarvis.latency import percentile
from jarvis.speech.tts import PiperTts
from jarvis.voice.assembly import Assistant, build_assistant
from jarvis.voice.events import EventType, Outcome, Source, TurnEvent
from jarvis.voice.pipeline import file_chunks
from jarvis.voice.sinks import WavReplySink
from jarvis.wyoming.room import RoomLink, conversation_of
from jarvis.wyoming.rooms import Rooms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support: the real satellite and its mic/snd commands
from tests.support import peers, sat_mic, sat_snd  # noqa: E402

REQUESTS = [
    "What is the capital of France?",
    "How far away is the moon?",
    "How do I boil an egg?",
    "What is the tallest mountain in the world?",
    "Name a famous painter.",
]
ROOMS = {
    "kitchen": "What is the capital of Italy?",
    "bedroom": "Tell me something about the moon.",
    "office": "How many legs does a spider have?",
    "garage": "What colour is the sky?",
}
SATELLITE_ROOM = "lounge"
"""The room of the one satellite of part ``local``."""
LEAD_S = 0.5
CHUNK = [sat_mic.CHUNK_FRAMES]
"""Samples per chunk of the satellites' microphones (``--satellite-chunk``)."""
"""Silence before each request (the local path's too), so the VAD hears it start."""
GAP_S = 1.5
"""After a reply has played (and its satellite closed the snd command), before the
next request."""
TURN_TIMEOUT_S = 90.0
POLL_S = 0.01
SND_PROBES = 5
OVERLAP = 0.5
"""Share of the reply's words the satellite's audio must say to count as its own."""

T = TypeVar("T")
FloatArray = npt.NDArray[np.float32]


class BenchError(RuntimeError):
    """Something the bench waited for did not happen."""


# --------------------------------------------------------------------------- helpers


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def read_marks(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a marks file (a line still being written is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    marks = []
    for line in lines:
        with contextlib.suppress(ValueError):
            marks.append(json.loads(line))
    return marks


async def until(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """``check()`` once it is not None; BenchError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(POLL_S)  # polling files other processes write


def summary(values_s: Sequence[float | None]) -> dict[str, float]:
    """n, p50, p95, mean (ms) of the values that exist."""
    ms = sorted(v * 1000 for v in values_s if v is not None)
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p95_ms": round(percentile(ms, 95), 1), "mean_ms": round(statistics.fmean(ms), 1)}


def fmt(row: dict[str, float], key: str) -> str:
    return f"{row[key]:.0f}" if key in row else "-"


def write_wav16(path: Path, audio: FloatArray) -> FloatArray:
    """``audio`` (16 kHz) as a 16-bit WAV; the samples as the WAV holds them."""
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(ASR_RATE)
        wav.writeframes(pcm.tobytes())
    return to_float32(pcm)


def synthesise(texts: Sequence[str], folder: Path) -> dict[str, tuple[Path, FloatArray]]:
    """Each text said by the bundled piper voice (deterministic), as a 16 kHz WAV."""
    settings = load_settings({"JARVIS_CACHE_DIR": ""}, env_file=empty_env(folder))
    voice = PiperTts(settings.tts, deterministic=True)
    voice.load()
    try:
        out = {}
        for i, text in enumerate(dict.fromkeys(texts)):
            audio = resample(voice.synthesize(text), voice.sample_rate, ASR_RATE)
            path = folder / f"request-{i}.wav"
            out[text] = (path, write_wav16(path, audio))
        return out
    finally:
        voice.close()


def snd_startup(folder: Path, count: int) -> list[float]:
    """How long the snd command takes from being started to having its first audio
    (what wyoming-satellite pays before every reply): Popen → first_audio mark."""
    folder.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(count):
        marks = folder / f"marks-{i}.jsonl"
        argv = sat_snd.snd_command(folder / f"out-{i}.raw", marks=marks)
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        proc.communicate(b"\x01\x02" * 2048, timeout=20)
        first = [m for m in read_marks(marks) if m["event"] == "first_audio"]
        if first:
            times.append(float(first[0]["t"]) - started)
    return times


# --------------------------------------------------------------------------- hub


class Hub:
    """The assistant and every event it published."""

    def __init__(self, assistant: Assistant, settings: Settings) -> None:
        self.assistant = assistant
        self.settings = settings
        self.events: list[TurnEvent] = []
        assistant.bus.subscribe(self.events.append)

    def turn_end(self, since: int, room: str) -> TurnEvent | None:
        source = Source.SATELLITE if room else Source.MICROPHONE
        return next((e for e in self.events[since:] if e.type is EventType.TURN_END
                     and e.room == room and e.source is source), None)

    def first_audio(self, turn_id: str) -> TurnEvent | None:
        return next((e for e in self.events if e.type is EventType.FIRST_AUDIO
                     and e.turn_id == turn_id), None)

    def listening(self, since: int, room: str) -> bool | None:
        return True if any(e.type is EventType.LISTENING and e.room == room
                           for e in self.events[since:]) else None

    def reset(self, conversation_id: str) -> None:
        self.assistant.responder.conversations.reset(conversation_id)

    async def heard(self, pcm: bytes) -> str:
        """What reply audio (the TTS rate, s16 mono) says."""
        asr, tts = self.assistant.asr, self.assistant.tts
        assert asr is not None and tts is not None
        samples = np.frombuffer(pcm[:len(pcm) - len(pcm) % 2], dtype="<i2")
        if len(samples) < tts.sample_rate // 10:
            return ""
        audio = resample(to_float32(samples), tts.sample_rate, ASR_RATE)
        return (await asr.transcribe_async(audio)).text


@dataclass
class Turn:
    """One request answered through one path."""

    path: str
    """local, satellite, alone or together."""
    room: str
    request: str
    round: int
    outcome: str = "none"
    transcript: str = ""
    reply: str = ""
    v2v_s: float | None = None
    """Voice to voice as the path defines it (see the module docstring)."""
    hub_v2v_s: float | None = None
    """The hub's own ``voice_to_voice`` (the VAD's last voiced sample → first audio)."""
    sample_v2v_s: float | None = None
    """Satellite: from the last voiced sample itself, not the end of its mic chunk."""
    delivery_s: float | None = None
    """Satellite: hub hands the first audio to its sink → sat_snd has it."""
    received_v2v_s: float | None = None
    """Satellite: sat_mic's speech_end → the first reply audio-chunk sent to (and, on
    127.0.0.1, received by) the satellite: the issue's definition."""
    received_sample_v2v_s: float | None = None
    """The same, from the last voiced sample itself."""
    reference_s: float | None = None
    """Satellite: the hub's last voiced sample − sat_mic's speech_end."""
    heard: str = ""
    """Satellite: what its snd audio says, transcribed."""
    overlap: float | None = None
    """Satellite: the share of the reply's words in ``heard``."""
    routed: bool = False
    """The reply reached this path's speaker, and (satellites) no other: see
    :func:`run_satellite_turns`."""
    stray: int = 0
    """Replies other satellites got while this one was answered."""
    latency: dict[str, float] = field(default_factory=dict)
    """The turn's own stages (endpoint, asr, llm_ttft, tts_first, ...), seconds."""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def answered(self) -> bool:
        return self.outcome == "answered" and self.routed

    def take_end(self, end: TurnEvent) -> None:
        self.outcome = end.outcome.value if end.outcome is not None else "none"
        self.transcript = str(end.data.get("transcript", ""))
        self.reply = end.text
        self.latency = {k: float(v) for k, v in end.data.get("latency", {}).items()}
        self.hub_v2v_s = self.latency.get("voice_to_voice")
        stats = end.data.get("stats", {})
        self.prompt_tokens = stats.get("prompt_tokens")
        self.cached_tokens = stats.get("cached_tokens")


# --------------------------------------------------------------------------- satellites


@dataclass
class Satellite:
    """A wyoming-satellite process, its microphone's trigger files and its marks."""

    room: str
    proc: peers.SatelliteProcess
    folder: Path
    next_index: int = 0
    link: RoomLink | None = None
    """The hub's link to it (what it sent when)."""

    @property
    def uri(self) -> str:
        return f"tcp://127.0.0.1:{self.proc.port}"

    @property
    def snd_out(self) -> Path:
        return self.folder / "snd.raw"

    def trigger(self) -> int:
        """Speak the next WAV now; its index."""
        index, self.next_index = self.next_index, self.next_index + 1
        (self.folder / f"go-{index}").touch()
        return index

    def speech_end(self, index: int, after: float) -> dict[str, Any] | None:
        return next((m for m in read_marks(self.folder / "mic.jsonl")
                     if m["event"] == "speech_end" and m["index"] == index
                     and m["t"] > after), None)

    def snd(self, event: str, after: float, before: float = float("inf")
            ) -> list[dict[str, Any]]:
        return [m for m in read_marks(self.folder / "snd.jsonl")
                if m["event"] == event and after < m["t"] < before]

    def first(self, event: str, after: float) -> dict[str, Any] | None:
        marks = self.snd(event, after)
        return marks[0] if marks else None


def start_satellite(python: Path, folder: Path, room: str, wavs: Sequence[Path],
                    procs: list[peers.SatelliteProcess]) -> Satellite:
    """A wyoming-satellite whose microphone says ``wavs``, WAV i once ``go-<i>`` exists."""
    folder.mkdir(parents=True)
    mic = sat_mic.mic_command(wavs, lead_s=LEAD_S, gap_s=0.2, marks=folder / "mic.jsonl",
                              wait_for=str(folder / "go-"), chunk_frames=CHUNK[0])
    snd = sat_snd.snd_command(folder / "snd.raw", marks=folder / "snd.jsonl")
    proc = peers.start_wyoming_satellite(
        python, port=peers.free_port(), mic_command=mic, snd_command=snd, name=room,
        log_path=folder / "satellite.log",
        extra_args=["--mic-command-samples-per-chunk", str(CHUNK[0])])
    procs.append(proc)
    return Satellite(room, proc, folder)


async def start_satellites(hub: Hub, python: Path, folder: Path,
                           wavs: dict[str, list[Path]],
                           procs: list[peers.SatelliteProcess]) -> tuple[Rooms, list[Satellite]]:
    """The satellites running and driven as rooms, each room's pipeline listening."""
    sats = [start_satellite(python, folder / room, room, room_wavs, procs)
            for room, room_wavs in wavs.items()]
    for sat in sats:
        await asyncio.to_thread(peers.wait_until_listening, sat.proc, 30.0)
    since = len(hub.events)
    rooms = Rooms(hub.assistant, hub.settings)
    for sat in sats:
        sat.link = rooms.add(sat.room, sat.uri)
    try:
        for sat in sats:
            await asyncio.wait_for(rooms.links[sat.room].connected.wait(), 30.0)
            await until(functools.partial(hub.listening, since, sat.room), 60.0,
                        f"room {sat.room} listening")
    except BaseException:
        await rooms.stop()
        raise
    return rooms, sats


async def stop_satellites(rooms: Rooms, sats: Sequence[Satellite]) -> None:
    await rooms.stop()
    for sat in sats:
        await asyncio.to_thread(peers.stop_process, sat.proc)


async def satellite_turn(hub: Hub, sat: Satellite, turn: Turn, index: int, since: int,
                         asked: float) -> tuple[Turn, bytes]:
    """Wait for the room's turn, its reply on the satellite and the end of its playback;
    the turn and the reply audio sat_snd got."""
    room = sat.room
    end = await until(lambda: hub.turn_end(since, room), TURN_TIMEOUT_S, f"{room}: turn end")
    turn.take_end(end)
    spoken = await until(lambda: sat.speech_end(index, asked), 10.0,
                         f"{room}: speech_end of request {index}")
    if end.outcome is not Outcome.ANSWERED:
        return turn, b""
    said_at = float(spoken["t"])
    first = await until(lambda: sat.first("first_audio", said_at), 30.0,
                        f"{room}: reply audio on the satellite")
    heard_at = float(first["t"])
    await until(lambda: sat.first("eof", heard_at), 60.0,
                f"{room}: the satellite's snd command to finish")
    turn.v2v_s = heard_at - said_at
    # the chunk that held the last voiced sample ends at the next multiple of 1024 frames
    frame = int(spoken["frame"])
    chunk_end = (frame // CHUNK[0] + 1) * CHUNK[0]
    voiced_at = said_at - (chunk_end - frame - 1) / ASR_RATE
    turn.sample_v2v_s = heard_at - voiced_at
    sent_at = next((t for t in (sat.link.speaker.first_sent if sat.link else [])
                    if t > said_at), None)
    if sent_at is not None:
        turn.received_v2v_s = sent_at - said_at
        turn.received_sample_v2v_s = sent_at - voiced_at
    sent = hub.first_audio(end.turn_id)
    if sent is not None:
        turn.delivery_s = heard_at - sent.at
        if turn.hub_v2v_s is not None:
            turn.reference_s = (sent.at - turn.hub_v2v_s) - said_at
    offset = int(first["offset"])
    with sat.snd_out.open("rb") as f:
        f.seek(offset)
        return turn, f.read()


async def run_satellite_turns(hub: Hub, sats: Sequence[Satellite], every: Sequence[Satellite],
                              turns: list[Turn]) -> list[Turn]:
    """Trigger ``sats`` at the same moment and wait for all their replies; check each
    reply reached its own satellite and no other (of ``every``)."""
    for sat in sats:
        hub.reset(conversation_of(sat.room))
    since = len(hub.events)
    asked = time.monotonic()
    indices = [sat.trigger() for sat in sats]
    done = await asyncio.gather(*(satellite_turn(hub, sat, turn, index, since, asked)
                                  for sat, turn, index in zip(sats, turns, indices, strict=True)))
    finished = time.monotonic()
    # wyoming-satellite runs the snd command once per reply: count its runs (eof marks)
    triggered = {sat.room for sat in sats}
    strays = sum(max(0, len(sat.snd("eof", asked, finished))
                     - (1 if sat.room in triggered else 0)) for sat in every)
    replies = [turn.reply for turn, _ in done]
    for turn, audio in done:
        turn.stray = strays
        turn.heard = await hub.heard(audio) if audio else ""
        if not (audio and turn.reply):
            continue
        said = [overlap(turn.heard, reply) for reply in replies]
        turn.overlap = said[replies.index(turn.reply)]
        # Alone, the one satellite that ran its speaker is the room's (strays: others did).
        # At once, what it heard must be the room's own reply: half its words, or more of
        # them than of any other room's reply (the starter model's odd replies are
        # sometimes misheard: "L'Alma, la France." -> "El Alma, my friends.").
        own = len(sats) == 1 or turn.overlap >= OVERLAP or (
            turn.overlap > 0 and all(turn.overlap > other for reply, other
                                     in zip(replies, said, strict=True)
                                     if reply != turn.reply))
        turn.routed = own and not strays
    await asyncio.sleep(GAP_S)
    return [turn for turn, _ in done]


def overlap(heard: str, reply: str) -> float:
    """The share of ``reply``'s words that ``heard`` has."""
    return len(words(heard) & words(reply)) / max(1, len(words(reply)))


class Microphone:
    """``file_chunks(audio, realtime=True)`` as a sound card delivers it: each chunk once
    its last sample is due (file_chunks yields it when its first is, 32 ms sooner), as
    sat_mic does for the satellite; ``started`` is the sample clock's origin."""

    def __init__(self, audio: FloatArray) -> None:
        self.audio = audio
        self.started = 0.0

    async def chunks(self) -> AsyncIterator[FloatArray]:
        sent = 0
        async for chunk in file_chunks(self.audio, realtime=True):
            if not sent:
                self.started = time.monotonic()
            sent += len(chunk)
            delay = self.started + sent / ASR_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield chunk


def last_voiced(audio: FloatArray) -> int:
    """The last voiced sample of ``audio`` as sat_mic finds it (RMS of 20 ms frames)."""
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    span = sat_mic.voiced_span(pcm, ASR_RATE)
    return span[1] if span is not None else len(pcm) - 1


async def local_turn(hub: Hub, audio: FloatArray, sink: WavReplySink, turn: Turn) -> Turn:
    """The request through the assistant's own microphone pipeline."""
    pipeline = hub.assistant.voice()
    hub.reset(pipeline.conversation_id)
    since = len(hub.events)
    lead = np.zeros(int(LEAD_S * ASR_RATE), np.float32)
    mic = Microphone(np.concatenate([lead, audio]))
    await pipeline.run(mic.chunks(), sink)
    end = hub.turn_end(since, "")
    if end is not None:
        turn.take_end(end)
        turn.v2v_s = turn.hub_v2v_s
        turn.routed = bool(sink.written)
        sent = hub.first_audio(end.turn_id)
        if sent is not None:
            said_at = mic.started + (len(lead) + last_voiced(audio) + 1) / ASR_RATE
            turn.sample_v2v_s = sent.at - said_at
    await asyncio.sleep(GAP_S)
    return turn


STAGES = ("endpoint", "asr", "llm_ttft", "tts_first")


def show(turn: Turn) -> None:
    def ms(value: float | None) -> str:
        return f"{value * 1000:4.0f}" if value is not None else "   -"

    where = (f"hub {ms(turn.hub_v2v_s)} + delivery {ms(turn.delivery_s)}, "
             f"heard {turn.overlap or 0:4.0%}" + (f", {turn.stray} stray" if turn.stray else "")
             if turn.path != "local" else "")
    stages = "/".join(ms(turn.latency.get(k)).strip() for k in STAGES)
    print(f"  r{turn.round} {turn.path:<9} {turn.room or 'mic':<8} v2v {ms(turn.v2v_s)} ms "
          f"({stages}) {where} [{turn.outcome}{'' if turn.routed else ', not heard'}] "
          f"{turn.transcript.strip()[:36]!r} -> {turn.reply.strip()[:40]!r}", flush=True)


def stage_medians(turns: Sequence[Turn]) -> dict[str, float]:
    """The median of each stage (ms) over ``turns``."""
    return {k: round(statistics.median(t.latency[k] for t in turns if k in t.latency) * 1000, 1)
            for k in STAGES if any(k in t.latency for t in turns)}


# --------------------------------------------------------------------------- parts


async def part_local(hub: Hub, python: Path, tmp: Path,
                     requests: dict[str, tuple[Path, FloatArray]], rounds: int,
                     procs: list[peers.SatelliteProcess]) -> dict[str, Any]:
    texts = list(requests)
    wavs = [requests[texts[0]][0]] + [requests[t][0] for _ in range(rounds) for t in texts]
    rooms, sats = await start_satellites(hub, python, tmp / "local",
                                         {SATELLITE_ROOM: wavs}, procs)
    sat = sats[0]
    sink = WavReplySink(tmp / "local" / "replies", realtime=True)
    turns: list[Turn] = []
    warm: list[Turn] = []
    try:
        print(f"warm-up: {len(texts)} requests through the local path, 1 through the "
              "satellite (not counted)", flush=True)
        for text in texts:
            warm.append(await local_turn(hub, requests[text][1], sink,
                                         Turn("local", "", text, 0)))
            show(warm[-1])
        warm += await run_satellite_turns(hub, [sat], [sat],
                                          [Turn("satellite", sat.room, texts[0], 0)])
        show(warm[-1])
        for r in range(1, rounds + 1):
            for j, text in enumerate(texts):
                for path in ("local", "satellite") if (r + j) % 2 else ("satellite", "local"):
                    if path == "local":
                        turn = await local_turn(hub, requests[text][1], sink,
                                                Turn("local", "", text, r))
                    else:
                        turn = (await run_satellite_turns(
                            hub, [sat], [sat], [Turn("satellite", sat.room, text, r)]))[0]
                    turns.append(turn)
                    show(turn)
    finally:
        await stop_satellites(rooms, sats)
    log = sat.proc.log_path.read_text(errors="replace")
    replies = sum(1 for t in [*warm, *turns] if t.path == "satellite" and t.delivery_s)
    return {"turns": turns, "snd_starts": log.count("Connected to snd service"),
            "satellite_replies": replies}


async def part_rooms(hub: Hub, python: Path, tmp: Path,
                     requests: dict[str, tuple[Path, FloatArray]], rounds: int,
                     procs: list[peers.SatelliteProcess]) -> dict[str, Any]:
    wavs = {room: [requests[text][0]] * (1 + 2 * rounds) for room, text in ROOMS.items()}
    rooms, sats = await start_satellites(hub, python, tmp / "rooms", wavs, procs)
    turns: list[Turn] = []

    def new(path: str, r: int) -> list[Turn]:
        return [Turn(path, sat.room, ROOMS[sat.room], r) for sat in sats]

    try:
        print(f"warm-up: the {len(sats)} rooms at once (not counted)", flush=True)
        for turn in await run_satellite_turns(hub, sats, sats, new("together", 0)):
            show(turn)
        for r in range(1, rounds + 1):
            for sat, turn in zip(sats, new("alone", r), strict=True):
                done = (await run_satellite_turns(hub, [sat], sats, [turn]))[0]
                turns.append(done)
                show(done)
            for done in await run_satellite_turns(hub, sats, sats, new("together", r)):
                turns.append(done)
                show(done)
    finally:
        await stop_satellites(rooms, sats)
    return {"turns": turns}


# --------------------------------------------------------------------------- report


def report_local(result: dict[str, Any], snd_probe: list[float]) -> dict[str, Any]:
    turns: list[Turn] = result["turns"]
    local = [t for t in turns if t.path == "local" and t.answered]
    sat = [t for t in turns if t.path == "satellite" and t.answered]
    rows = {
        "local": summary([t.v2v_s for t in local]),
        "satellite": summary([t.v2v_s for t in sat]),
        "satellite_hub": summary([t.hub_v2v_s for t in sat]),
        "satellite_received": summary([t.received_v2v_s for t in sat]),
        "satellite_received_sample": summary([t.received_sample_v2v_s for t in sat]),
        "local_sample": summary([t.sample_v2v_s for t in local]),
        "satellite_sample": summary([t.sample_v2v_s for t in sat]),
        "delivery": summary([t.delivery_s for t in sat]),
        "reference": summary([t.reference_s for t in sat]),
        "snd_startup": summary(snd_probe),
    }
    names = {"local": "local: voice_to_voice",
             "satellite_received": "satellite: received - mic end",
             "satellite": "satellite: snd first - mic end",
             "satellite_hub": "  satellite: hub's voice_to_voice",
             "delivery": "  + delivery (hub sends -> snd)",
             "reference": "  + reference (hub VAD - mic end)",
             "local_sample": "local: from last voiced sample",
             "satellite_received_sample": "satellite: received, from last voiced",
             "satellite_sample": "satellite: snd, from last voiced sample",
             "snd_startup": "snd command start-up alone"}
    print("\nsatellite vs local microphone: voice to voice (ms)")
    print(f"{'path':<36} {'n':>3} {'p50':>6} {'p95':>6} {'mean':>6}")
    for key, name in names.items():
        row = rows[key]
        print(f"{name:<36} {row['n']:>3.0f} {fmt(row, 'p50_ms'):>6} {fmt(row, 'p95_ms'):>6} "
              f"{fmt(row, 'mean_ms'):>6}")
    out: dict[str, Any] = {**rows, "snd_starts": result["snd_starts"],
                           "stages_local": stage_medians(local),
                           "stages_satellite": stage_medians(sat)}

    def median_difference(a: str, b: str) -> float | None:
        if "p50_ms" in rows[a] and "p50_ms" in rows[b]:
            return round(rows[a]["p50_ms"] - rows[b]["p50_ms"], 1)
        return None

    received = median_difference("satellite_received_sample", "local_sample")
    if received is not None:
        ratio = rows["satellite_received_sample"]["p50_ms"] / rows["local_sample"]["p50_ms"]
        out.update(received_difference_ms=received, received_ratio=round(ratio, 3),
                   received_within_target=received <= 50)
        print(f"satellite (first reply sample received) - local (first reply sample to "
              f"the speaker), both from the last voiced sample, medians: {received:+.0f} ms "
              f"({ratio:.2f}x; target <= +50 ms: {'met' if received <= 50 else 'missed'})")
    diff = median_difference("satellite", "local")
    same = median_difference("satellite_sample", "local_sample")
    hub = median_difference("satellite_hub", "local")
    if diff is not None:
        ratio = rows["satellite"]["p50_ms"] / rows["local"]["p50_ms"]
        out.update(difference_ms=diff, ratio=round(ratio, 3), target_ms=50,
                   within_target=diff <= 50)
        print(f"satellite (played by wyoming-satellite's snd command) - local, medians: "
              f"{diff:+.0f} ms ({ratio:.2f}x)")
    if same is not None and hub is not None:
        out.update(sample_difference_ms=same, hub_difference_ms=hub)
        print(f"  both from the last voiced sample: {same:+.0f} ms; on the hub's own clock "
              f"(no delivery): {hub:+.0f} ms")
    print("median stages (endpoint/asr/llm_ttft/tts_first, ms): local "
          + "/".join(f"{v:.0f}" for v in out["stages_local"].values()) + ", satellite "
          + "/".join(f"{v:.0f}" for v in out["stages_satellite"].values()))
    counted = [t for t in turns if t.path == "satellite"]
    print(f"answered: satellite {len(sat)}/{len(counted)} (reply heard on its satellite), "
          f"local {len(local)}/{len(turns) - len(counted)}; wyoming-satellite started its snd "
          f"command {result['snd_starts']} times for {result['satellite_replies']} replies")
    return out


def report_rooms(result: dict[str, Any], parallel: int) -> dict[str, Any]:
    turns: list[Turn] = result["turns"]
    print(f"\nfour rooms: voice to voice (snd first - mic end, ms), alone vs at once "
          f"(JARVIS_PARALLEL={parallel}: the engine batches the rooms' generations)")
    print(f"{'room':<8} {'alone p50':>9} {'p95':>6} {'at once p50':>11} {'p95':>6} "
          f"{'ratio':>6} {'answered alone':>15} {'at once':>8}")
    out: dict[str, Any] = {"parallel": parallel, "rooms": {}}
    for room in [*ROOMS, "all"]:
        mine = [t for t in turns if room in ("all", t.room)]
        alone = [t for t in mine if t.path == "alone"]
        together = [t for t in mine if t.path == "together"]
        a = summary([t.v2v_s for t in alone if t.answered])
        b = summary([t.v2v_s for t in together if t.answered])
        ratio = (b["p50_ms"] / a["p50_ms"]) if "p50_ms" in a and "p50_ms" in b else None
        row = {"alone": a, "together": b, "ratio": round(ratio, 3) if ratio else None,
               "answered_alone": f"{sum(t.answered for t in alone)}/{len(alone)}",
               "answered_together": f"{sum(t.answered for t in together)}/{len(together)}",
               "strays": sum(t.stray for t in mine)}
        out["rooms"][room] = row
        print(f"{room:<8} {fmt(a, 'p50_ms'):>9} {fmt(a, 'p95_ms'):>6} {fmt(b, 'p50_ms'):>11} "
              f"{fmt(b, 'p95_ms'):>6} {(f'{ratio:.2f}x' if ratio else '-'):>6} "
              f"{row['answered_alone']:>15} {row['answered_together']:>8}")
    alone = [t for t in turns if t.path == "alone" and t.answered]
    together = [t for t in turns if t.path == "together" and t.answered]
    hub_a, hub_b = summary([t.hub_v2v_s for t in alone]), summary([t.hub_v2v_s for t in together])
    out.update(hub_alone=hub_a, hub_together=hub_b, stages_alone=stage_medians(alone),
               stages_together=stage_medians(together))
    print(f"the hub's own voice_to_voice p50: alone {fmt(hub_a, 'p50_ms')} ms, at once "
          f"{fmt(hub_b, 'p50_ms')} ms; median stages (endpoint/asr/llm_ttft/tts_first, ms): "
          "alone " + "/".join(f"{v:.0f}" for v in out["stages_alone"].values())
          + ", at once " + "/".join(f"{v:.0f}" for v in out["stages_together"].values()))
    return out


# --------------------------------------------------------------------------- main


def bench_settings(tmp: Path, max_tokens: int) -> Settings:
    env = {k: v for k, v in os.environ.items() if k.startswith("JARVIS_")}
    env.update({"JARVIS_WAKE_WORD": "off", "JARVIS_TEMPERATURE": "0",
                "JARVIS_MAX_TOKENS": str(max_tokens), "JARVIS_CACHE_DIR": str(tmp / "cache"),
                "JARVIS_SATELLITES": "", "JARVIS_SATELLITE_DISCOVERY": "false"})
    return load_settings(env, env_file=empty_env(tmp))


def empty_env(folder: Path) -> Path:
    """An empty env file: no .env of the current directory applies."""
    path = folder / "empty.env"
    path.touch()
    return path


async def run(args: argparse.Namespace, tmp: Path, procs: list[peers.SatelliteProcess]
              ) -> dict[str, Any]:
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    python = await asyncio.to_thread(peers.wyoming_satellite_python)
    texts = [*(REQUESTS if args.only != "rooms" else []),
             *(ROOMS.values() if args.only != "local" else [])]
    requests = await asyncio.to_thread(synthesise, texts, tmp)
    settings = bench_settings(tmp, args.max_tokens)
    started = time.monotonic()
    assistant = await build_assistant(settings, listen=True)
    if assistant.tts is not None:
        assistant.tts.cache = None  # every reply synthesised: the requests repeat
    hub = Hub(assistant, settings)
    print(f"hub ready in {time.monotonic() - started:.1f} s; {args.rounds} round(s), "
          f"JARVIS_MAX_TOKENS={args.max_tokens}, JARVIS_PARALLEL={settings.llm.parallel}, "
          f"endpoint silence {settings.vad.silence_ms} ms; satellite microphone chunks of "
          f"{CHUNK[0]} samples; wyoming-satellite "
          f"{peers.WYOMING_SATELLITE_VERSION} from {python}", flush=True)
    report: dict[str, Any] = {
        "rounds": args.rounds, "max_tokens": args.max_tokens,
        "parallel": settings.llm.parallel, "silence_ms": settings.vad.silence_ms,
        "cpus": os.cpu_count(), "satellite_chunk": CHUNK[0]}
    try:
        probe = await asyncio.to_thread(snd_startup, tmp / "snd-probe", SND_PROBES)
        report["snd_startup"] = summary(probe)
        print(f"snd command start-up alone: "
              f"{', '.join(f'{t * 1000:.0f}' for t in probe)} ms", flush=True)
        results: dict[str, dict[str, Any]] = {}
        if args.only != "rooms":
            print("\n== satellite vs local microphone", flush=True)
            results["local"] = await part_local(
                hub, python, tmp, {t: requests[t] for t in REQUESTS}, args.rounds, procs)
        if args.only != "local":
            print("\n== four rooms at once", flush=True)
            results["rooms"] = await part_rooms(
                hub, python, tmp, {t: requests[t] for t in ROOMS.values()}, args.rounds,
                procs)
    finally:
        await assistant.close()
    if "local" in results:
        report["local_vs_satellite"] = report_local(results["local"], probe)
    if "rooms" in results:
        report["rooms"] = report_rooms(results["rooms"], settings.llm.parallel)
    report["turns"] = [asdict(t) for result in results.values() for t in result["turns"]]
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--only", choices=("local", "rooms"),
                   help="only satellite vs local microphone, or only the four rooms")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (satellite logs, marks, reply audio)")
    p.add_argument("--satellite-chunk", type=int, default=sat_mic.CHUNK_FRAMES,
                   help="samples per microphone chunk on the satellites (wyoming-satellite's "
                        "--mic-command-samples-per-chunk; default %(default)s, its own "
                        "default; the local path gets 512, as Jarvis's microphone)")
    args = p.parse_args()
    CHUNK[0] = args.satellite_chunk
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    # the hub's warnings (a room unavailable, echo cancellation without its reference...)
    logging.basicConfig(level=logging.WARNING, format="  [%(levelname)s %(name)s] %(message)s")
    procs: list[peers.SatelliteProcess] = []
    tmp = Path(tempfile.mkdtemp(prefix="satellite-bench-"))
    try:
        report = asyncio.run(run(args, tmp, procs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        for proc in procs:
            peers.stop_process(proc)
        if args.keep:
            print(f"files kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary_only = {k: v for k, v in report.items() if k != "turns"}
    print("\n" + json.dumps(summary_only, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
