"""Audio in and out, nothing else: formats, resampling, files, sound devices, streams.

::

    formats.py    float32 mono is the internal format; int16 at the edges
    resample.py   band-limited resampler, one-shot or streaming
    files.py      read WAV/FLAC/... as 16 kHz mono, write WAV, a file as a stream
    devices.py    list devices, choose one by name or index
    stream.py     Microphone (async chunks in), Speaker (async chunks out)
    paced.py      a microphone read never faster than real time (the satellite's)
    echo.py       echo cancellation: the speaker's reference, AEC3, the echo delay

Importing this package does not load PortAudio; it loads on first use. Voice activity
detection lives in :mod:`jarvis.speech`. This package imports nothing else of Jarvis
but :mod:`jarvis.errors`.
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
from jarvis.audio.stream import Microphone, Speaker

__all__ = [
    "ASR_RATE",
    "Audio",
    "AudioDeviceError",
    "AudioError",
    "AudioFormatError",
    "DeviceInfo",
    "FloatArray",
    "Int16Array",
    "Microphone",
    "Resampler",
    "Speaker",
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
