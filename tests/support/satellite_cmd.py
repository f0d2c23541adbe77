"""``jarvis satellite`` as a real process for the tests: its microphone and speaker are
ALSA ``file`` devices (``write_asoundrc``) in a home of its own, its log collected as it
is written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jarvis.audio import ASR_RATE
from tests.support.speech import write_asoundrc

PAD_S = 40.0
"""Silence after the microphone's recording: an ALSA file capture reads garbage past its
end, and no test listens this long."""


class SatelliteProcess:
    """``python -m jarvis satellite`` on a free port, its microphone ``mic`` (int16 at
    16 kHz), its log collected as it is written."""

    def __init__(self, home: Path, mic: np.ndarray, **env: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        padded = np.concatenate([mic.astype(np.int16), np.zeros(int(PAD_S * ASR_RATE),
                                                                np.int16)])
        (home / "mic.raw").write_bytes(padded.astype("<i2").tobytes())
        self.speaker = write_asoundrc(home, home / "mic.raw")["speaker"]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")}
        environ.update({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                        "JARVIS_CACHE_DIR": "", "JARVIS_WAKE_WORD": "off"}, **env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jarvis", "satellite", "--uri", "tcp://127.0.0.1:0",
             "--no-zeroconf", "--name", "kitchen satellite", "--area", "kitchen"],
            env=environ, cwd=home, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read_log, daemon=True).start()
        self.port = int(self.wait_for(r"listening on tcp://127\.0\.0\.1:(\d+)").group(1))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first log line matching ``pattern``, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if (match := re.search(pattern, line)) is not None:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    break
                self._changed.wait(left)
        raise AssertionError(f"no log line matches {pattern!r}:\n{self.log}")

    def count(self, pattern: str) -> int:
        with self._changed:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
