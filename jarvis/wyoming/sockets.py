"""Small helpers both Wyoming servers use (Jarvis's server and ``jarvis satellite``):
a connection's name for the logs, and a unix socket left behind by an earlier run."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from jarvis.errors import JarvisError


class ListenError(JarvisError):
    """A server cannot listen where it was asked to (address in use, bad socket path)."""


def peer_name(writer: asyncio.StreamWriter) -> str:
    """``host:port`` of the other end, or ``unix-socket``."""
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return "unix-socket"


def remove_stale_socket(path: Path, uri: str) -> None:
    """A socket file left by an earlier run is removed; anything else there is a
    :class:`ListenError` (never delete a file that is not ours)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ListenError(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"cannot listen on {uri}: a file that is not a socket is in the "
                          "way")
    path.unlink()
