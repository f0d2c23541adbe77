"""Builds the whole assistant from :class:`~jarvis.config.Settings`: the LLM backend,
ASR, TTS and endpointer, loaded in parallel and warmed before anything is heard."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from jarvis.config import Settings
from jarvis.latency import LatencyTracker
from jarvis.llm.llama_cpp import LlamaCppBackend
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.silero import Endpointer
from jarvis.speech.tts import PiperTts
from jarvis.voice.pipeline import VoicePipeline

log = logging.getLogger(__name__)


@dataclass
class Assistant:
    """The loaded engines and the voice pipeline that joins them."""

    backend: LlamaCppBackend
    asr: WhisperAsr
    tts: PiperTts
    pipeline: VoicePipeline
    tracker: LatencyTracker
    ready_s: float = 0.0

    async def close(self) -> None:
        await self.pipeline.cancel_reply()
        await self.backend.close()
        await asyncio.to_thread(self.tts.close)


async def build_assistant(settings: Settings, *, listen: bool = True) -> Assistant:
    """Load everything (in parallel worker threads) and return the ready assistant.
    ``listen=False`` skips the VAD model (text-only turns)."""
    started = time.monotonic()
    backend = LlamaCppBackend(settings.llm, settings.cache, prefill_system=True)
    asr = WhisperAsr(settings.asr)
    phrase_dir = settings.cache.dir.parent / "phrases" if settings.cache.dir else None
    tts = PiperTts(settings.tts, phrase_dir)
    endpointer = Endpointer(settings.vad) if listen else None
    try:
        await asyncio.gather(backend.start(), asr.start(), tts.start())
    except BaseException:
        await backend.close()
        raise
    tracker = LatencyTracker(spike_threshold_s=settings.latency.spike_threshold_s)
    pipeline = VoicePipeline(backend, asr, tts, settings.pipeline, settings.llm.system_prompt,
                             endpointer=endpointer, tracker=tracker,
                             silence_ms=settings.vad.silence_ms)
    ready = time.monotonic() - started
    log.info("assistant ready in %.2f s", ready)
    return Assistant(backend, asr, tts, pipeline, tracker, ready)
