"""The satellite test support works: the paced microphone and the recording speaker
scripts, the scripted fake satellite, and the real ``wyoming-satellite`` 1.0.0 in its
own virtualenv (slow: built once per machine, then cached)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from wyoming.event import Event

from jarvis.wyoming.protocol import ProtocolError
from tests.support import peers, sat_mic, sat_snd
from tests.support.fake_satellite import (
    FakeSatellite,
    audio_before_run,
    flood,
    normal,
    rate_48k_stereo,
    silent,
    unknown_events,
)

JFK = Path(__file__).resolve().parent / "data" / "jfk-16k-mono.wav"
RATE = 16000
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def jfk(start_s: float, end_s: float) -> np.ndarray:
    """A slice of the JFK clip, int16 16 kHz."""
    with wave.open(str(JFK), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm[round(start_s * RATE):round(end_s * RATE)].astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return path


def tone(seconds: float, amplitude: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def read_marks(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def marks_of(marks: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [m for m in marks if m["event"] == event]


# --------------------------------------------------------------------------- sat_mic


def test_mic_writes_lead_then_the_wav_in_real_time_with_marks(tmp_path: Path) -> None:
    speech = jfk(0.2, 1.2)
    wav = write_wav(tmp_path / "one.wav", speech)
    marks = tmp_path / "marks.jsonl"
    started = time.monotonic()
    done = subprocess.run(sat_mic.mic_command([wav], lead_s=0.5, marks=marks,
                                              loop_silence=False),
                          capture_output=True, timeout=20, check=True)
    wall = time.monotonic() - started

    assert done.stdout == bytes(2 * 8000) + speech.tobytes()
    assert wall >= 1.4
    log = read_marks(marks)
    assert [m["event"] for m in log] == ["start", "speech_start", "speech_end", "end"]
    start, end = log[0]["t"], marks_of(log, "speech_end")[0]
    due = start + (end["frame"] + 1) / RATE  # when its last voiced sample was "recorded"
    assert due - 0.01 <= end["t"] <= due + 1024 / RATE + 0.25
    assert 8000 <= end["frame"] < 8000 + len(speech)


def test_mic_converts_rate_and_channels_and_plays_several_wavs(tmp_path: Path) -> None:
    first = write_wav(tmp_path / "a.wav", tone(0.1))
    second = write_wav(tmp_path / "b.wav", tone(0.1, hz=880.0))
    marks = tmp_path / "marks.jsonl"
    argv = sat_mic.mic_command([first, second], rate=48000, channels=2, lead_s=0.05,
                               gap_s=0.1, marks=marks, loop_silence=False)
    out = subprocess.run(argv, capture_output=True, timeout=20, check=True).stdout

    frames = np.frombuffer(out, dtype="<i2").reshape(-1, 2)
    assert len(frames) == round(0.05 * 48000) + 2 * 4800 + 4800
    assert np.array_equal(frames[:, 0], frames[:, 1])
    expected = np.round(0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(4800) / 48000))
    lead = round(0.05 * 48000)
    # linear interpolation (the last two frames hold the last sample: nothing after it)
    assert np.abs(frames[lead:lead + 4798, 0] - expected[:4798]).max() < 0.01 * 32768
    assert not frames[lead + 4800:lead + 9600].any()  # the gap
    ends = marks_of(read_marks(marks), "speech_end")
    assert [m["index"] for m in ends] == [0, 1]
    assert ends[1]["frame"] > lead + 9600


def test_mic_keeps_silent_until_the_reader_closes_then_exits_quietly(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "a.wav", tone(0.1))
    proc = subprocess.Popen(sat_mic.mic_command([wav], lead_s=0.0), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    want = 2 * round(0.5 * RATE)
    data = b""
    while len(data) < want:
        chunk = os.read(proc.stdout.fileno(), want - len(data))
        assert chunk, "the mic script ended on its own"
        data += chunk
    proc.stdout.close()
    assert proc.wait(timeout=5) == 0
    assert proc.stderr.read() == b""
    assert data[:2 * 1600] == tone(0.1).tobytes()
    assert not any(data[2 * 2048:])  # silence after the (chunk-padded) tone


# --------------------------------------------------------------------------- sat_snd


def _play(out: Path, marks: Path, bursts: list[bytes], pause_s: float) -> None:
    """Feed ``bursts`` to one sat_snd process, ``pause_s`` apart."""
    proc = subprocess.Popen(sat_snd.snd_command(out, marks=marks, gap_s=0.2),
                            stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for index, burst in enumerate(bursts):
        if index:
            time.sleep(pause_s)  # the stimulus: a pause in the reply audio
        proc.stdin.write(burst)
        proc.stdin.flush()
    proc.stdin.close()
    assert proc.wait(timeout=5) == 0


def test_snd_appends_each_run_and_marks_the_first_audio_of_each_reply(
        tmp_path: Path) -> None:
    out, marks = tmp_path / "out.raw", tmp_path / "marks.jsonl"
    silence, sound, more = bytes(4096), tone(0.05).tobytes(), tone(0.05, hz=880).tobytes()
    _play(out, marks, [silence, sound, more], pause_s=0.5)
    _play(out, marks, [sound], pause_s=0.0)

    assert out.read_bytes() == silence + sound + more + sound
    log = read_marks(marks)
    firsts = marks_of(log, "first_audio")
    assert len(firsts) == 3
    assert firsts[0]["offset"] <= len(silence) < firsts[0]["offset"] + firsts[0]["bytes"]
    assert firsts[1]["offset"] == len(silence) + len(sound)
    assert firsts[2]["offset"] == len(silence) + len(sound) + len(more)
    assert firsts[1]["t"] - firsts[0]["t"] >= 0.45
    assert [m["bytes"] for m in marks_of(log, "eof")] == [
        len(silence) + len(sound) + len(more), len(sound)]


# --------------------------------------------------------------------------- fake satellite


async def _collect_audio(client: peers.WyomingClient, frames: int,
                         timeout_s: float = 10.0) -> tuple[bytes, list[Event], float]:
    """Read until ``frames`` mono frames of ``audio-chunk`` arrived: the audio, every
    event read, and when (monotonic) the last chunk came."""
    deadline = time.monotonic() + timeout_s
    audio = bytearray()
    seen: list[Event] = []
    while len(audio) < 2 * frames:
        event = await client.read(deadline - time.monotonic())
        assert event is not None, "connection closed"
        seen.append(event)
        if event.type == "audio-chunk":
            audio += event.payload or b""
    return bytes(audio), seen, time.monotonic()


def test_fake_answers_describe_and_ping_and_streams_paced_audio() -> None:
    speech = jfk(0.3, 0.8)

    async def scenario() -> None:
        async with FakeSatellite(normal(speech), name="kitchen") as sat, \
                peers.WyomingClient(sat.port) as client:
            await client.send(Event("describe"))
            info = await client.read()
            assert info is not None and info.type == "info"
            assert info.data["satellite"]["name"] == "kitchen"
            await client.send(Event("ping", {"text": "abc"}))
            pong = await client.read()
            assert pong is not None and pong.type == "pong" and pong.data["text"] == "abc"

            asked = time.monotonic()
            await client.send(Event("run-satellite"))
            audio, seen, last = await _collect_audio(client, len(speech) + 1024)
            assert seen[0].type == "run-pipeline"
            assert seen[0].data["start_stage"] == "wake"
            assert seen[0].data["end_stage"] == "tts"
            assert {e.type for e in seen[1:]} == {"audio-chunk"}
            assert all(e.data["rate"] == RATE and e.data["channels"] == 1 for e in seen[1:])
            assert audio.startswith(speech.tobytes())
            assert not any(audio[len(speech) * 2:])
            assert last - asked >= (len(audio) // 2) / RATE - 0.1  # paced, not burst
            assert "speech_end" in sat.marks
            assert sat.types == ["describe", "ping", "run-satellite"]
            assert sat.connections == 1

    run(scenario())


def test_fake_records_reply_audio_and_transcripts() -> None:
    async def scenario() -> None:
        async with FakeSatellite(silent()) as sat, peers.WyomingClient(sat.port) as client:
            fmt = {"rate": 22050, "width": 2, "channels": 1}
            await client.send(Event("run-satellite"))
            await client.send(Event("transcript", {"text": "what time is it"}))
            await client.send(Event("audio-start", fmt))
            for n in range(3):
                await client.send(Event("audio-chunk", fmt, payload=bytes([n + 1]) * 100))
            await client.send(Event("audio-stop"))
            reply = await sat.wait_for_reply(timeout=5)
            assert reply.audio == b"\x01" * 100 + b"\x02" * 100 + b"\x03" * 100
            assert reply.rate == 22050 and reply.had_audio_start
            assert sat.reply_rate == 22050
            assert sat.transcripts == ["what time is it"]

    run(scenario())


def test_fake_kill_drops_the_stream_and_refuses_new_connections() -> None:
    async def scenario() -> None:
        sat = FakeSatellite(normal(jfk(0.3, 3.0)))
        port = await sat.start()
        try:
            async with peers.WyomingClient(port) as client:
                await client.send(Event("run-satellite"))
                await _collect_audio(client, 2048)
                sat.kill()
                with pytest.raises((ProtocolError, ConnectionError)):
                    while (await client.read()) is not None:
                        pass
                    raise ConnectionError("clean end")  # also fine: the socket closed
            await sat.wait_for_disconnect()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
        finally:
            await sat.stop()

    run(scenario())


def test_fake_unknown_events_come_first_and_inside_the_stream() -> None:
    async def scenario() -> None:
        async with FakeSatellite(unknown_events(jfk(0.3, 0.5), every=2)) as sat, \
                peers.WyomingClient(sat.port) as client:
            first = await client.read()
            assert first is not None and first.type == "frobnicate"
            assert first.payload and first.data["level"] == 11
            await client.send(Event("run-satellite"))
            _, seen, _ = await _collect_audio(client, 4 * 1024)
            types = [e.type for e in seen]
            assert types.index("run-pipeline") > types.index("x-vendor-led")
            assert any(t != "audio-chunk" for t in types[types.index("audio-chunk"):])

    run(scenario())


def test_fake_audio_before_run_arrives_unasked() -> None:
    async def scenario() -> None:
        async with FakeSatellite(audio_before_run(jfk(0.3, 1.0), before_s=0.5)) as sat, \
                peers.WyomingClient(sat.port) as client:
            audio, seen, _ = await _collect_audio(client, 8000)
            assert {e.type for e in seen} == {"audio-chunk"}
            assert audio[:16000] == jfk(0.3, 0.8).tobytes()
            await client.send(Event("run-satellite"))
            events = await client.read_until("run-pipeline")
            assert len(events) == 1

    run(scenario())


def test_fake_flood_sends_far_faster_than_real_time() -> None:
    async def scenario() -> None:
        async with FakeSatellite(flood(seconds=20)) as sat, \
                peers.WyomingClient(sat.port) as client:
            await client.send(Event("run-satellite"))
            started = time.monotonic()
            audio, seen, last = await _collect_audio(client, 10 * RATE)
            assert seen[0].type == "run-pipeline"
            assert last - started < 5.0  # ten seconds of audio, much faster than real time
            assert np.abs(np.frombuffer(audio, dtype="<i2")).max() > 8000

    run(scenario())


def test_fake_silent_sends_no_audio_but_still_answers() -> None:
    async def scenario() -> None:
        async with FakeSatellite(silent()) as sat, peers.WyomingClient(sat.port) as client:
            await client.send(Event("run-satellite"))
            await client.read_until("run-pipeline")
            with pytest.raises(asyncio.TimeoutError):
                await client.read(0.5)
            await client.send(Event("ping"))
            events = await client.read_until("pong")
            assert len(events) == 1

    run(scenario())


def test_fake_48k_stereo_sends_converted_chunks() -> None:
    speech = jfk(0.3, 0.6)

    async def scenario() -> None:
        async with FakeSatellite(rate_48k_stereo(speech)) as sat, \
                peers.WyomingClient(sat.port) as client:
            await client.send(Event("run-satellite"))
            await client.read_until("run-pipeline")
            chunk = await client.read()
            assert chunk is not None and chunk.type == "audio-chunk"
            assert (chunk.data["rate"], chunk.data["channels"]) == (48000, 2)
            frames = np.frombuffer(chunk.payload or b"", dtype="<i2").reshape(-1, 2)
            assert len(frames) == 1024
            assert np.array_equal(frames[:, 0], frames[:, 1])
            assert np.array_equal(frames[::3, 0], speech[:342])  # every third: the original

    run(scenario())


# --------------------------------------------------------------------------- peers


def test_venv_is_built_once_under_a_lock_and_rebuilt_when_broken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str] = []

    def fake_build(venv: Path, requirements: list[str], check: str, lock_fd: int) -> None:
        builds.append(threading.current_thread().name)
        time.sleep(0.2)  # a slow build, so the other thread has to wait on the lock
        shutil.rmtree(venv, ignore_errors=True)
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        (venv / "bin" / "python").symlink_to(sys.executable)
        (venv / peers.MARKER).write_text(json.dumps({"requirements": requirements}))

    monkeypatch.setattr(peers, "_build_venv", fake_build)
    venv = tmp_path / "peer"
    threads = [threading.Thread(target=peers.ensure_venv, args=(venv, ["x==1"]),
                                kwargs={"check": "pass"}) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(builds) == 1
    assert peers.ensure_venv(venv, ["x==1"], check="pass") == venv / "bin" / "python"
    assert len(builds) == 1

    (venv / "bin" / "python").unlink()  # a broken venv
    peers.ensure_venv(venv, ["x==1"], check="pass")
    peers.ensure_venv(venv, ["x==2"], check="pass")  # another requirement list
    assert len(builds) == 3


def test_a_failing_install_step_reports_its_output_tail() -> None:
    with pytest.raises(peers.PeerError, match=r"(?s)exit 3.*boom"):
        peers._run_step([sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                        "pip install something")


@pytest.mark.slow
def test_real_wyoming_satellite_describes_itself_and_streams_the_wav(tmp_path: Path) -> None:
    started = time.monotonic()
    python = peers.wyoming_satellite_python()
    print(f"wyoming-satellite venv ready in {time.monotonic() - started:.1f} s")
    speech = jfk(0.2, 1.2)
    wav = write_wav(tmp_path / "speech.wav", speech)
    mic_marks, snd_marks, snd_out = (tmp_path / "mic.jsonl", tmp_path / "snd.jsonl",
                                     tmp_path / "snd.raw")
    mic = sat_mic.mic_command([wav], lead_s=2.5, marks=mic_marks)
    snd = sat_snd.snd_command(snd_out, marks=snd_marks)
    with peers.running_wyoming_satellite(python, mic_command=mic, snd_command=snd,
                                         name="test-sat",
                                         log_path=tmp_path / "sat.log") as proc:
        reply = tone(0.2).tobytes()
        audio = run(_talk_to_real_satellite(proc.port, reply, len(speech)), timeout=40)
        _wait_for_size(snd_out, len(reply), proc)
        log = proc.log_tail()

    assert speech.tobytes() in audio, f"the WAV is not in the streamed audio; log:\n{log}"
    assert snd_out.read_bytes() == reply  # 22050 Hz in, 22050 Hz out: no conversion
    assert len(marks_of(read_marks(snd_marks), "first_audio")) == 1
    assert marks_of(read_marks(mic_marks), "speech_end")


async def _talk_to_real_satellite(port: int, reply: bytes, speech_frames: int) -> bytes:
    """describe, run-satellite, read until the speech has surely passed, send a reply;
    the streamed audio."""
    async with peers.WyomingClient(port) as client:
        await client.send(Event("describe"))
        info = await client.read()
        assert info is not None and info.data["satellite"]["name"] == "test-sat"
        await client.send(Event("run-satellite"))
        first = await client.read()
        assert first is not None and first.type == "run-pipeline", first
        audio, seen, _ = await _collect_audio(client, round(2.5 * RATE) + speech_frames + 2048,
                                              timeout_s=15)
        assert {e.type for e in seen} == {"audio-chunk"}  # no audio-start from 1.0.0
        assert all(e.data["rate"] == RATE and e.data["channels"] == 1 for e in seen)
        fmt = {"rate": 22050, "width": 2, "channels": 1}
        await client.send(Event("audio-start", fmt))
        await client.send(Event("audio-chunk", fmt, payload=reply))
        await client.send(Event("audio-stop"))
        return audio


def _wait_for_size(path: Path, size: int, proc: peers.SatelliteProcess,
                   timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.stat().st_size >= size):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never reached {size} bytes; log:\n"
                                 f"{proc.log_tail()}")
        time.sleep(0.05)  # poll a file another process writes
