"""Errors of the audio layer.

::

    JarvisError
    └── AudioError              audio could not be read, written, captured or played
        ├── AudioFormatError    a file is corrupt, truncated or in a format we cannot read
        └── AudioDeviceError    no sound device, an unknown device name, PortAudio missing
"""

from __future__ import annotations

from jarvis.errors import JarvisError


class AudioError(JarvisError):
    """Audio could not be read, written, captured or played."""


class AudioFormatError(AudioError):
    """A file that is corrupt, truncated, or in a format Jarvis cannot read."""


class AudioDeviceError(AudioError):
    """A sound device that is missing, unknown, ambiguous or cannot be opened."""
