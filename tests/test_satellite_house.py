"""A house: the real ``jarvis hub`` (MQTT on a real mosquitto) drives two real
``wyoming-satellite`` 1.0.0 processes, one of them with a 48 kHz stereo microphone.
Each satellite's ``--mic-command`` plays a spoken request when the test says so,
its ``--snd-command`` writes what it is told to play to a file.

Both rooms speak at once: each request is answered in its own room (the reply audio in
that room's file says that room's reply, which MQTT reports on the room's topics).
Then one satellite is killed: its room goes offline on MQTT, the other room answers
its next request, and the hub stops cleanly.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from jarvis.audio import ASR_RATE, resample
from jarvis.audio.formats import FloatArray, to_int16
from jarvis.speech.asr import WhisperAsr
from tests.support.mqtt import HubProcess, Mosquitto, Probe, process_env
from tests.support.peers import (
    free_port,
    start_wyoming_satellite,
    stop_process,
    wait_until_listening,
    wyoming_satellite_python,
)
from tests.support.sat_mic import mic_command
from tests.support.sat_snd import snd_command

pytestmark = pytest.mark.slow

SITE = "house"
BASE = f"jarvis/{SITE}"
ROOMS = {
    # room: (requests, mic rate, mic channels, a word of each request's transcript)
    "kitchen": (["What is the capital of France?"], 16000, 1, ["france"]),
    "bedroom": (["Tell me something about the moon.", "How do I boil an egg?"], 48000, 2,
                ["moon", "egg"]),
}


def write_wav(path: Path, audio: FloatArray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(ASR_RATE)
        out.writeframes(to_int16(audio).tobytes())
    return path


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def transcribe_raw(asr: WhisperAsr, raw: bytes, rate: int = 22050) -> str:
    audio = np.frombuffer(raw[: len(raw) // 2 * 2], np.int16).astype(np.float32) / 32768
    return asr.transcribe(resample(audio, rate, ASR_RATE)).text


def test_a_house_of_satellites_driven_by_the_hub(
        tmp_path: Path, mosquitto: Mosquitto, asr: WhisperAsr,
        spoken: Callable[[str], FloatArray]) -> None:
    python = wyoming_satellite_python()
    satellites = {}
    env_rooms = []
    for room, (texts, rate, channels, _) in ROOMS.items():
        wavs = [write_wav(tmp_path / f"{room}-{i}.wav", spoken(text))
                for i, text in enumerate(texts)]
        port = free_port()
        proc = start_wyoming_satellite(
            python, port=port, name=room,
            mic_command=mic_command(wavs, rate=rate, channels=channels, lead_s=0.3,
                                    gap_s=0.5, wait_for=str(tmp_path / f"go-{room}-")),
            snd_command=snd_command(tmp_path / f"{room}.raw"),
            extra_args=["--mic-command-rate", str(rate), "--mic-command-channels",
                        str(channels)],
            log_path=tmp_path / f"{room}.log")
        satellites[room] = proc
        env_rooms.append(f"{room}=tcp://127.0.0.1:{port}")
    try:
        for proc in satellites.values():
            wait_until_listening(proc)
        asyncio.run(_scenario(tmp_path, mosquitto, asr, satellites, ",".join(env_rooms)))
    finally:
        for proc in satellites.values():
            stop_process(proc)


async def _scenario(tmp: Path, broker: Mosquitto, asr: WhisperAsr,
                    satellites: dict[str, object], rooms_env: str) -> None:
    probe = await Probe(broker.port).start(f"{BASE}/#", "homeassistant/#")
    hub = HubProcess(process_env(broker, tmp, SITE=SITE, SATELLITES=rooms_env,
                                 WAKE_WORD="off", MAX_TOKENS="12"), tmp)
    try:
        for room in ROOMS:
            await probe.wait_for(lambda t, p, r=room: t == f"{BASE}/room/{r}/availability"
                                 and p == b"online", timeout=120)
        discovered = {t for t, _, _, _ in probe.messages if "_room_" in t}
        assert {f"homeassistant/sensor/jarvis-{SITE}_room_{r}/state/config"
                for r in ROOMS} <= discovered

        # Both rooms speak within the same second.
        start = len(probe.messages)
        for room in ROOMS:
            (tmp / f"go-{room}-0").touch()
        replies = {}
        for room, (_, _, _, keys) in ROOMS.items():
            _, payload = await probe.wait_for(
                lambda t, p, r=room: t == f"{BASE}/room/{r}/reply", start=start, timeout=90)
            replies[room] = json.loads(payload)["text"]
            _, heard = await probe.wait_for(
                lambda t, p, r=room: t == f"{BASE}/room/{r}/transcript", start=start)
            assert keys[0] in json.loads(heard)["text"].lower(), (room, heard)
        for room, reply in replies.items():
            assert reply, room
            said = transcribe_raw(asr, (tmp / f"{room}.raw").read_bytes())
            assert len(words(said) & words(reply)) >= max(1, len(words(reply)) // 2), \
                (room, said, reply)
        states = [p for t, p, _, _ in probe.messages[start:]
                  if t == f"{BASE}/room/kitchen/state"]
        assert b"thinking" in states and b"speaking" in states, states

        # The kitchen satellite dies; the bedroom carries on.
        start = len(probe.messages)
        stop_process(satellites["kitchen"])  # type: ignore[arg-type]
        await probe.wait_for(lambda t, p: t == f"{BASE}/room/kitchen/availability"
                             and p == b"offline", start=start, timeout=30)
        (tmp / "go-bedroom-1").touch()
        _, payload = await probe.wait_for(lambda t, p: t == f"{BASE}/room/bedroom/transcript"
                                          and b"egg" in p.lower(), start=start, timeout=60)
        await probe.wait_for(lambda t, p: t == f"{BASE}/room/bedroom/reply", start=start,
                             timeout=60)
        assert "room kitchen: unavailable" in hub.output
        hub.signal(signal.SIGTERM)
        assert await hub.exit_code() == 0
    finally:
        hub.kill()
        await probe.stop()
