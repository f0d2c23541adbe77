"""Errors of the speech engines (see the tree in :mod:`jarvis.speech.tts`)."""

from __future__ import annotations

from jarvis.errors import JarvisError


class TtsError(JarvisError):
    """Nothing to say, or synthesis failed."""
