"""What the voice pipeline tells the rest of the world (latency tracker, MQTT bridge,
logs): small frozen events, one type per thing that happened."""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class EventType(str, enum.Enum):
    """The kinds of pipeline event, in the order a turn usually produces them."""

    LISTENING = "listening"
    """Waiting for speech (also after a reply)."""
    SPEECH_STARTED = "speech_started"
    SPEECH_ENDED = "speech_ended"
    """Endpoint: the utterance is complete (``data['duration_s']``)."""
    TRANSCRIPT = "transcript"
    WAKE = "wake"
    """The wake phrase was heard (``text`` is what followed it, maybe empty)."""
    IGNORED = "ignored"
    """A transcript that was not for Jarvis (no wake phrase, or empty)."""
    THINKING = "thinking"
    FIRST_TOKEN = "first_token"
    FIRST_AUDIO = "first_audio"
    """The reply's first sample went to the speaker (``data['voice_to_voice_s']``)."""
    REPLY_DONE = "reply_done"
    """``text`` is what was actually spoken; ``data`` holds the stage latencies."""
    BARGE_IN = "barge_in"
    """The user spoke over the reply; ``data['stop_s']`` is how long stopping took."""
    ERROR = "error"
    """A stage failed (``stage``, ``text`` = message); the loop keeps listening."""


@dataclass(frozen=True)
class PipelineEvent:
    """One thing that happened, stamped with ``time.monotonic()``."""

    type: EventType
    text: str = ""
    stage: str = ""
    """For errors: which stage failed (asr, llm, tts, audio)."""
    data: Mapping[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
