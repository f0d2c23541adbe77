"""What the server advertises in ``info`` (the answer to ``describe``).

Home Assistant creates one entity per advertised service: speech to text (``asr``),
text to speech (``tts``) and a conversation agent (``handle``), named after the
program (``Jarvis``). Everything advertised is loaded before the server listens, so
``installed`` is always true and ``info`` is built once.
"""

from __future__ import annotations

import json
from pathlib import Path

from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)

from jarvis import __version__
from jarvis.speech.asr import WhisperAsr
from jarvis.speech.tts import PiperTts

PROGRAM = "Jarvis"
"""The name of every program this server offers (``select-program`` accepts it)."""
_JARVIS = Attribution(name="Jarvis", url="")
_WHISPER = Attribution(name="faster-whisper (SYSTRAN)",
                       url="https://github.com/SYSTRAN/faster-whisper")
_PIPER = Attribution(name="Piper (Open Home Foundation)", url="https://github.com/OHF-Voice/piper1-gpl")
_LLAMA = Attribution(name="llama.cpp", url="https://github.com/ggml-org/llama.cpp")


def build_info(*, asr: WhisperAsr | None, tts: PiperTts | None, model: str,
               home_control: bool) -> Info:
    """``info`` for the loaded engines; ``model`` names the LLM, ``home_control`` says
    whether a device map is loaded (the agent may switch devices)."""
    info = Info()
    if asr is not None:
        language = asr.settings.language or "en"
        info.asr.append(AsrProgram(
            name=PROGRAM, attribution=_JARVIS, installed=True, version=__version__,
            description="Jarvis speech to text (faster-whisper, encoder on the real length)",
            models=[AsrModel(name=_asr_name(asr), attribution=_WHISPER, installed=True,
                             description=f"faster-whisper {asr.model_label}", version=None,
                             languages=[language])],
            supports_transcript_streaming=True))
    if tts is not None:
        voice = tts.voice_path
        info.tts.append(TtsProgram(
            name=PROGRAM, attribution=_JARVIS, installed=True, version=__version__,
            description="Jarvis text to speech (piper, streamed clause by clause)",
            voices=[TtsVoice(name=_voice_name(voice), attribution=_PIPER, installed=True,
                             description=f"piper {_voice_name(voice)}", version=None,
                             languages=[_voice_language(voice)])],
            supports_synthesize_streaming=True))
    info.handle.append(HandleProgram(
        name=PROGRAM, attribution=_JARVIS, installed=True, version=__version__,
        description="Jarvis conversation agent (device map, then the local model)",
        models=[HandleModel(name=model, attribution=_LLAMA, installed=True,
                            description=f"Jarvis with {model}", version=None,
                            languages=["en"])],
        supports_handled_streaming=True, supports_home_control=home_control))
    return info


def _asr_name(asr: WhisperAsr) -> str:
    path = asr.model_path
    label = asr.model_label
    return "tiny.en" if label == "bundled tiny.en" or path is None else path.name


def _voice_name(voice: Path | None) -> str:
    if voice is None:
        return "piper"
    return voice.name.removesuffix(".onnx")


def _voice_language(voice: Path | None) -> str:
    """The voice's language code from its ``.onnx.json`` (``en_US``), else ``en``."""
    if voice is None:
        return "en"
    try:
        config = json.loads(Path(f"{voice}.json").read_text(encoding="utf-8"))
        code = config.get("language", {}).get("code")
    except (OSError, ValueError, AttributeError):
        return "en"
    return code if isinstance(code, str) and code else "en"
