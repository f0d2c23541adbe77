"""Shared fixtures: settings isolated from the user's environment and cache directory,
the real speech models, a real mosquitto broker, the real starter-model backend.

Helpers that are not fixtures live in ``tests/support/``. The model and broker
fixtures import their modules when first used, so a test that needs none of them
(``pytest tests/test_config.py``) loads none of them.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from jarvis.config import Settings, load_settings

if TYPE_CHECKING:
    from jarvis.audio import FloatArray
    from jarvis.llm.llama_cpp import LlamaCppBackend
    from jarvis.speech.asr import WhisperAsr
    from jarvis.speech.silero import SileroVad
    from jarvis.speech.tts import PiperTts
    from tests.support.mqtt import LoopThread, Mosquitto

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray JARVIS_* variables or .env from the developer's shell; caches in tmp."""
    for name in list(os.environ):
        if name.startswith("JARVIS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.chdir(tmp_path)


def make_settings(tmp_path: Path, **env: str) -> Settings:
    """Settings from defaults plus ``env`` (names without the JARVIS_ prefix)."""
    # Most tests feed requests without a wake word; the wake-word tests set it.
    environ = {"JARVIS_CACHE_DIR": str(tmp_path / "ctx-cache"), "JARVIS_TEMPERATURE": "0",
               "JARVIS_WAKE_WORD": "off"}
    environ.update({f"JARVIS_{k}": v for k, v in env.items()})
    return load_settings(environ)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


# --------------------------------------------------------------------------- speech


@pytest.fixture(scope="session")
def asr() -> WhisperAsr:
    """The bundled faster-whisper model, loaded once per session."""
    from jarvis.speech.asr import WhisperAsr
    from tests.support.speech import default_settings

    model = WhisperAsr(default_settings().asr)
    model.load()
    return model


@pytest.fixture(scope="session")
def tts() -> PiperTts:
    """The bundled piper voice, loaded once per session. No phrase cache (every call
    synthesises); no noise, so the same text always gives the same audio and the tests
    built on it cannot flake."""
    from tests.support.speech import test_voice

    return test_voice()


@pytest.fixture(scope="session")
def silero() -> SileroVad:
    """The Silero VAD model. Stateful: a test calls ``reset()`` before scoring a
    stream (``Endpointer.segment_all`` does)."""
    from jarvis.speech.silero import SileroVad

    return SileroVad()


@pytest.fixture(scope="session")
def jfk_audio() -> FloatArray:
    """tests/data/jfk-16k-mono.wav as 16 kHz float32 samples. Shared: do not modify."""
    from jarvis.audio import read_audio
    from tests.support.speech import JFK

    samples = read_audio(JFK).samples
    samples.flags.writeable = False
    return samples


@pytest.fixture(scope="session")
def spoken(tts: PiperTts) -> Callable[[str], FloatArray]:
    """``spoken(text)``: ``text`` said by the piper voice, at 16 kHz (cached per text for
    the session; the arrays are read-only)."""
    from jarvis.audio import ASR_RATE, resample

    @functools.cache
    def say(text: str) -> FloatArray:
        audio = resample(tts.synthesize(text), tts.sample_rate, ASR_RATE)
        audio.flags.writeable = False
        return audio

    return say


# --------------------------------------------------------------------------- MQTT


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """The session's shared broker (tests that restart a broker start their own)."""
    from tests.support.mqtt import Mosquitto, need_mosquitto

    need_mosquitto()
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop(kill=True)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for a module whose engines are loaded once (module-scoped
    ``assistant`` fixtures run on it)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    """An event loop in a thread for module-scoped async objects. Module-scoped (like
    ``backend``): its threads end with the module, so tests that check for stray
    threads elsewhere in the session do not see them."""
    from tests.support.mqtt import LoopThread

    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def backend(loop_thread: LoopThread,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaCppBackend]:
    """One real starter-model backend per test module, living on ``loop_thread``."""
    from jarvis.llm.llama_cpp import LlamaCppBackend
    from tests.support.mqtt import hub_settings

    settings = hub_settings(tmp_path_factory.mktemp("backend"))
    model = LlamaCppBackend(settings.llm, settings.cache, prefill_system=True)
    loop_thread.run(model.start(), 120)
    yield model
    loop_thread.run(model.close(), 30)
