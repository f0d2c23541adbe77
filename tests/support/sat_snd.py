"""A speaker for ``wyoming-satellite --snd-command``: appends the raw audio it reads on
stdin to a file until EOF.

    python sat_snd.py OUT [--marks FILE] [--gap-s 0.5]

Each read is appended to ``OUT`` and flushed, so a test sees the audio as it arrives;
the file is opened in append mode because wyoming-satellite may run the command anew
for each reply (1.0.0 does: it closes stdin after every ``audio-stop``).

``--marks FILE`` appends JSON lines ``{"event": ..., "t": time.monotonic(), ...}``:

* ``first_audio`` (``"bytes"``: the size of that read, ``"offset"``: where it starts
  in ``OUT``): the first non-zero bytes of a reply arrived. A reply begins when the
  process starts and whenever data arrives after ``--gap-s`` without any; leading
  all-zero reads (silence) do not count.
* ``eof`` (``"bytes"``: what this process wrote): stdin closed.

Standalone: stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

READ_BYTES = 1 << 16
SCRIPT = Path(__file__).resolve()


def snd_command(out: Path, *, marks: Path | None = None, gap_s: float = 0.5,
                python: str | None = None) -> list[str]:
    """The argv that runs this script (under ``python``, default this interpreter)."""
    argv = [python or sys.executable, str(SCRIPT), str(out), "--gap-s", str(gap_s)]
    if marks is not None:
        argv += ["--marks", str(marks)]
    return argv


def write_mark(marks: IO[str] | None, event: str, **fields: Any) -> None:
    """Append one JSON line to ``marks`` (nothing without a file)."""
    if marks is None:
        return
    marks.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    marks.flush()


def copy(stdin_fd: int, out: IO[bytes], marks: IO[str] | None, gap_s: float) -> int:
    """Append everything read from ``stdin_fd`` to ``out``, marking the first audio of
    each reply; the bytes copied."""
    copied = 0
    in_reply = False  # False: the next non-zero bytes start a reply
    last_read = time.monotonic()
    while data := os.read(stdin_fd, READ_BYTES):
        now = time.monotonic()
        if now - last_read >= gap_s:
            in_reply = False
        last_read = now
        offset = out.tell()
        out.write(data)
        out.flush()
        copied += len(data)
        if not in_reply and data.count(0) != len(data):
            in_reply = True
            write_mark(marks, "first_audio", bytes=len(data), offset=offset)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--marks", type=Path)
    parser.add_argument("--gap-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    marks = args.marks.open("a") if args.marks is not None else None
    try:
        with args.out.open("ab") as out:
            copied = copy(sys.stdin.fileno(), out, marks, args.gap_s)
        write_mark(marks, "eof", bytes=copied)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
