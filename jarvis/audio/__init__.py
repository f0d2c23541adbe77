"""Audio in and out: formats, resampling, files, sound devices, voice activity detection.

::

    formats.py    float32 mono is the internal format; int16 at the edges
    resample.py   band-limited resampler, one-shot or streaming
    files.py      read WAV/FLAC/... as 16 kHz mono, write WAV, a file as a stream
    devices.py    list devices, choose one by name or index
    stream.py     Microphone (async chunks in), Speaker (async chunks out)
    vad.py        the endpointing state machine (pure: frames in, events out)
    silero.py     Silero VAD scoring and the Endpointer that combines both
    piper_voice.py  a piper voice whose waveform decoder runs in pieces (used by jarvis.tts)

Importing this package loads neither PortAudio nor onnxruntime; they load on first use.
Errors: :class:`AudioError`, :class:`AudioFormatError`, :class:`AudioDeviceError`
(see :mod:`jarvis.audio.errors`).
"""

from __future__ import annotations

from jarvis.audio.devices import DeviceInfo, list_devices, resolve_device
from jarvis.audio.errors import AudioDeviceError, AudioError, AudioFormatError
from jarvis.audio.files import WavSink, file_source, iter_file_chunks, read_audio, write_wav
from jarvis.audio.formats import (
    ASR_RATE,
    Audio,
    FloatArray,
    Int16Array,
    to_float32,
    to_int16,
    to_mono,
)
from jarvis.audio.resample import Resampler, resample
from jarvis.audio.silero import Endpointer, SileroVad
from jarvis.audio.stream import Microphone, Speaker
from jarvis.audio.vad import (
    EndReason,
    FramesDropped,
    PauseDetected,
    Segmenter,
    SegmenterConfig,
    SpeechResumed,
    SpeechStarted,
    UtteranceEnded,
    VadEvent,
)

__all__ = [
    "ASR_RATE",
    "Audio",
    "AudioDeviceError",
    "AudioError",
    "AudioFormatError",
    "DeviceInfo",
    "EndReason",
    "Endpointer",
    "FloatArray",
    "FramesDropped",
    "Int16Array",
    "Microphone",
    "PauseDetected",
    "Resampler",
    "Segmenter",
    "SegmenterConfig",
    "SileroVad",
    "Speaker",
    "SpeechResumed",
    "SpeechStarted",
    "UtteranceEnded",
    "VadEvent",
    "WavSink",
    "file_source",
    "iter_file_chunks",
    "list_devices",
    "read_audio",
    "resample",
    "resolve_device",
    "to_float32",
    "to_int16",
    "to_mono",
    "write_wav",
]
