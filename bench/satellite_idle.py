#!/usr/bin/env python3
"""What ``jarvis satellite`` costs when nothing is being said: CPU (% of one core, from
``/proc/PID/stat`` utime + stime) and memory (VmRSS now, VmHWM the peak) of the process,
measured over ``--seconds`` after a short warm-up, in three set-ups:

- **no controller**: the satellite waits for a connection (microphone closed);
- **always streaming** (JARVIS_WAKE_WORD=off): a controller sends ``run-satellite`` and
  reads the 16 kHz stream, as a hub does between requests;
- **wake word** (JARVIS_WAKE_WORD=hey_jarvis): the microWakeWord model listens on the
  microphone; nothing is streamed until it fires (the recording has no wake word).

The devices are ALSA ``file`` PCMs in a temporary HOME (as in the tests): the microphone
reads JFK (tests/data/jfk-16k-mono.wav) over and over, the speaker writes to a file. A
real sound card adds its driver's cost; the satellite's own work is the same.

Each set-up runs in two environments: **full**, this interpreter's (the whole Jarvis
stack installed), and **minimal**, a virtualenv holding only requirements-satellite.txt
(what a Raspberry Pi Zero 2 W gets; tests/test_satellite_install.py builds one under
``~/.cache/jarvis/peers/satellite-minimal-*``, the newest of which is used by default;
``--minimal-venv DIR`` names another, ``--no-minimal`` skips it). Both run this
checkout's code (PYTHONPATH), so only the installed packages differ.

    python bench/satellite_idle.py [--seconds 20] [--minimal-venv DIR | --no-minimal]
                                   [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.event import Event

from jarvis import __version__
from jarvis.audio import ASR_RATE, read_audio, to_int16
from jarvis.wyoming.protocol import MAX_LINE_BYTES, encode_event, read_event

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path.home() / ".cache" / "jarvis" / "peers"
COMPLETE_MARKER = ".jarvis-peer-complete"
"""Written in a test-built virtualenv once its install succeeded (tests/support/peers.py)."""
JFK = ROOT / "tests" / "data" / "jfk-16k-mono.wav"
WARM_UP_S = 3.0
TICKS = os.sysconf("SC_CLK_TCK")
ASOUNDRC = """
pcm.!default {{ type asym playback.pcm "speaker" capture.pcm "mic" }}
pcm.mic {{ type plug slave {{
    pcm {{ type file slave.pcm "null" file "/dev/null" infile "{mic}" format "raw" }}
    rate 16000 format S16_LE channels 1 }} }}
pcm.speaker {{ type plug slave {{
    pcm {{ type file slave.pcm "null" file "{speaker}" format "raw" }}
    rate 22050 format S16_LE channels 1 }} }}
