"""Real peers for the satellite tests: the upstream ``wyoming-satellite`` in a virtualenv
of its own, started as a process, and a small Wyoming client to talk to it.

``wyoming-satellite==1.0.0`` pins ``wyoming==1.4.1``, which conflicts with the
``wyoming 1.10`` Jarvis uses, so it lives in its own virtualenv under
``~/.cache/jarvis/peers/wyoming-satellite-1.0.0/``. The virtualenv is created once and
reused by later test sessions; a marker file written after a successful install says it
is complete, and an ``fcntl`` lock makes two pytest processes that want it at once build
it once. The cache is under the real home, not ``XDG_CACHE_HOME`` (which the test
fixtures point into each test's tmp directory).

Its ``wyoming-satellite`` console script is broken in 1.0.0; ``python -m
wyoming_satellite`` works, so that is how :func:`start_wyoming_satellite` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from wyoming.event import Event

from jarvis.wyoming.protocol import MAX_LINE_BYTES, encode_event, read_event

WYOMING_SATELLITE_VERSION = "1.0.0"
PEERS_DIR = Path.home() / ".cache" / "jarvis" / "peers"
MARKER = ".jarvis-peer-complete"
"""Written (atomically) inside a peer virtualenv once its install succeeded."""
LOCK_TIMEOUT_S = 900.0
"""How long to wait for another process that is building the same virtualenv."""
PIP_TIMEOUT_S = 600.0
LOG_TAIL_LINES = 40


class PeerError(RuntimeError):
    """A peer could not be installed or started; the message says why (pip's or the
    process's last lines of output)."""


# --------------------------------------------------------------------------- venv


def wyoming_satellite_python(root: Path | None = None) -> Path:
    """The Python of a virtualenv holding ``wyoming-satellite==1.0.0`` (and its pinned
    ``wyoming==1.4.1``), created on first use under ``root`` (default
    ``~/.cache/jarvis/peers``) and reused afterwards. :class:`PeerError` with pip's
    output tail when the install fails."""
    venv = (root or PEERS_DIR) / f"wyoming-satellite-{WYOMING_SATELLITE_VERSION}"
    return ensure_venv(venv, [f"wyoming-satellite=={WYOMING_SATELLITE_VERSION}"],
                       check="import wyoming_satellite.satellite")


def ensure_venv(venv: Path, requirements: Sequence[str], *, check: str) -> Path:
    """``venv/bin/python``, once ``venv`` holds ``requirements`` and runs ``check``
    (Python code). A virtualenv without its marker, with a different requirement list,
    or whose interpreter is gone is deleted and built again, under a lock shared with
    other processes."""
    python = venv / "bin" / "python"
    if _is_complete(venv, requirements):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(venv.parent / f"{venv.name}.lock", LOCK_TIMEOUT_S) as lock_fd:
        if not _is_complete(venv, requirements):  # another process may have built it
            _build_venv(venv, requirements, check, lock_fd)
    return python


def _is_complete(venv: Path, requirements: Sequence[str]) -> bool:
    """True if ``venv``'s marker names ``requirements`` and its interpreter exists."""
    try:
        marker = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return False
    python = venv / "bin" / "python"
    return (isinstance(marker, dict) and marker.get("requirements") == list(requirements)
            and python.exists())  # exists() follows the symlink to the base interpreter


@contextlib.contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[int]:
    """An exclusive ``fcntl`` lock on ``path``, waited for up to ``timeout_s``; yields
    the locked descriptor. The kernel drops the lock when every process holding the
    descriptor has exited, so a killed build never blocks the next."""
    deadline = time.monotonic() + timeout_s
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PeerError(f"{path} is still locked after {timeout_s:.0f} s "
                                    "(another process building the same peer?)") from None
                time.sleep(0.2)  # polling a lock another process holds: no event to wait on
        try:
            yield handle.fileno()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_venv(venv: Path, requirements: Sequence[str], check: str, lock_fd: int) -> None:
    """Delete whatever is at ``venv``, create a virtualenv there, pip-install
    ``requirements``, run ``check``, then write the marker. The steps inherit
    ``lock_fd``, so a pip left running by a killed test still holds the lock."""
    shutil.rmtree(venv, ignore_errors=True)
    _run_step([sys.executable, "-m", "venv", str(venv)], f"creating the virtualenv {venv}",
              lock_fd)
    python = venv / "bin" / "python"
    _run_step([str(python), "-m", "pip", "install", "--disable-pip-version-check",
               "--no-input", *requirements], f"pip install {' '.join(requirements)}", lock_fd)
    _run_step([str(python), "-c", check], f"checking the install ({check})", lock_fd)
    marker = {"requirements": list(requirements), "python": sys.version.split()[0],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = venv / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker) + "\n")
    tmp.replace(venv / MARKER)


def _run_step(argv: list[str], what: str, keep_fd: int | None = None) -> None:
    """Run ``argv`` (passing it ``keep_fd``); :class:`PeerError` with the tail of its
    output if it fails."""
    try:
        done = subprocess.run(argv, env=peer_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=PIP_TIMEOUT_S,
                              check=False, pass_fds=() if keep_fd is None else (keep_fd,))
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else ""
        raise PeerError(f"{what}: timed out after {PIP_TIMEOUT_S:.0f} s; last output:\n"
                        f"{_tail(output)}") from None
    if done.returncode != 0:
        raise PeerError(f"{what}: failed (exit {done.returncode}); last output:\n"
                        f"{_tail(done.stdout)}")


