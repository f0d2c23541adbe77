"""Errors Jarvis raises on purpose, each with a message that names the problem and the fix.

::

    JarvisError                    base: caught by the CLI, printed as one line, exit status 2
    ├── ConfigError                a JARVIS_* setting is invalid (variable, value, what is allowed)
    ├── ModelError                 a model file is missing, unreadable or not usable
    ├── BackendError               the LLM backend failed while serving a request
    │   ├── PromptTooLongError     the prompt does not fit the context window
    │   └── BackendClosedError     the backend was used before start() or after close()
    ├── AudioError                 audio could not be read, written, captured or played
    │   ├── AudioFormatError       a file is corrupt, truncated or in a format we cannot read
    │   └── AudioDeviceError       no sound device, unknown/ambiguous device, PortAudio missing
    ├── AsrError                   speech recognition failed (bad input array, engine error)
    ├── TtsError                   nothing to say (empty text) or synthesis failed
    ├── RequestError               a request no entry point accepts (empty, too long)
    └── MqttError                  the MQTT bridge (its tree is in jarvis/home/schema.py)

The others live beside their code: jarvis/audio/errors.py, jarvis/speech/asr.py
(AsrError), jarvis/speech/errors.py (TtsError), jarvis/voice/turn.py (RequestError),
jarvis/home/schema.py; ``DeviceMapError`` (jarvis/devices/device_map.py) is a
ConfigError.

Foreign exceptions (llama.cpp, onnxruntime, paho-mqtt, OS errors) are caught where they
happen and raised again as one of these with ``raise ... from None``: the foreign
message, shortened (and with any password masked), is part of the one line the user
sees, and no chained traceback follows it. Where an OS error's cause helps in a debug
log (an unreadable ``.env`` file, an unreadable model file) it is kept with
``raise ... from exc``; the user still sees one line.
"""

from __future__ import annotations


class JarvisError(Exception):
    """Base class of every error Jarvis reports to the user."""


class ConfigError(JarvisError):
    """An invalid configuration value."""


class ModelError(JarvisError):
    """A model file that is missing, unreadable or unusable."""


class BackendError(JarvisError):
    """The LLM backend failed while serving a request."""


class PromptTooLongError(BackendError):
    """The prompt does not fit in the model's context window."""


class BackendClosedError(BackendError):
    """The backend was used before ``start()`` or after ``close()``."""
