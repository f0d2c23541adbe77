"""``jarvis satellite`` as a real process, driven the way a controller (the Jarvis hub,
Home Assistant) drives it: a Wyoming client over TCP on 127.0.0.1. Its microphone and
speaker are sounddevice/PortAudio on ALSA ``file`` devices (``write_asoundrc``): the
microphone reads a raw file, the speaker writes one."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.event import Event

from jarvis.audio import ASR_RATE, read_audio, to_int16
from jarvis.audio.paced import SampleClock
from jarvis.wyoming.protocol import MAX_LINE_BYTES, encode_event, read_event
from tests.support.satellite_cmd import SatelliteProcess
from tests.support.speech import JFK, raw_int16, silence, strip_zeros, write_asoundrc

READ_S = 10.0
"""Longest wait for one event."""
MODEL_LIBRARIES = ("ctranslate2", "onnxruntime", "llama", "piper", "espeak", "ggml")
MODEL_MODULES = ("faster_whisper", "ctranslate2", "llama_cpp", "piper", "onnxruntime")


def jfk(seconds: float) -> np.ndarray:
    return to_int16(read_audio(JFK).samples[:int(seconds * ASR_RATE)])


class Client:
    """A controller's end of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MAX_LINE_BYTES)
        return cls(reader, writer)

    async def send(self, kind: str, data: dict[str, Any] | None = None,
                   payload: bytes | None = None) -> None:
        self.writer.write(encode_event(Event(kind, data or {}, payload)))
        await self.writer.drain()

    async def next(self, timeout: float = READ_S) -> Event | None:
        return await asyncio.wait_for(read_event(self.reader), timeout)

    async def expect(self, kind: str, timeout: float = READ_S) -> Event:
        """The next event that is not audio; it must be ``kind``."""
        while True:
            event = await self.next(timeout)
            assert event is not None, f"closed while waiting for {kind}"
            if event.type != "audio-chunk":
                assert event.type == kind, (event.type, event.data)
                return event

    async def audio(self, seconds: float, timeout: float = READ_S) -> tuple[np.ndarray, float]:
        """``seconds`` of streamed audio (after its audio-start) and how long it took to
        come, from the first chunk."""
        parts: list[np.ndarray] = []
        count = 0
        first = 0.0
        while count < seconds * ASR_RATE:
            event = await self.next(timeout)
            assert event is not None and event.type == "audio-chunk", event
            assert (event.data["rate"], event.data["width"], event.data["channels"]) == (
                ASR_RATE, 2, 1)
            if not parts:
                first = time.monotonic()
            parts.append(np.frombuffer(event.payload or b"", dtype="<i2"))
            count += len(parts[-1])
        return np.concatenate(parts), time.monotonic() - first

    async def closed(self, timeout: float = READ_S) -> bool:
        """True once the satellite has closed this connection (audio before it skipped)."""
        while True:
            try:
                event = await self.next(timeout)
            except ConnectionError:
                return True
            if event is None:
                return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def satellites(tmp_path: Path) -> Any:
    started: list[SatelliteProcess] = []

    def start(mic: np.ndarray, name: str = "sat", **env: str) -> SatelliteProcess:
        started.append(SatelliteProcess(tmp_path / name, mic, **env))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 120))


# --------------------------------------------------------------------------- tests


def test_describe_ping_and_a_clean_stop(satellites: Any) -> None:
    sat = satellites(jfk(1.0))

    async def scenario() -> None:
        client = await Client.connect(sat.port)
        await client.send("describe")
        info = await client.expect("info")
        satellite = info.data["satellite"]
        assert satellite["name"] == "kitchen satellite" and satellite["area"] == "kitchen"
        assert satellite["installed"] is True and satellite["has_vad"] is False
        assert satellite["active_wake_words"] == [] and satellite["supports_trigger"] is False
        assert info.data["wake"] == [] and info.data["asr"] == []
        await client.send("ping", {"text": "are you there"})
        assert (await client.expect("pong")).data == {"text": "are you there"}
        client.close()

    run(scenario())
    assert sat.stop(signal.SIGTERM) == 0, sat.log
    assert "Traceback" not in sat.log, sat.log


