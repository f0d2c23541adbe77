#!/usr/bin/env python3
"""Jarvis's Wyoming server side by side with the servers Home Assistant users run today,
in one run, on the same inputs and the same models:

- speech to text: ``jarvis wyoming`` vs ``wyoming-faster-whisper`` 3.8.x serving the same
  tiny.en directory (``--beam-size 1 --cpu-threads 2 --compute-type int8 --language en
  --local-files-only``); spoken home commands of 1-4 s (piper's voice, framed as an
  endpointer delivers them), sent in 1024-sample chunks; the time from writing
  ``audio-stop`` to reading ``transcript``, and the word error rate;
- text to speech: ``jarvis wyoming`` vs ``wyoming-piper`` 2.5.x serving the same voice;
  time from the request to the first ``audio-chunk``, non-streaming (``synthesize``)
  and streaming (``synthesize-start``, the text word by word as an LLM writes it,
  ``synthesize-stop``);
- ``wyoming-bench`` (PyPI; a client nobody here wrote) against both pairs;
- handle: the same turns answered in-process (``Responder.respond``) and over Wyoming
  by the same assistant: time to the first text and to the whole reply.

Requests to the two servers alternate (A, B, A, B ...) so that load from anything else
on the machine hits both alike; only one request is in flight at a time. The peers live
in their own virtual environment, ``.venv-peers`` (created here on first use, from PyPI;
they may pin other ``wyoming`` versions than Jarvis does). Jarvis runs with no phrase
cache (``JARVIS_CACHE_DIR`` empty), so repeated texts are synthesised every time.

    python bench/wyoming_bench.py [--rounds 3] [--json FILE] [--no-wyoming-bench]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from jarvis.audio import ASR_RATE, resample, to_int16
from jarvis.config import load_settings
from jarvis.evaluation.wer import word_errors
from jarvis.models import starter_asr_path, starter_voice_path
from jarvis.speech.tts import PiperTts

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".venv-peers"
PEER_PINS = ("wyoming==1.10.*", "wyoming-faster-whisper==3.8.*", "wyoming-piper==2.5.*",
             "wyoming-bench==2026.10.*", "faster-whisper==1.2.1", "piper-tts==1.8.0")
"""What .venv-peers holds: the peers, and the same engines as Jarvis (same models)."""
COMMANDS = ROOT / "tests" / "data" / "commands.txt"
REPLIES = [
    "Okay, the kitchen lights are on.",
    "Done. I set a timer for ten minutes and I will remind you when it ends.",
    "The front door is locked. The garage door is also closed.",
    "It is twenty one degrees inside. Outside it is a bit colder, about twelve degrees.",
    "Sure, playing some jazz in the bedroom. Tell me if you want it louder.",
]
TURNS = [
    "Turn on the kitchen light.",
    "What is the capital of France?",
    "Open the blinds.",
    "Give me a quick tip for sleeping better.",
    "Switch off the kitchen light.",
    "What can I cook with eggs?",
]
PRE_ROLL_S, TRAILING_S = 0.3, 0.4
"""Silence around each command, as the endpointer delivers an utterance."""
READ_S = 120.0


# --------------------------------------------------------------------------- the peers


def ensure_peers() -> Path:
    """``.venv-peers`` with :data:`PEER_PINS` (created or updated when the pins change)."""
    stamp = PEERS / ".jarvis-peers"
    wanted = "\n".join(PEER_PINS)
    if stamp.is_file() and stamp.read_text() == wanted:
        return PEERS
    print(f"setting up {PEERS.name} (the peer servers, from PyPI) ...", flush=True)
    if not (PEERS / "bin" / "python").exists():
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                        str(PEERS)], check=True)
    subprocess.run([str(PEERS / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", *PEER_PINS], check=True)
    stamp.write_text(wanted)
    return PEERS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process and its port."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_server(name: str, command: list[str], port: int, logs: Path,
                 env: dict[str, str] | None = None) -> Server:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT)
    return Server(name, port, proc, log)


async def wait_ready(server: Server, timeout: float = 300.0) -> float:
    """Until the server answers ``describe`` (its models are loaded); seconds waited."""
    started = time.monotonic()
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}):\n"
                               f"{server.tail()}")
        try:
            async with AsyncTcpClient("127.0.0.1", server.port, connect_timeout=2,
                                      read_timeout=5) as client:
                await client.write_event(Describe().event())
                event = await client.read_event()
                if event is not None and event.type == "info":
                    return time.monotonic() - started
        except (OSError, asyncio.TimeoutError):
            pass
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s:\n"
                               f"{server.tail()}")
        await asyncio.sleep(0.5)  # not listening yet: poll again


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Utterance:
    text: str
    pcm: bytes
    """16 kHz mono int16."""

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / ASR_RATE


def spoken_commands(tts: PiperTts) -> list[Utterance]:
    """The home commands of tests/data/commands.txt said by piper, 1-4 s of speech."""
    texts = [line.strip() for line in COMMANDS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    out = []
    for text in texts:
        speech = resample(tts.synthesize(text), tts.sample_rate, ASR_RATE)
        if not 1.0 <= len(speech) / ASR_RATE <= 4.0:
            continue
        samples = np.concatenate([np.zeros(int(PRE_ROLL_S * ASR_RATE), np.float32), speech,
                                  np.zeros(int(TRAILING_S * ASR_RATE), np.float32)])
        out.append(Utterance(text, to_int16(samples).astype("<i2").tobytes()))
    return out


def write_corpus(utterances: list[Utterance], directory: Path) -> None:
    """The wav + txt pairs ``wyoming-bench stt --corpus`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, utterance in enumerate(utterances):
        with wave.open(str(directory / f"command_{index:02d}.wav"), "wb") as wav:
            wav.setframerate(ASR_RATE)
            wav.setsampwidth(2)
            wav.setnchannels(1)
            wav.writeframes(utterance.pcm)
        (directory / f"command_{index:02d}.txt").write_text(utterance.text + "\n")


# --------------------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[AsyncTcpClient]:
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=10,
                              read_timeout=READ_S) as client:
        yield client


async def read_until(client: AsyncTcpClient, *types: str) -> Event:
    while True:
        event = await client.read_event()
        if event is None:
            raise RuntimeError(f"connection closed before {types}")
        if event.type == "error":
            raise RuntimeError(f"error event: {event.data}")
        if event.type in types:
            return event


async def transcribe(port: int, utterance: Utterance) -> tuple[float, str]:
    """Seconds from writing ``audio-stop`` to reading ``transcript``, and the text."""
    async with connect(port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=ASR_RATE, width=2, channels=1).event())
        step = 1024 * 2
        for start in range(0, len(utterance.pcm), step):
            await client.write_event(AudioChunk(rate=ASR_RATE, width=2, channels=1,
                                                audio=utterance.pcm[start:start + step]).event())
        sent = time.perf_counter()
        await client.write_event(AudioStop().event())
        event = await read_until(client, "transcript")
        return time.perf_counter() - sent, str(event.data.get("text", ""))


async def synthesize(port: int, text: str, *, streaming: bool) -> tuple[float, float, float]:
    """Seconds to the first ``audio-chunk`` and to the end, and the audio's length."""
    async with connect(port) as client:
        sent = time.perf_counter()
        first: float | None = None
        samples = 0
        rate = 1

        async def write() -> None:
            if not streaming:
                await client.write_event(Synthesize(text=text).event())
                return
            await client.write_event(SynthesizeStart().event())
            words = text.split(" ")
            for index, word in enumerate(words):  # as an LLM writes: a word at a time
                await client.write_event(SynthesizeChunk(
                    text=word + (" " if index < len(words) - 1 else "")).event())
            await client.write_event(SynthesizeStop().event())

        writer = asyncio.create_task(write())
        end = "synthesize-stopped" if streaming else "audio-stop"
        while True:
            event = await read_until(client, "audio-chunk", end)
            if event.type == end:
                break
            if first is None:
                first = time.perf_counter() - sent
            rate = int(event.data.get("rate", 1))
            samples += len(event.payload or b"") // 2
        await writer
        assert first is not None, "no audio"
        return first, time.perf_counter() - sent, samples / rate


# --------------------------------------------------------------------------- numbers


@dataclass
class Series:
    """Seconds measured for one server and one metric."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def p90(self) -> float:
        if not self.values:
            return float("nan")
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]

    def row(self, label: str) -> str:
        return (f"  {label:<26} median {self.median * 1000:8.1f} ms   p90 "
                f"{self.p90 * 1000:8.1f} ms   n={len(self.values)}")


async def bench_asr(utterances: list[Utterance], ports: dict[str, int], rounds: int
                    ) -> dict[str, Any]:
    latency = {name: Series() for name in ports}
    errors = {name: 0 for name in ports}
    words = 0
    for port in ports.values():  # warm-up, not counted
        await transcribe(port, utterances[0])
    for round_index in range(rounds):
        for utterance in utterances:
            if round_index == 0:
                words += len(utterance.text.split())
            for name, port in ports.items():
                seconds, text = await transcribe(port, utterance)
                latency[name].values.append(seconds)
                if round_index == 0:
                    errors[name] += word_errors(utterance.text, text)[0]
    return {"latency": latency, "wer": {n: errors[n] / max(1, words) for n in ports},
            "words": words}


async def bench_tts(ports: dict[str, int], rounds: int) -> dict[str, dict[str, Series]]:
    out: dict[str, dict[str, Series]] = {}
    for streaming in (False, True):
        mode = "streaming" if streaming else "non-streaming"
        out[mode] = {name: Series() for name in ports}
        for port in ports.values():  # warm-up
            await synthesize(port, REPLIES[0], streaming=streaming)
        for _ in range(rounds):
            for text in REPLIES:
                for name, port in ports.items():
                    first, _, _ = await synthesize(port, text, streaming=streaming)
                    out[mode][name].values.append(first)
    return out


async def bench_handle(rounds: int, tmp: Path) -> dict[str, dict[str, Series]]:
    """The same turns in-process and over Wyoming, on one assistant (alternating)."""
    from jarvis.voice.assembly import build_assistant
    from jarvis.voice.events import Source
    from jarvis.voice.turn import Turn
    from jarvis.wyoming.server import start_wyoming

    settings = load_settings({
        "JARVIS_CACHE_DIR": "", "JARVIS_TEMPERATURE": "0", "JARVIS_MAX_TOKENS": "24",
        "JARVIS_DEVICES_FILE": str(ROOT / "config" / "devices.example.toml"),
        "JARVIS_WYOMING_URI": f"tcp://127.0.0.1:{free_port()}",
        "JARVIS_WYOMING_ZEROCONF": "false", "JARVIS_LOG_LEVEL": "WARNING",
    }, env_file=_empty_env(tmp))
    # No MQTT here: "device commands not sent" would be printed for every device turn.
    logging.getLogger("jarvis.voice.responder").setLevel(logging.ERROR)
    assistant = await build_assistant(settings, listen=False, speak=False)
    server = await start_wyoming(settings, assistant)
    series = {what: {"in-process": Series(), "Wyoming": Series()}
              for what in ("first text", "whole reply")}
    try:
        async def direct(text: str) -> tuple[float, float]:
            first: list[float] = []
            started = time.perf_counter()

            def on_text(_: str) -> None:
                if not first:
                    first.append(time.perf_counter() - started)

            await assistant.responder.respond(Turn(Source.CLI, None, request=text,
                                                   speak=False, on_text=on_text))
            return (first[0] if first else float("nan")), time.perf_counter() - started

        async def wyoming(text: str) -> tuple[float, float]:
            from wyoming.asr import Transcript

            async with connect(server.port) as client:
                started = time.perf_counter()
                await client.write_event(Transcript(text).event())
                first = (await read_until(client, "handled-chunk", "handled")).type
                first_s = time.perf_counter() - started
                if first != "handled":
                    await read_until(client, "handled")
                return first_s, time.perf_counter() - started

        ways = [("in-process", direct), ("Wyoming", wyoming)]
        for round_index in range(rounds):
            for text in TURNS:
                # The same request just before each measured one, so both ways find the
                # model's cache as that request leaves it (else the second of the pair
                # would profit from the first); the order alternates by round.
                for label, way in ways if round_index % 2 == 0 else ways[::-1]:
                    await direct(text)
                    first_s, whole_s = await way(text)
                    series["first text"][label].values.append(first_s)
                    series["whole reply"][label].values.append(whole_s)
    finally:
        await server.stop()
        await assistant.close()
    return series


def _empty_env(tmp: Path) -> Path:
    path = tmp / "empty.env"
    path.touch()
    return path


def run_wyoming_bench(kind: str, servers: list[Server], extra: list[str]) -> str:
    """``wyoming-bench`` (from .venv-peers) against ``servers``; its own report."""
    command = [str(PEERS / "bin" / "wyoming-bench"), kind,
               *(f"127.0.0.1:{s.port}" for s in servers), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                          check=False)
    return (done.stdout + done.stderr).strip()


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def servers_running(logs: Path) -> Iterator[dict[str, Server]]:
    """Jarvis, wyoming-faster-whisper and wyoming-piper, all serving the same models."""
    asr_model, voice = starter_asr_path(), starter_voice_path()
    if asr_model is None or voice is None:
        raise SystemExit("the bundled tiny.en and piper voice are needed (make setup)")
    peer_python = str(PEERS / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    env.update({"JARVIS_CACHE_DIR": "", "JARVIS_WYOMING_ZEROCONF": "false",
                "JARVIS_ASR_THREADS": "2", "JARVIS_ENV_FILE": str(_empty_env(logs)),
                "JARVIS_LOG_LEVEL": "WARNING"})
    ports = {name: free_port() for name in ("jarvis", "whisper", "piper")}
    started: dict[str, Server] = {}
    try:
        started["jarvis"] = start_server(
            "jarvis", [sys.executable, "-m", "jarvis", "wyoming", "--uri",
                       f"tcp://127.0.0.1:{ports['jarvis']}"], ports["jarvis"], logs, env)
        started["whisper"] = start_server("wyoming-faster-whisper", [
            peer_python, "-m", "wyoming_faster_whisper", "--uri",
            f"tcp://127.0.0.1:{ports['whisper']}", "--model", str(asr_model),
            "--data-dir", str(logs / "whisper-data"), "--stt-library", "faster-whisper",
            "--beam-size", "1", "--cpu-threads", "2", "--compute-type", "int8",
            "--language", "en", "--local-files-only"], ports["whisper"], logs)
        started["piper"] = start_server("wyoming-piper", [
            peer_python, "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{ports['piper']}",
            "--voice", voice.name.removesuffix(".onnx"), "--data-dir", str(voice.parent),
            "--download-dir", str(logs / "piper-data"), "--local-files-only"],
            ports["piper"], logs)
        yield started
    finally:
        for server in started.values():
            stop_server(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per input")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--no-wyoming-bench", action="store_true",
                        help="skip the wyoming-bench runs")
    args = parser.parse_args()
    ensure_peers()
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    settings = load_settings({"JARVIS_CACHE_DIR": ""})
    tts = PiperTts(settings.tts, deterministic=True)
    await tts.start()
    utterances = spoken_commands(tts)
    tts.close()
    report: dict[str, Any] = {"commands": len(utterances), "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="wyoming-bench-") as tmp_name:
        tmp = Path(tmp_name)
        write_corpus(utterances, tmp / "corpus")
        with servers_running(tmp) as servers:
            for server in servers.values():
                ready = await wait_ready(server)
                print(f"{server.name} ready ({ready:.1f} s after start)", flush=True)
            jarvis, whisper, piper = servers["jarvis"], servers["whisper"], servers["piper"]
            asr = await bench_asr(utterances, {"Jarvis": jarvis.port,
                                               "wyoming-faster-whisper": whisper.port},
                                  args.rounds)
            tts_numbers = await bench_tts({"Jarvis": jarvis.port,
                                           "wyoming-piper": piper.port}, args.rounds)
            outside: dict[str, str] = {}
            if not args.no_wyoming_bench:
                outside["tts"] = run_wyoming_bench("tts", [jarvis, piper], [
                    "--rounds", str(args.rounds), "--texts", *REPLIES[:3]])
                outside["stt"] = run_wyoming_bench("stt", [jarvis, whisper], [
                    "--corpus", str(tmp / "corpus"), "--rounds", "1",
                    "--mode", "non_streaming", "--trailing-silence", "0"])
        handle = await bench_handle(args.rounds, tmp)
    _print(report, asr, tts_numbers, handle, outside, len(utterances))
    if args.json:
        args.json.write_text(json.dumps(_json(report, asr, tts_numbers, handle), indent=2))
    return 0


def _print(report: dict[str, Any], asr: dict[str, Any], tts: dict[str, dict[str, Series]],
           handle: dict[str, dict[str, Series]], outside: dict[str, str], count: int) -> None:
    rounds = report["rounds"]
    print(f"\n== speech to text: {count} spoken commands of 1-4 s x {rounds} rounds, "
          "1024-sample chunks; audio-stop -> transcript")
    latency: dict[str, Series] = asr["latency"]
    for name, series in latency.items():
        print(series.row(name) + f"   WER {asr['wer'][name] * 100:5.1f} %"
              f" ({asr['words']} words)")
    ours, peer = latency["Jarvis"].median, latency["wyoming-faster-whisper"].median
    wer_gap = (asr["wer"]["Jarvis"] - asr["wer"]["wyoming-faster-whisper"]) * 100
    print(f"  -> {peer / ours:.1f}x faster (target >= 3x); word error rate "
          f"{wer_gap:+.1f} points (target <= +1)")
    print(f"\n== text to speech: {len(REPLIES)} replies x {rounds} rounds; request -> "
          "first audio-chunk")
    for mode, by_server in tts.items():
        print(f" {mode}:")
        for name, series in by_server.items():
            print(series.row(name))
        ratio = by_server["wyoming-piper"].median / by_server["Jarvis"].median
        print(f"  -> {ratio:.1f}x faster to first audio (target >= 2x)")
    print(f"\n== handle: {len(TURNS)} turns (device commands and questions) x {rounds} "
          "rounds, the same assistant")
    for what, by_way in handle.items():
        print(f" {what}:")
        for name, series in by_way.items():
            print(series.row(name))
        gap = (by_way["Wyoming"].median - by_way["in-process"].median) * 1000
        print(f"  -> Wyoming adds {gap:+.1f} ms (target within 10 ms)")
    for kind, text in outside.items():
        print(f"\n== wyoming-bench {kind} (Jarvis first, then the peer)\n{text}")


def _json(report: dict[str, Any], asr: dict[str, Any], tts: dict[str, dict[str, Series]],
          handle: dict[str, dict[str, Series]]) -> dict[str, Any]:
    def s(series: Series) -> dict[str, float]:
        return {"median_s": series.median, "p90_s": series.p90, "n": len(series.values)}

    return {**report,
            "asr": {n: {**s(v), "wer": asr["wer"][n]} for n, v in asr["latency"].items()},
            "tts": {m: {n: s(v) for n, v in by.items()} for m, by in tts.items()},
            "handle": {w: {n: s(v) for n, v in by.items()} for w, by in handle.items()}}


if __name__ == "__main__":
    sys.exit(main())
