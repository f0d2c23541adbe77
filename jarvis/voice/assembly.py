"""Builds the assistant from :class:`~jarvis.config.Settings`: the LLM backend, the
device map, and (when asked for) ASR, TTS and the endpointer, loaded in parallel and
warmed before anything is heard; the one responder and the voice pipeline on top."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from jarvis.audio.echo import EchoReference
from jarvis.config import Settings
from jarvis.devices.device_map import DeviceMap, load_device_map
from jarvis.devices.handler import DeviceHandler
from jarvis.latency import LatencyTracker
from jarvis.llm.base import LLMBackend
from jarvis.llm.remote_fallback import Backend, select_backend
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.phrase_cache import phrase_cache_dir
from jarvis.speech.silero import Endpointer
from jarvis.speech.tts import PiperTts
from jarvis.voice.conversations import Conversations
from jarvis.voice.events import EventBus
from jarvis.voice.listening import ListeningPlan, make_front_end, plan_listening
from jarvis.voice.pipeline import VoicePipeline
from jarvis.voice.responder import Responder, tracker_listener

log = logging.getLogger(__name__)


@dataclass
class Assistant:
    """The loaded engines, the responder every entry point uses, and the voice
    pipeline (None when built without speech)."""

    backend: Backend
    """The in-process engine, the LLM server (``JARVIS_LLM_URL``), or the server with
    the in-process model as fallback (``JARVIS_LLM_FALLBACK=local``)."""
    responder: Responder
    tracker: LatencyTracker
    devices: DeviceHandler
    asr: WhisperAsr | None = None
    tts: PiperTts | None = None
    pipeline: VoicePipeline | None = None
    ready_s: float = 0.0
    listening: ListeningPlan | None = None
    """Wake word, echo cancellation, barge-in: what is on and why (when listening)."""
    reference: EchoReference | None = None
    """What the speaker plays, for echo cancellation: give it to the speaker sink."""

    @property
    def bus(self) -> EventBus:
        return self.responder.bus

    def voice(self) -> VoicePipeline:
        """The voice pipeline; a JarvisError-free assertion for callers that built it."""
        assert self.pipeline is not None, "built without speech"
        return self.pipeline

    async def close(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.cancel_reply()
        await self.backend.close()
        if self.tts is not None:
            await asyncio.to_thread(self.tts.close)


async def build_assistant(settings: Settings, *, listen: bool = True, speak: bool = True,
                          prefill_system: bool = True, speaker: bool = False,
                          microphone: bool = False) -> Assistant:
    """Load everything (in parallel worker threads) and return the ready assistant.
    ``listen=False`` skips the VAD model and ASR is kept only for ``converse``-style
    turns; ``speak=False`` skips ASR and TTS altogether (text turns only). ``speaker``
    and ``microphone``: replies are played on a loudspeaker a live microphone can hear
    (echo cancellation is then on by default, and with it barge-in)."""
    started = time.monotonic()
    plan = (plan_listening(settings.pipeline, speaker=speaker, microphone=microphone)
            if listen and speak else None)  # a bad wake word or echo setting fails first
    backend = select_backend(settings.llm, settings.cache, prefill_system=prefill_system)
    asr = WhisperAsr(settings.asr) if speak else None
    tts = PiperTts(settings.tts, phrase_cache_dir(settings.cache.dir)) if speak else None
    endpointer = Endpointer(settings.vad) if listen and speak else None
    devices_file = settings.mqtt.devices_file
    try:
        device_map = (await asyncio.to_thread(load_device_map, devices_file)
                      if devices_file else DeviceMap())  # a broken map fails before loading
        await asyncio.gather(backend.start(), *(engine.start() for engine in (asr, tts)
                                                  if engine is not None))
    except BaseException:
        await backend.close()
        raise
    responder, tracker = make_responder(backend, settings, device_map, tts)
    devices = responder.devices
    assert devices is not None
    reference = EchoReference() if plan is not None and plan.echo_cancel else None
    try:
        front = (await asyncio.to_thread(make_front_end, plan, endpointer, reference,
                                         threshold=settings.pipeline.wake_threshold)
                 if plan is not None and endpointer is not None else None)
    except BaseException:
        await backend.close()
        raise
    pipeline = (VoicePipeline(responder, asr, settings.pipeline, endpointer=endpointer,
                              front_end=front, silence_ms=settings.vad.silence_ms,
                              barge_in=plan.barge_in if plan is not None else None)
                if asr is not None else None)
    ready = time.monotonic() - started
    log.info("assistant ready in %.2f s", ready)
    for line in plan.lines() if plan is not None else ():
        log.info("%s", line)
    return Assistant(backend, responder, tracker, devices, asr, tts, pipeline, ready,
                     plan, reference)


def make_responder(backend: LLMBackend, settings: Settings, device_map: DeviceMap,
                   tts: PiperTts | None = None) -> tuple[Responder, LatencyTracker]:
    """The one responder over ``backend`` (and ``tts``), with its conversations, device
    map and a latency tracker fed by its ``TURN_END`` events."""
    p = settings.pipeline
    conversations = Conversations(settings.llm.system_prompt, history_turns=p.history_turns,
                                  idle_s=p.conversation_idle_s)
    devices = DeviceHandler(backend, device_map, room=settings.mqtt.site,
                            devices_file=settings.mqtt.devices_file)
    responder = Responder(backend, conversations, tts=tts, devices=devices,
                          repetition_guard=p.repetition_guard)
    tracker = LatencyTracker(spike_threshold_s=settings.latency.spike_threshold_s)
    responder.bus.subscribe(tracker_listener(tracker))
    return responder, tracker