def test_configuration_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    write_asoundrc(tmp_path, tmp_path / "mic.raw")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    env.update({"HOME": str(tmp_path), "JARVIS_CACHE_DIR": ""})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra, args, message in (
                ({"JARVIS_WAKE_WORD": "hey_jervis"}, [], "no such wake-word model"),
                ({"JARVIS_WAKE_WORD": "off"}, [], "address already in use"),
                ({}, ["--uri", "http://satellite"], "--uri 'http://satellite' is invalid")):
            result = subprocess.run(
                [sys.executable, "-m", "jarvis", "satellite", "--no-zeroconf",
                 "--uri", f"tcp://127.0.0.1:{port}", *args],
                env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True,
                timeout=60)
            errors = [line for line in result.stderr.splitlines()
                      if line.startswith("jarvis: error:")]
            assert result.returncode == 2 and len(errors) == 1, result.stderr
            assert message in errors[0], result.stderr
            assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_streams_the_microphone_in_real_time_and_plays_replies(satellites: Any) -> None:
    mic = jfk(4.0)
    sat = satellites(mic)
    rng = np.random.default_rng(5)
    t = np.arange(22050) / 22050
    reply = (0.4 * np.sin(2 * np.pi * (300 + 400 * t) * t) * 32767).astype(np.int16)
    reply[rng.integers(0, len(reply), 50)] += 7  # not a pure tone: every sample counts

    async def scenario() -> None:
        client = await Client.connect(sat.port)
        await client.send("run-satellite")
        pipeline = await client.expect("run-pipeline")
        assert pipeline.data == {"start_stage": "wake", "end_stage": "tts",
                                 "restart_on_end": True}
        start = await client.expect("audio-start")
        assert (start.data["rate"], start.data["width"], start.data["channels"]) == (
            ASR_RATE, 2, 1)
        heard, took = await client.audio(3.0)
        # Exactly the microphone's samples, from its first, at the pace of the audio.
        assert np.array_equal(heard, mic[:len(heard)])
        assert took >= 2.5, f"3 s of audio came in {took:.2f} s: faster than real time"
        # A reply at 22050 Hz, sent at once in uneven chunks; the microphone streams on.
        await client.send("audio-start", {"rate": 22050, "width": 2, "channels": 1})
        data = reply.astype("<i2").tobytes()
        for begin in range(0, len(data), 3001):  # odd sizes: frames cut in two
            await client.send("audio-chunk", {"rate": 22050, "width": 2, "channels": 1},
                              data[begin:begin + 3001])
        await client.send("audio-stop")
        await client.expect("played")
        more, _ = await client.audio(0.2)
        assert len(more) > 0
        # The controller's pipeline failed: the stream ends and is asked for again (not
        # at once: a pipeline that always fails must not spin).
        await client.send("error", {"text": "no wake word engine", "code": "wake-missing"})
        await client.expect("audio-stop")
        asked = time.monotonic()
        assert (await client.expect("run-pipeline")).data["start_stage"] == "wake"
        assert time.monotonic() - asked > 2.0
        await client.expect("audio-start")
        await client.audio(0.2)
        await client.send("pause-satellite")
        await client.expect("audio-stop")
        client.close()

    run(scenario())
    played = strip_zeros(raw_int16(sat.speaker))
    assert np.array_equal(played, strip_zeros(reply)), (len(played), len(reply))
    assert sat.stop() == 0, sat.log


