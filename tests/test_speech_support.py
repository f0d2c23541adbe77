"""Checks of the speech test helpers themselves (tests/support/speech.py and the speech
fixtures in conftest.py): the headless ALSA devices, the command list, the synthesised
speech."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from jarvis.audio import ASR_RATE, FloatArray
from tests.support.speech import COMMANDS, run_with_home, write_asoundrc


def test_alsa_file_devices_are_what_portaudio_sees(tmp_path: Path) -> None:
    mic = tmp_path / "mic.raw"
    mic.write_bytes(b"")
    write_asoundrc(tmp_path, mic)
    result = run_with_home(tmp_path, """
        import json, sounddevice as sd
        print(json.dumps([d["name"] for d in sd.query_devices()]))
    """)
    assert result.returncode == 0, result.stderr
    names = json.loads(result.stdout)
    assert {"default", "jmic", "jspeaker", "jspeaker48"} <= set(names)


def test_commands_file_has_twenty_plus_commands_without_digits() -> None:
    assert len(COMMANDS) >= 20
    assert not any(ch.isdigit() for c in COMMANDS for ch in c)


@pytest.mark.parametrize("text", ["Hello there."])
def test_spoken_is_16k_speech(spoken: Callable[[str], FloatArray], text: str) -> None:
    audio = spoken(text)
    assert audio.dtype == np.float32
    assert 0.3 < len(audio) / ASR_RATE < 3.0
    assert np.abs(audio).max() > 0.1
    assert spoken(text) is audio  # synthesised once per session
    assert not audio.flags.writeable  # shared between tests: nobody may change it
