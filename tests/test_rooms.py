"""Rooms without the models: JARVIS_SATELLITES, the satellite's audio turned into the
room's 16 kHz stream (formats, real-time budget, muting during replies), and the MQTT
topics and Home Assistant discovery of a room."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jarvis.config import load_settings
from jarvis.errors import ConfigError
from jarvis.home.discovery import room_discovery_messages
from jarvis.home.schema import Topics
from jarvis.wyoming.room_audio import FloodError, RoomAudio, RoomAudioError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pcm(seconds: float, rate: int = 16000, channels: int = 1, value: int = 1000) -> bytes:
    return np.full(int(seconds * rate) * channels, value, np.int16).tobytes()


def drain(audio: RoomAudio) -> np.ndarray:
    audio.close()

    async def collect() -> list[np.ndarray]:
        return [chunk async for chunk in audio.chunks()]

    parts = asyncio.run(collect())
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- settings


def test_satellites_setting_is_parsed_and_lowercased() -> None:
    settings = load_settings({"JARVIS_SATELLITES": " Kitchen=tcp://10.0.0.21:10700 ,"
                                                   "bed-room=tcp://bedroom.local:10700"})
    assert settings.satellites.satellites == (("kitchen", "tcp://10.0.0.21:10700"),
                                              ("bed-room", "tcp://bedroom.local:10700"))
    assert settings.satellites.enabled
    assert not load_settings({}).satellites.enabled


@pytest.mark.parametrize(("value", "words"), [
    ("kitchen", "expected NAME=tcp://HOST:PORT"),
    ("kit chen=tcp://a:1", "room name 'kit chen'"),
    ("kitchen=tcp://host", "kitchen: expected tcp://HOST:PORT"),
    ("a=tcp://x:1,A=tcp://y:2", "room 'a' is named twice"),
    ("a=", "a: no address"),
    ("a/b=tcp://x:1", "room name 'a/b'"),
])
def test_bad_satellites_setting_is_one_line_naming_it(value: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"JARVIS_SATELLITES": value})
    message = str(caught.value)
    assert message.startswith("JARVIS_SATELLITES=") and "\n" not in message
    assert words in message


# --------------------------------------------------------------------------- audio


def test_48k_stereo_becomes_16k_mono_of_the_same_length() -> None:
    clock = Clock()
    audio = RoomAudio("kitchen", clock=clock)
    for _ in range(10):  # 1 s in real time
        audio.feed(pcm(0.1, 48000, 2), (48000, 2, 2))
        clock.now += 0.1
    out = drain(audio)
    assert abs(len(out) - 16000) <= 64
    assert audio.dropped_s == 0.0
    assert float(np.median(out[2000:-2000])) == pytest.approx(1000 / 32768, rel=0.02)


def test_a_chunk_split_inside_a_frame_is_reassembled() -> None:
    audio = RoomAudio("kitchen")
    data = pcm(0.05, 16000, 2)
    audio.feed(data[:333], (16000, 2, 2))  # not a whole stereo frame
    audio.feed(data[333:], (16000, 2, 2))
    assert abs(len(drain(audio)) - 800) <= 32


def test_real_time_audio_is_never_dropped_and_a_burst_is_allowed() -> None:
    clock = Clock()
    audio = RoomAudio("kitchen", clock=clock)
    audio.feed(pcm(2.5), (16000, 2, 1))  # a stall caught up at once
    for _ in range(100):
        audio.feed(pcm(0.064), (16000, 2, 1))
        clock.now += 0.064
    assert audio.dropped_s == 0.0


def test_a_flood_is_dropped_then_refused() -> None:
    clock = Clock()
    audio = RoomAudio("kitchen", clock=clock)
    with pytest.raises(FloodError, match="faster than real time"):
        for _ in range(1000):  # 64 s of audio in 1 s of wall time
            audio.feed(pcm(0.064), (16000, 2, 1))
            clock.now += 0.001
    assert 3.0 <= audio.received_s - audio.dropped_s <= 4.5  # the burst, and 1 s
    assert audio.dropped_s > audio.flood_limit_s


def test_a_slightly_fast_satellite_is_refused_too() -> None:
    """1.5x real time: never more than the burst ahead at once, but it never stops."""
    clock = Clock()
    audio = RoomAudio("kitchen", clock=clock)
    with pytest.raises(FloodError):
        for _ in range(2000):
            audio.feed(pcm(0.096), (16000, 2, 1))
            clock.now += 0.064
    assert clock.now - 1000.0 > 10  # it took a while to tell


def test_while_the_reply_plays_the_room_is_heard_as_silence() -> None:
    clock = Clock()
    audio = RoomAudio("kitchen", clock=clock)
    audio.mute_until(clock.now + 0.5)
    audio.feed(pcm(0.25), (16000, 2, 1))
    clock.now += 1.0
    audio.feed(pcm(0.25), (16000, 2, 1))
    out = drain(audio)
    assert len(out) == 8000
    assert not out[:4000].any() and out[4000:].all()


@pytest.mark.parametrize(("fmt", "words"), [
    ((16000, 5, 1), "sample width 5"),
    ((1, 2, 1), "sample rate is 1 Hz"),
    ((16000, 2, 0), "0 channels"),
])
def test_an_unreadable_format_is_refused_by_name(fmt: tuple[int, int, int], words: str) -> None:
    with pytest.raises(RoomAudioError, match=words):
        RoomAudio("kitchen").feed(b"\0" * 64, fmt)


# --------------------------------------------------------------------------- MQTT


def test_room_topics_and_discovery() -> None:
    topics = Topics("jarvis/home", "homeassistant")
    assert topics.room("kitchen", "state") == "jarvis/home/room/kitchen/state"
    messages = dict(room_discovery_messages(topics, "kitchen", client_id="jarvis-home",
                                            version="1"))
    state = messages["homeassistant/sensor/jarvis-home_room_kitchen/state/config"]
    assert state["state_topic"] == "jarvis/home/room/kitchen/state"
    assert {a["topic"] for a in state["availability"]} == {
        "jarvis/home/availability", "jarvis/home/room/kitchen/availability"}
    assert state["availability_mode"] == "all"
    assert state["device"]["via_device"] == "jarvis-home"
    assert len({config["unique_id"] for config in messages.values()}) == len(messages) == 5
    assert room_discovery_messages(Topics("jarvis/home", ""), "kitchen", client_id="x",
                                   version="1") == []