def test_bad_input_and_a_second_controller(satellites: Any) -> None:
    sat = satellites(jfk(3.0))

    async def scenario() -> None:
        first = await Client.connect(sat.port)
        await first.send("run-satellite")
        await first.expect("run-pipeline")
        await first.expect("audio-start")
        # Unknown events are ignored (logged once per type); the connection goes on.
        for _ in range(3):
            await first.send("launch-rockets", {"count": 3})
        await first.send("ping", {"text": "still there"})
        assert (await first.expect("pong")).data["text"] == "still there"
        assert sat.wait_for(r"'launch-rockets'.*ignored")
        assert sat.count(r"launch-rockets") == 1, sat.log
        # Garbage closes only its own connection.
        bad = await Client.connect(sat.port)
        bad.writer.write(b"\x00\xffthis is not a wyoming event\n")
        await bad.writer.drain()
        assert await bad.closed()
        sat.wait_for(r"not a Wyoming event")
        await first.send("ping", {"text": "after the garbage"})
        assert (await first.expect("pong")).data["text"] == "after the garbage"
        # describe and ping from another connection do not take over...
        probe = await Client.connect(sat.port)
        await probe.send("describe")
        await probe.expect("info")
        await probe.send("ping")
        await probe.expect("pong")
        await first.audio(0.2)
        # ... anything else does: the first controller is closed, the new one streams.
        await probe.send("run-satellite")
        assert await first.closed()
        await probe.expect("run-pipeline")
        await probe.expect("audio-start")
        heard, _ = await probe.audio(0.5)
        assert np.array_equal(heard, jfk(3.0)[:len(heard)])  # the microphone opened anew
        sat.wait_for(r"takes over from")
        probe.close()

    run(scenario())
    assert sat.stop(signal.SIGINT) == 0, sat.log


def test_missing_devices_are_one_line_and_the_satellite_goes_on(satellites: Any) -> None:
    sat = satellites(jfk(1.0), JARVIS_INPUT_DEVICE="no such microphone",
                     JARVIS_OUTPUT_DEVICE="no such speaker")
    line = sat.wait_for(r"ERROR .*JARVIS_INPUT_DEVICE='no such microphone'.*").group(0)
    assert "Traceback" not in sat.log

    async def scenario() -> None:
        client = await Client.connect(sat.port)
        await client.send("run-satellite")
        sat.wait_for(r"trying again every")
        await client.send("ping", {"text": "x"})
        assert (await client.expect("pong")).data["text"] == "x"  # no stream was announced
        # A reply for a speaker that does not open: dropped with a warning, still played.
        await client.send("audio-start", {"rate": 16000, "width": 2, "channels": 1})
        await client.send("audio-chunk", {"rate": 16000, "width": 2, "channels": 1},
                          bytes(3200))
        await client.send("audio-stop")
        await client.expect("played")
        client.close()

    run(scenario())
    sat.wait_for(r"WARNING .*JARVIS_OUTPUT_DEVICE.*reply not played")
    assert line.count("\n") == 0
    assert sat.stop() == 0, sat.log


