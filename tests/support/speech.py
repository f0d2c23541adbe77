"""Speech test helpers: the test data, synthesised-speech helpers, and a headless ALSA
setup that lets the real sounddevice/PortAudio path run against files.

The models themselves are session fixtures in ``tests/conftest.py`` (``asr``, ``tts``,
``silero``, ``spoken``, ``jfk_audio``), so each is loaded once, by whichever test needs
it first, and a test run alone loads only what it uses.

PortAudio reads the ALSA configuration once, when it initialises, so every test that
opens a device runs a short Python script in a subprocess whose ``HOME`` holds an
``.asoundrc`` with ``file`` PCMs: the microphone reads raw samples from a file, the
speaker writes what it plays to another.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from jarvis.audio import ASR_RATE, FloatArray, resample
from jarvis.config import Settings, load_settings
from jarvis.speech.tts import PiperTts

DATA = Path(__file__).resolve().parent.parent / "data"
JFK = DATA / "jfk-16k-mono.wav"
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
)
COMMANDS = [
    line.strip() for line in (DATA / "commands.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def default_settings() -> Settings:
    """Built-in defaults only (no environment, no .env)."""
    return load_settings({"JARVIS_CACHE_DIR": ""})


@functools.cache
def test_voice() -> PiperTts:
    """The bundled piper voice, loaded once per session, without noise: the same text
    always gives the same audio, so the tests built on it cannot flake on a rendering
    that speech recognition happens to mishear."""
    voice = PiperTts(default_settings().tts, deterministic=True)
    voice.load()
    return voice


def say(text: str) -> FloatArray:
    """``text`` said by :func:`test_voice`, at 16 kHz."""
    voice = test_voice()
    return resample(voice.synthesize(text), voice.sample_rate, ASR_RATE)


def silence(seconds: float) -> FloatArray:
    return np.zeros(int(seconds * ASR_RATE), dtype=np.float32)


# --------------------------------------------------------------------------- ALSA


def write_asoundrc(home: Path, mic_raw: Path, *, mic_rate: int = ASR_RATE,
                   speaker_rate: int = 22050) -> dict[str, Path]:
    """An ``.asoundrc`` in ``home`` whose default device reads the microphone from
    ``mic_raw`` (mono S16_LE at ``mic_rate``) and writes playback to raw files.

    PortAudio lists them in this order: ``jmic`` (0), ``jspeaker`` (1, plays into
    speaker.raw at ``speaker_rate``), ``jspeaker48`` (2, speaker48.raw at 48 kHz),
    ``default`` (3: jmic + jspeaker).
    """
    home.mkdir(parents=True, exist_ok=True)
    if not mic_raw.exists():
        mic_raw.write_bytes(b"")  # ALSA cannot open capture on a missing infile
    outputs = {"speaker": home / "speaker.raw", "speaker48": home / "speaker48.raw"}
    (home / ".asoundrc").write_text(textwrap.dedent(f"""
        pcm.!default {{
            type asym
            playback.pcm "jspeaker"
            capture.pcm "jmic"
        }}
        pcm.jmic {{
            type plug
            slave {{
                pcm {{ type file slave.pcm "null" file "/dev/null" infile "{mic_raw}"
                       format "raw" }}
                rate {mic_rate} format S16_LE channels 1
            }}
        }}
        pcm.jspeaker {{
            type plug
            slave {{
                pcm {{ type file slave.pcm "null" file "{outputs['speaker']}" format "raw" }}
                rate {speaker_rate} format S16_LE channels 1
            }}
        }}
        pcm.jspeaker48 {{
            type plug
            slave {{
                pcm {{ type file slave.pcm "null" file "{outputs['speaker48']}" format "raw" }}
                rate 48000 format S16_LE channels 1
            }}
        }}
    """))
    return outputs


def run_with_home(home: Path, script: str, *args: str,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh process whose HOME is ``home``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
    environ.update({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=environ, cwd=home, capture_output=True, text=True, timeout=120, check=False,
    )


def raw_int16(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.int16) if path.exists() else np.zeros(0, np.int16)


def strip_zeros(samples: np.ndarray) -> np.ndarray:
    """Samples without the silence PortAudio/ALSA put before and after playback."""
    nonzero = np.flatnonzero(samples)
    return samples[nonzero[0]:nonzero[-1] + 1] if len(nonzero) else samples[:0]


CLI_SCRIPT = """
import argparse, sys
from jarvis.cli.speech import register
from jarvis.config import load_settings
from jarvis.errors import JarvisError
parser = argparse.ArgumentParser(prog="jarvis")
register(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.handler(args, load_settings()))
except JarvisError as exc:
    print(f"jarvis: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""
"""The speech subcommands run the way ``jarvis.cli.main`` runs them (one line per error, exit 2)."""