"""
"""The default ALSA device in the bench's HOME: the microphone reads ``mic`` (raw s16le,
16 kHz), the speaker writes ``speaker`` (as tests/support/speech.py write_asoundrc)."""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss, hwm = (int(re.search(rf"{key}:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
                for key in ("VmRSS", "VmHWM"))
    return rss / 1024, hwm / 1024


def newest_minimal_venv() -> Path | None:
    """The most recently built complete ``satellite-minimal-*`` virtualenv, if any."""
    venvs = [p for p in PEERS_DIR.glob("satellite-minimal-*")
             if (p / COMPLETE_MARKER).is_file() and (p / "bin" / "python").exists()]
    return max(venvs, key=lambda p: (p / COMPLETE_MARKER).stat().st_mtime, default=None)


def start(home: Path, seconds: float, wake_word: str,
          python: str) -> tuple[subprocess.Popen[str], int]:
    """The satellite on a free port, its microphone JFK repeated for long enough, run by
    ``python`` on this checkout's code."""
    home.mkdir(parents=True)
    speech = to_int16(read_audio(JFK).samples)
    repeats = int((seconds + WARM_UP_S + 30) * ASR_RATE / len(speech)) + 1
    (home / "mic.raw").write_bytes(np.tile(speech, repeats).astype("<i2").tobytes())
    (home / ".asoundrc").write_text(ASOUNDRC.format(mic=home / "mic.raw",
                                                    speaker=home / "speaker.raw"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")
           and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"HOME": str(home), "JARVIS_CACHE_DIR": "", "JARVIS_WAKE_WORD": wake_word,
                "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen(
        [python, "-m", "jarvis", "satellite", "--uri", "tcp://127.0.0.1:0",
         "--no-zeroconf", "--name", "bench"],
        env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if (match := re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", line)) is not None:
            # The rest of its log is read (and dropped) so that it never blocks on it.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit(f"the satellite did not start (exit {proc.wait()})")


async def measure(pid: int, port: int, seconds: float, controller: bool) -> dict[str, Any]:
    """CPU and memory over ``seconds`` after the warm-up; the audio the controller got."""
    audio = [0]

    async def read(reader: asyncio.StreamReader) -> None:
        while (event := await read_event(reader)) is not None:
            if event.type == "audio-chunk":
                audio[0] += len(event.payload or b"") // 2

    reader_task = None
    writer = None
    if controller:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MAX_LINE_BYTES)
        writer.write(encode_event(Event("run-satellite")))
        reader_task = asyncio.create_task(read(reader))
    await asyncio.sleep(WARM_UP_S)
    cpu0, wall0, audio0 = cpu_s(pid), time.monotonic(), audio[0]
    await asyncio.sleep(seconds)
    cpu1, wall1, audio1 = cpu_s(pid), time.monotonic(), audio[0]
    rss, hwm = memory_mb(pid)
    if writer is not None and reader_task is not None:
        writer.close()
        reader_task.cancel()
    wall = wall1 - wall0
    return {"cpu_percent": round(100 * (cpu1 - cpu0) / wall, 2), "rss_mb": round(rss, 1),
            "hwm_mb": round(hwm, 1), "seconds": round(wall, 1),
            "audio_per_second": round((audio1 - audio0) / ASR_RATE / wall, 3)}


def run(name: str, wake_word: str, controller: bool, seconds: float,
        venv: str, python: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="satellite-bench-") as tmp:
        proc, port = start(Path(tmp) / "home", seconds, wake_word, python)
        try:
            result = asyncio.run(measure(proc.pid, port, seconds, controller))
        finally:
            proc.terminate()
            code = proc.wait(timeout=20)
        return {"setup": name, "venv": venv, "wake_word": wake_word, **result,
                "exit_status": code}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per set-up")
    parser.add_argument("--minimal-venv", type=Path,
                        help="a virtualenv of requirements-satellite.txt to run it in too "
                             f"(default: the newest {PEERS_DIR}/satellite-minimal-*)")
    parser.add_argument("--no-minimal", action="store_true",
                        help="only this interpreter's environment")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    pythons = {"full": sys.executable}
    minimal = None if args.no_minimal else args.minimal_venv or newest_minimal_venv()
    if minimal is not None:
        if not (minimal / "bin" / "python").exists():
            parser.error(f"--minimal-venv {minimal}: no bin/python there")
        pythons["minimal"] = str(minimal / "bin" / "python")
    print(f"Jarvis {__version__} satellite idle bench · {platform.machine()} · "
          f"{os.cpu_count()} CPUs · {args.seconds:g} s per set-up")
    print(f"minimal venv: {minimal}" if minimal is not None else
          "minimal venv: none (tests/test_satellite_install.py builds one)")
    rows = [run(name, wake_word, controller, args.seconds, venv, python)
            for venv, python in pythons.items()
            for name, wake_word, controller in (("no controller", "off", False),
                                                ("always streaming", "off", True),
                                                ("wake word (local)", "hey_jarvis", True))]
    print(f"{'set-up':<20} {'venv':<8} {'CPU % of a core':>16} {'RSS MB':>8} {'peak MB':>8} "
          f"{'audio s/s':>10}")
    for row in rows:
        print(f"{row['setup']:<20} {row['venv']:<8} {row['cpu_percent']:>16.2f} "
              f"{row['rss_mb']:>8.1f} {row['hwm_mb']:>8.1f} {row['audio_per_second']:>10.3f}")
    numbers = {"version": __version__, "machine": platform.machine(),
               "cpus": os.cpu_count(), "minimal_venv": str(minimal) if minimal else None,
               "results": rows}
    print(json.dumps(numbers, indent=2))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