def test_no_model_is_loaded_and_memory_stays_small(satellites: Any) -> None:
    sat = satellites(jfk(3.0), JARVIS_WAKE_WORD="hey_jarvis")

    async def scenario() -> None:
        client = await Client.connect(sat.port)
        await client.send("run-satellite")
        await client.send("ping")
        await client.expect("pong")
        sat.wait_for(r"started by the controller")
        maps = Path(f"/proc/{sat.proc.pid}/maps").read_text()
        status = Path(f"/proc/{sat.proc.pid}/status").read_text()
        client.close()
        libraries = {line.split()[-1] for line in maps.splitlines() if "/" in line}
        loaded = [lib for lib in libraries if any(m in Path(lib).name.lower()
                                                  for m in MODEL_LIBRARIES)]
        assert loaded == [], loaded
        assert any("tensorflowlite" in lib for lib in libraries)  # the wake word model is
        rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        assert rss_kb < 150 * 1024, f"RSS {rss_kb / 1024:.0f} MB"

    run(scenario())
    assert sat.stop() == 0, sat.log
    # The same code path in a script: no model package is even imported.
    script = (
        "import asyncio, json, sys\n"
        "from jarvis.cli.main import _parser\n"
        "from jarvis.wyoming.satellite import SatelliteOptions, WyomingSatellite\n"
        "_parser()\n"
        "async def main():\n"
        "    options = SatelliteOptions(name='x', uri='tcp://127.0.0.1:0', zeroconf=False,\n"
        "                               wake_word='hey_jarvis')\n"
        "    async with WyomingSatellite(options):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        f"print(json.dumps(sorted(m for m in sys.modules\n"
        f"                        if m.split('.')[0] in {MODEL_MODULES!r})))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    env["HOME"] = str(sat.home)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True, cwd=sat.home)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_local_wake_word_streams_the_request_with_its_preroll(satellites: Any) -> None:
    from tests.support.speech import say

    def pcm(audio: np.ndarray) -> np.ndarray:
        return to_int16(audio)

    negative = np.concatenate([pcm(silence(0.5)), jfk(11.0), pcm(silence(0.5)),
                               pcm(say("What time is it?")), pcm(silence(0.7))])
    wake = pcm(say("Hey Jarvis, what time is it?"))
    mic = np.concatenate([negative, wake, pcm(silence(3.0))])
    onset = len(negative) + int(np.flatnonzero(np.abs(wake) > 300)[0])
    sat = satellites(mic, JARVIS_WAKE_WORD="hey_jarvis")

    async def scenario() -> None:
        client = await Client.connect(sat.port)
        await client.send("describe")
        info = (await client.expect("info")).data
        assert info["satellite"]["active_wake_words"] == ["hey_jarvis"]
        assert [m["name"] for m in info["wake"][0]["models"]] == ["hey_jarvis"]
        await client.send("run-satellite")
        # Nothing is sent while the microphone hears speech without the wake word: the
        # first event is the detection, in the wake request.
        detection = await client.next(timeout=len(mic) / ASR_RATE + 10)
        assert detection is not None and detection.type == "detection", detection
        assert detection.data["name"] == "hey_jarvis"
        at = detection.data["timestamp"] * ASR_RATE // 1000
        assert len(negative) < at < len(negative) + len(wake), (at, len(negative))
        pipeline = await client.expect("run-pipeline")
        assert pipeline.data == {"start_stage": "asr", "end_stage": "tts",
                                 "wake_word_name": "hey_jarvis", "restart_on_end": False}
        await client.expect("audio-start")
        heard, _ = await client.audio(2.5)
        # The audio is the microphone's from 1.5 s before the detection: the wake phrase
        # is whole.
        starts = [s for s in range(at - int(1.5 * ASR_RATE) - 32, at - int(1.5 * ASR_RATE) + 32)
                  if np.array_equal(heard, mic[s:s + len(heard)])]
        assert len(starts) == 1, "the streamed audio is not the microphone's"
        assert starts[0] <= onset, (starts[0], onset)
        # voice-stopped is news only; with the transcript the stream ends and the wake
        # word is listened for again.
        await client.send("voice-stopped", {"timestamp": 2000})
        await client.audio(0.2)
        await client.send("transcript", {"text": "hey jarvis what time is it"})
        await client.expect("audio-stop")
        await client.send("ping", {"text": "p"})
        assert (await client.expect("pong")).data["text"] == "p"
        client.close()

    run(scenario())
    assert sat.stop(signal.SIGINT) == 0, sat.log


def test_the_sample_clock_never_runs_ahead_and_bursts_briefly_after_a_stall() -> None:
    now = [100.0]
    clock = SampleClock(16000, lead_s=0.05, max_lag_s=0.5, now=lambda: now[0])
    sent = 0
    for _ in range(200):  # a device without a clock: every read returns at once
        now[0] += clock.wait_s(1024)
        sent += 1024
        assert sent / 16000 <= now[0] - 100.0 + 0.05 + 1e-9
    assert now[0] - 100.0 >= 200 * 1024 / 16000 - 0.05
    now[0] += 10.0  # a stall of 10 s: at most 0.5 s goes out at once, then paced again
    burst = 0
    while clock.wait_s(1024) == 0.0:
        burst += 1024
    assert 0.4 * 16000 <= burst <= 0.6 * 16000
