"""Jarvis drives Wyoming satellites, one room each, on the real models: scripted
satellites (``tests/support/fake_satellite.py``) for rooms at once and for the faults a
real one cannot be made to commit, then the real ``wyoming-satellite`` package.

Each room is its own conversation (``room:<name>``); its reply goes to its own
satellite, which the test checks by transcribing the audio each satellite received and
comparing it with the reply that room's turn gave.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from wyoming.event import Event

from jarvis.audio import ASR_RATE, resample
from jarvis.audio.formats import FloatArray, to_int16
from jarvis.config import Settings
from jarvis.speech.asr import WhisperAsr
from jarvis.voice.assembly import Assistant, build_assistant
from jarvis.voice.events import EventType, Outcome, Source, TurnEvent
from jarvis.wyoming.room import conversation_of
from jarvis.wyoming.rooms import Rooms
from tests.support import fake_satellite as fake
from tests.support.fake_satellite import FakeSatellite
from tests.support.mqtt import LoopThread, free_port, hub_settings
from tests.support.satellite_cmd import SatelliteProcess
from tests.support.speech import raw_int16, strip_zeros

pytestmark = pytest.mark.slow

REQUESTS = {
    "kitchen": ("What is the capital of France?", "france"),
    "bedroom": ("Tell me something about the moon.", "moon"),
    "office": ("How do I boil an egg?", "egg"),
    "garage": ("Name a famous painter.", "painter"),
}


class Hub:
    """The assistant (loaded once for the module) and every event it published."""

    def __init__(self, assistant: Assistant, settings: Settings, loop: LoopThread) -> None:
        self.assistant = assistant
        self.settings = settings
        self.loop = loop
        self.events: list[TurnEvent] = []
        assistant.bus.subscribe(self.events.append)

    def run(self, coro: object, timeout: float = 120.0) -> object:
        return self.loop.run(coro, timeout)  # type: ignore[arg-type]

    def rooms(self, satellites: dict[str, str], *, wake_word: str = "",
              echo_cancel: str = "auto", **changes: object) -> Rooms:
        settings = replace(
            self.settings,
            satellites=replace(self.settings.satellites,
                               satellites=tuple(satellites.items()), **changes),
            pipeline=replace(self.settings.pipeline, wake_word=wake_word,
                             echo_cancel=echo_cancel))
        return Rooms(self.assistant, settings)

    def ends(self, room: str, since: int = 0) -> list[TurnEvent]:
        return [e for e in self.events[since:]
                if e.room == room and e.type is EventType.TURN_END]

    def room_events(self, room: str, since: int = 0) -> list[TurnEvent]:
        return [e for e in self.events[since:] if e.room == room and e.type is EventType.ROOM]

    async def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{what}: not within {timeout} s; events: "
                                   + repr([(e.room, e.type.value, e.text[:40])
                                           for e in self.events[-30:]]))
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def hub(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("rooms")
    settings = hub_settings(tmp, WAKE_WORD="off", MAX_TOKENS="12",
                            SATELLITE_AUDIO_TIMEOUT_S="2")
    assistant = loop_thread.run(build_assistant(settings, listen=False), 180)
    yield Hub(assistant, settings, loop_thread)
    loop_thread.run(assistant.close(), 60)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def heard(asr: WhisperAsr, reply: fake.Reply) -> str:
    """What the satellite was told to play, transcribed."""
    pcm = np.frombuffer(bytes(reply.audio), np.int16).reshape(-1, reply.channels)
    audio = resample(pcm.mean(axis=1).astype(np.float32) / 32768, reply.rate, ASR_RATE)
    return asr.transcribe(audio).text


def asr_text(hub: Hub, audio: FloatArray, rate: int) -> str:
    assert hub.assistant.asr is not None
    return hub.assistant.asr.transcribe(resample(audio, rate, ASR_RATE)).text


def assert_answered_in_its_room(hub: Hub, sat: FakeSatellite, room: str, key: str,
                                since: int) -> None:
    """The room's turn heard its own request, and the audio its satellite got says
    that turn's reply."""
    ends = [e for e in hub.ends(room, since) if e.outcome is Outcome.ANSWERED]
    assert ends, f"{room}: no answered turn"
    end = ends[0]
    assert key in str(end.data["transcript"]).lower(), (room, end.data["transcript"])
    assert end.source is Source.SATELLITE and end.conversation_id == conversation_of(room)
    assert "voice_to_voice" in end.data["latency"]
    reply = sat.replies[0]
    assert reply.complete and reply.rate == hub.assistant.tts.sample_rate  # type: ignore[union-attr]
    said = heard(hub.assistant.asr, reply)  # type: ignore[arg-type]
    common = words(said) & words(end.text)
    assert len(common) >= max(1, len(words(end.text)) // 2), (room, said, end.text)
    assert key in " ".join(sat.transcripts).lower(), (room, sat.transcripts)


def serve_rooms(hub: Hub, sats: dict[str, FakeSatellite], *, until: Callable[[], bool],
                timeout: float = 90.0, extra: dict[str, str] | None = None,
                wake_word: str = "", echo_cancel: str = "auto", **changes: object) -> Rooms:
    """Start the fakes, drive them as rooms until ``until()``, stop everything."""

    async def go() -> Rooms:
        uris = {}
        for name, sat in sats.items():
            uris[name] = f"tcp://127.0.0.1:{await sat.start()}"
        uris.update(extra or {})
        rooms = hub.rooms(uris, wake_word=wake_word, echo_cancel=echo_cancel, **changes)
        await rooms.start()
        try:
            await hub.wait(until, timeout, "the rooms")
        finally:
            await rooms.stop()
            for sat in sats.values():
                await sat.stop()
        return rooms

    result = hub.run(go(), timeout + 60)
    assert isinstance(result, Rooms)
    return result


@pytest.mark.parametrize("count", [2, 4])
def test_rooms_speaking_at_once_are_each_answered_in_their_own_room(
        hub: Hub, spoken: Callable[[str], FloatArray], count: int) -> None:
    chosen = dict(list(REQUESTS.items())[:count])
    sats = {room: FakeSatellite(fake.normal(spoken(text), lead_s=0.3), name=room)
            for room, (text, _) in chosen.items()}
    since = len(hub.events)
    serve_rooms(hub, sats, until=lambda: all(
        hub.ends(room, since) and sats[room].replies and sats[room].replies[0].complete
        for room in chosen))
    for room, (_, key) in chosen.items():
        assert_answered_in_its_room(hub, sats[room], room, key, since)
        assert len(sats[room].replies) == 1  # nobody else's reply came here


def test_the_hubs_wake_word_runs_per_room_and_a_satellites_own_is_trusted(
        hub: Hub, spoken: Callable[[str], FloatArray]) -> None:
    """JARVIS_WAKE_WORD=hey_jarvis: a streaming satellite's request with the wake word
    is answered (and the satellite told of the detection), one without is not; a
    satellite whose own wake word fired (run-pipeline from asr) needs none, and stops
    streaming at the hub's transcript."""
    sats = {
        "kitchen": FakeSatellite(fake.normal(
            spoken("Hey Jarvis, what is the capital of France?"), lead_s=0.5), name="kitchen"),
        "bedroom": FakeSatellite(fake.normal(spoken(REQUESTS["bedroom"][0]), lead_s=0.5),
                                 name="bedroom"),
        # Its pre-roll holds the wake phrase, said alone; the request comes after "Yes?".
        "office": FakeSatellite(fake.local_wake(np.concatenate([
            spoken("Hey Jarvis."), np.zeros(int(2.5 * ASR_RATE), np.float32),
            spoken(REQUESTS["office"][0])])), name="office"),
    }
    since = len(hub.events)
    serve_rooms(hub, sats, wake_word="hey_jarvis", until=lambda: bool(
        hub.ends("kitchen", since) and sats["kitchen"].replies
        and sats["kitchen"].replies[0].complete and len(hub.ends("office", since)) >= 2
        and "stream_stopped" in sats["office"].marks))
    assert_answered_in_its_room(hub, sats["kitchen"], "kitchen", "france", since)
    assert "detection" in sats["kitchen"].types
    yes, answer = hub.ends("office", since)[:2]
    assert yes.text == "Yes?" and yes.data["intent"] == "control"
    assert "egg" in str(answer.data["request"]).lower() and answer.text
    # No transcript for the wake phrase alone (it would have ended the stream early).
    assert len(sats["office"].transcripts) == 1 and "egg" in sats["office"].transcripts[0]
    assert "jarvis" not in str(hub.ends("kitchen", since)[0].data["request"]).lower()
    assert not hub.ends("bedroom", since) and not sats["bedroom"].replies
    assert not any(e.room == "bedroom" and e.type is EventType.SPEECH_STARTED
                   for e in hub.events[since:])  # the gate kept it from the endpointer


def test_odd_but_usable_satellites_are_answered(
        hub: Hub, spoken: Callable[[str], FloatArray]) -> None:
    """Unknown events, audio before run-satellite, 48 kHz stereo: logged, answered."""
    sats = {
        "kitchen": FakeSatellite(fake.unknown_events(spoken(REQUESTS["kitchen"][0])),
                                 name="kitchen"),
        "bedroom": FakeSatellite(fake.audio_before_run(spoken(REQUESTS["bedroom"][0])),
                                 name="bedroom"),
        "office": FakeSatellite(fake.rate_48k_stereo(spoken(REQUESTS["office"][0])),
                                name="office"),
    }
    since = len(hub.events)
    rooms = serve_rooms(hub, sats, until=lambda: all(
        hub.ends(room, since) and sats[room].replies and sats[room].replies[0].complete
        for room in sats))
    for room, sat in sats.items():
        assert_answered_in_its_room(hub, sat, room, REQUESTS[room][1], since)
        assert [e.data["available"] for e in hub.room_events(room, since)][:2] == [False,
                                                                                   True]
    assert rooms.links["kitchen"].stats.ignored_events >= 2
    assert rooms.links["bedroom"].stats.early_audio >= 10
    assert rooms.links["office"].audio.received_s > 1.0


def test_broken_satellites_are_unavailable_and_the_others_keep_working(
        hub: Hub, spoken: Callable[[str], FloatArray]) -> None:
    """Flooding, announcing audio and sending none, a name that does not resolve: each
    room marked unavailable with its reason (and retried), while a good room answers."""
    sats = {
        "kitchen": FakeSatellite(fake.normal(spoken(REQUESTS["kitchen"][0]), lead_s=0.3),
                                 name="kitchen"),
        "flood": FakeSatellite(fake.flood(), name="flood"),
        "silent": FakeSatellite(fake.silent(), name="silent"),
    }
    since = len(hub.events)

    def reasons(room: str) -> str:
        return " | ".join(str(e.data["reason"]) for e in hub.room_events(room, since)
                          if not e.data["available"])

    rooms = serve_rooms(
        hub, sats, extra={"attic": "tcp://no-such-host.invalid:10700"},
        until=lambda: bool(hub.ends("kitchen", since) and sats["kitchen"].replies
                           and sats["kitchen"].replies[0].complete
                           and "faster than real time" in reasons("flood")
                           and "sent none" in reasons("silent")
                           and "does not resolve" in reasons("attic")))
    assert_answered_in_its_room(hub, sats["kitchen"], "kitchen", "france", since)
    assert "JARVIS_SATELLITES" in reasons("attic")
    # Retried all along (1 s, 2 s, ...), but said once: months of retries stay quiet.
    assert rooms.links["attic"].stats.attempts >= 2
    assert reasons("attic").count("does not resolve") == 1
    assert "JARVIS_SATELLITE_AUDIO_TIMEOUT_S" in reasons("silent")
    assert not rooms.links["flood"].available
    assert not hub.ends("flood", since) and not hub.ends("attic", since)


def test_a_satellite_killed_mid_utterance_comes_back_and_is_answered(
        hub: Hub, spoken: Callable[[str], FloatArray], jfk_audio: FloatArray) -> None:
    """Killed while the user speaks: the room goes unavailable and the half-heard
    request is dropped (no reply into the void); back on its port, it is driven again
    and answered."""
    first = FakeSatellite(fake.normal(jfk_audio, lead_s=0.3), name="kitchen")
    since = len(hub.events)

    async def go() -> tuple[FakeSatellite, Rooms]:
        port = await first.start()
        rooms = hub.rooms({"kitchen": f"tcp://127.0.0.1:{port}"})
        await rooms.start()
        try:
            await hub.wait(lambda: any(e.room == "kitchen" and e.type is
                                       EventType.SPEECH_STARTED for e in hub.events[since:]),
                           30, "speech started")
            first.kill()
            await hub.wait(lambda: any(not e.data["available"] and "connecting" not in
                                       str(e.data["reason"])
                                       for e in hub.room_events("kitchen", since)),
                           10, "kitchen unavailable")
            await first.stop()
            again = FakeSatellite(fake.normal(spoken(REQUESTS["kitchen"][0]), lead_s=0.3),
                                  name="kitchen")
            await again.start(port)
            try:
                await hub.wait(lambda: bool(again.replies and again.replies[0].complete
                                            and hub.ends("kitchen", since)),
                               60, "the reply after the comeback")
            finally:
                await again.stop()
        finally:
            await rooms.stop()
        return again, rooms

    result = hub.run(go(), 150)
    assert isinstance(result, tuple)
    again, rooms = result
    assert rooms.links["kitchen"].stats.sessions == 2
    assert not first.replies  # the killed utterance was never answered
    assert_answered_in_its_room(hub, again, "kitchen", "france", since)


def test_hub_settings_have_no_satellites_by_default(tmp_path: Path) -> None:
    assert not hub_settings(tmp_path).satellites.enabled
    assert free_port() > 0


@pytest.mark.parametrize("own_wake_word", [False, True])
def test_jarvis_satellite_on_alsa_devices_is_driven_by_the_hub(
        hub: Hub, spoken: Callable[[str], FloatArray], tmp_path: Path,
        own_wake_word: bool) -> None:
    """``jarvis satellite`` (a real process; its microphone and speaker are ALSA
    ``file`` devices) as a room: streaming all the time, or after its own wake word
    (the phrase, in its pre-roll, is taken off the request). The reply is played on
    its speaker."""
    text = ("Hey Jarvis, " if own_wake_word else "") + REQUESTS["kitchen"][0]
    mic = np.concatenate([np.zeros(ASR_RATE // 2, np.float32), spoken(text)])
    sat = SatelliteProcess(tmp_path / "den", to_int16(mic),
                           JARVIS_WAKE_WORD="hey_jarvis" if own_wake_word else "off")
    since = len(hub.events)

    async def go() -> Rooms:
        rooms = hub.rooms({"den": f"tcp://127.0.0.1:{sat.port}"})
        await rooms.start()
        try:
            await hub.wait(lambda: bool(hub.ends("den", since)), 60, "the den's answer")
            await hub.wait(lambda: rooms.links["den"].stats.played >= 1, 30, "played")
        finally:
            await rooms.stop()
        return rooms

    try:
        rooms = hub.run(go(), 120)
        assert isinstance(rooms, Rooms)
    finally:
        sat.stop()
    end = hub.ends("den", since)[0]
    assert end.outcome is Outcome.ANSWERED and "france" in str(end.data["request"]).lower()
    assert "jarvis" not in str(end.data["request"]).lower()
    played = strip_zeros(raw_int16(sat.speaker))
    said = asr_text(hub, played.astype(np.float32) / 32768, hub.assistant.tts.sample_rate)  # type: ignore[union-attr]
    assert len(words(said) & words(end.text)) >= max(1, len(words(end.text)) // 2), \
        (said, end.text)
    assert len(rooms.links["den"].speaker.replies) == 1


def test_satellites_found_by_zeroconf_become_rooms(
        hub: Hub, spoken: Callable[[str], FloatArray]) -> None:
    """JARVIS_SATELLITE_DISCOVERY=true: a satellite advertised over mDNS is driven as a
    room named after it; a Wyoming service that is not a satellite is left alone."""
    from jarvis.wyoming.protocol import encode_event, read_event
    from jarvis.wyoming.zeroconf import Advertiser

    sat = FakeSatellite(fake.normal(spoken(REQUESTS["garage"][0]), lead_s=0.3),
                        name="Garage Pi")
    described: list[str] = []

    async def not_a_satellite(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        while (event := await read_event(reader)) is not None:
            described.append(event.type)
            if event.type == "describe":
                writer.write(encode_event(Event(type="info", data={"asr": []})))
        writer.close()

    since = len(hub.events)

    async def go() -> Rooms:
        port = await sat.start()
        other = await asyncio.start_server(not_a_satellite, "127.0.0.1", 0)
        adverts = [Advertiser("Garage Pi", port, "127.0.0.1"),
                   Advertiser("speech-to-text", other.sockets[0].getsockname()[1],
                              "127.0.0.1")]
        for advert in adverts:
            assert await advert.start()
        rooms = hub.rooms({}, discovery=True)
        await rooms.start()
        try:
            await hub.wait(lambda: bool(hub.ends("garage-pi", since) and sat.replies
                                        and sat.replies[0].complete and described),
                           60, "the discovered room's answer")
        finally:
            await rooms.stop()
            for advert in adverts:
                await advert.stop()
            other.close()
            await sat.stop()
        return rooms

    rooms = hub.run(go(), 120)
    assert isinstance(rooms, Rooms)
    assert set(rooms.links) == {"garage-pi"}
    assert described == ["describe"]  # asked what it is, and left alone
    assert_answered_in_its_room(hub, sat, "garage-pi", "painter", since)


@pytest.mark.parametrize("echo_cancel", ["auto", "off"])
def test_a_room_does_not_answer_its_own_echo_and_speech_over_a_reply_cuts_it(
        hub: Hub, spoken: Callable[[str], FloatArray], echo_cancel: str) -> None:
    """Satellites whose microphones hear their replies. With echo cancellation (the
    replies sent are the reference) the echo is not taken for speech and talking over
    a reply stops it within a fraction of a second, then is answered; without, the room
    is half duplex: the echo is not heard either, nor is anyone talking over it."""
    story = "Tell me a long story about a dragon and a castle."
    sats = {
        "kitchen": FakeSatellite(fake.echo_room(spoken(REQUESTS["kitchen"][0])),
                                 name="kitchen"),
        "bedroom": FakeSatellite(fake.echo_room(
            spoken(story), interrupt=spoken(REQUESTS["office"][0]), interrupt_after_s=1.0),
            name="bedroom"),
    }
    since = len(hub.events)
    cancelling = echo_cancel == "auto"
    def interruption_answered() -> bool:
        # Its words may be misheard where they overlap the echo being cancelled ("boil
        # an egg" came out as "W.I. Boyle and A." once): the kitchen shows that echo
        # alone makes no turn, so an answered turn after the cut is the person's.
        return any(e.outcome is Outcome.ANSWERED and str(e.data["transcript"]).strip()
                   for e in hub.ends("bedroom", since)[1:])

    rooms = serve_rooms(hub, sats, echo_cancel=echo_cancel, until=lambda: bool(
        (interruption_answered() if cancelling else hub.ends("bedroom", since))
        and sats["kitchen"].replies and sats["kitchen"].replies[0].complete
        and hub.ends("kitchen", since)
        and time.monotonic() > (sats["kitchen"].replies[0].stopped_at or 0) + 3.0))
    kitchen = hub.ends("kitchen", since)
    assert len(kitchen) == 1 and not kitchen[0].data["interrupted"]  # no echo turns
    first = hub.ends("bedroom", since)[0]
    assert "dragon" in str(first.data["request"]).lower()
    if cancelling:
        interrupted_at = sats["bedroom"].marks["interrupt"]
        reply = sats["bedroom"].replies[0]
        assert first.data["interrupted"] and first.outcome is Outcome.CANCELLED
        assert reply.stopped_at is not None and reply.stopped_at - interrupted_at < 1.5
        assert rooms.links["bedroom"].speaker.replies[0] < 3.0  # seconds sent: cut
        # What the person said over the reply is heard and answered.
        assert interruption_answered()
    else:
        assert not first.data["interrupted"]
        assert all(not e.data["interrupted"] for e in hub.ends("bedroom", since))