def peer_env() -> dict[str, str]:
    """The environment for a peer's processes: ours without anything that would make
    its interpreter load our virtualenv's packages."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------- process


class SatelliteProcess(subprocess.Popen[bytes]):
    """A running ``wyoming_satellite``: a :class:`subprocess.Popen` that also knows its
    ``port``, ``name`` and ``log_path`` (its stdout and stderr)."""

    port: int
    name: str
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the satellite's log."""
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError as exc:
            return f"(no log: {exc})"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_wyoming_satellite(python: Path, *, port: int, mic_command: list[str],
                            snd_command: list[str], name: str,
                            extra_args: Sequence[str] = (), log_path: Path | None = None,
                            debug: bool = True) -> SatelliteProcess:
    """Start ``python -m wyoming_satellite`` serving on ``tcp://127.0.0.1:port`` with
    ``mic_command`` and ``snd_command`` (argv lists, quoted with :func:`shlex.join`),
    ``--name name``, ``--no-zeroconf``, ``--debug`` unless ``debug`` is False, then
    ``extra_args`` (e.g. ``--mic-command-rate 48000 --mic-command-channels 2``).

    Output goes to ``log_path`` (default: a new file in the temp directory). The process
    leads its own session, so :func:`stop_process` also ends the mic and snd commands.
    It does not wait for the port: see :func:`wait_until_listening`."""
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"wyoming-satellite-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(tmp)
    argv = [str(python), "-m", "wyoming_satellite", "--uri", f"tcp://127.0.0.1:{port}",
            "--name", name, "--mic-command", shlex.join(mic_command),
            "--snd-command", shlex.join(snd_command), "--no-zeroconf",
            *(["--debug"] if debug else []), *extra_args]
    with log_path.open("ab") as log:
        proc = SatelliteProcess(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=peer_env(),
                                start_new_session=True)
    proc.port, proc.name, proc.log_path = port, name, log_path
    return proc


def wait_until_listening(proc: SatelliteProcess, timeout_s: float = 20.0) -> None:
    """Return once ``proc``'s port accepts a TCP connection. :class:`PeerError` with
    the log tail if the process exits first or ``timeout_s`` passes."""
    wait_for_port(proc.port, timeout_s=timeout_s, proc=proc, log_path=proc.log_path)


def wait_for_port(port: int, *, timeout_s: float = 20.0,
                  proc: subprocess.Popen[bytes] | None = None,
                  log_path: Path | None = None, host: str = "127.0.0.1") -> None:
    """Poll-connect to ``host:port`` until it accepts, ``proc`` exits, or the deadline;
    the errors quote the tail of ``log_path``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(f"process exited with {proc.returncode} before listening on "
                            f"{port}; log:\n{_log_tail(log_path)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PeerError(f"nothing listening on {host}:{port} after {timeout_s:.0f} s; "
                            f"log:\n{_log_tail(log_path)}")
        time.sleep(0.05)  # poll interval of a port another process opens


def _log_tail(log_path: Path | None) -> str:
    if log_path is None:
        return "(no log)"
    try:
        return _tail(log_path.read_text(errors="replace"))
    except OSError as exc:
        return f"(no log: {exc})"


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
    """SIGTERM ``proc``'s process group (it was started with its own session), then
    SIGKILL if it has not exited within ``timeout_s``; its exit status."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout_s)
    else:  # the leader is gone; its mic/snd children may not be
        _signal_group(proc, signal.SIGTERM)
    return int(proc.returncode)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@contextlib.contextmanager
def running_wyoming_satellite(python: Path, *, mic_command: list[str],
                              snd_command: list[str], name: str,
                              extra_args: Sequence[str] = (), log_path: Path | None = None,
                              port: int | None = None,
                              timeout_s: float = 20.0) -> Iterator[SatelliteProcess]:
    """:func:`start_wyoming_satellite` on ``port`` (default: a free one), wait until it
    listens, yield it, stop it (and its mic/snd commands) on the way out."""
    proc = start_wyoming_satellite(python, port=port or free_port(), mic_command=mic_command,
                                   snd_command=snd_command, name=name, extra_args=extra_args,
                                   log_path=log_path)
    try:
        wait_until_listening(proc, timeout_s)
        yield proc
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- client


class WyomingClient:
    """A minimal Wyoming TCP client on asyncio streams and Jarvis's strict protocol
    helpers (a hub's view of a satellite): ``async with WyomingClient(port) as c``."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the connection."""
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        """Close the connection (quietly if the peer already has)."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None

    async def __aenter__(self) -> WyomingClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def send(self, event: Event) -> None:
        """Write ``event`` and wait for the socket buffer to drain."""
        assert self._writer is not None, "not connected"
        self._writer.write(encode_event(event))
        await self._writer.drain()

    async def read(self, timeout_s: float = 5.0) -> Event | None:
        """The next event; None at a clean end of the connection; TimeoutError after
        ``timeout_s``."""
        assert self._reader is not None, "not connected"
        return await asyncio.wait_for(read_event(self._reader), timeout_s)

    async def read_until(self, event_type: str, timeout_s: float = 5.0) -> list[Event]:
        """Events up to and including the first of ``event_type`` (within
        ``timeout_s`` in all). :class:`EOFError` if the connection ends first."""
        deadline = time.monotonic() + timeout_s
        seen: list[Event] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event_type!r} within {timeout_s} s; got "
                                   f"{[e.type for e in seen][-20:]}")
            event = await self.read(left)
            if event is None:
                raise EOFError(f"connection closed before {event_type!r}; got "
                               f"{[e.type for e in seen][-20:]}")
            seen.append(event)
            if event.type == event_type:
                return seen
