"""llama.cpp's own HTTP server from the prebuilt ``xllamacpp`` wheel (``pip install
xllamacpp``, no compiling), for the tests and benchmarks of the remote backend, and
for trying "a bigger model on another machine" without building ``llama-server``::

    python -m jarvis.llm.remote_server MODEL.gguf [--host 0.0.0.0] [--port 8080]
        [--slots 4] [--ctx-per-slot 4096] [--threads N] [--slot-save-path DIR]

It prints one JSON line, ``{"url": ...}``, once the model is loaded and the server
answers, and runs until SIGTERM or SIGINT. :class:`LlamaServer` runs it as a child
process (stopping or killing that process is how the tests take the server away).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any


def serve(model: Path, *, host: str = "127.0.0.1", port: int = 0, slots: int = 1,
          ctx_per_slot: int = 4096, threads: int = 0, slot_save_path: Path | None = None,
          api_key: str = "", poll: int = 50, cache_ram_mib: int | None = None) -> None:
    """Run the server in this process until SIGTERM/SIGINT."""
    xllamacpp: Any = importlib.import_module("xllamacpp")  # a dev dependency, no stubs
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.hostnames = [host]
    params.port = port
    params.n_parallel = slots
    params.n_ctx = ctx_per_slot * slots
    if threads > 0:
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
    params.cpuparams.poll = params.cpuparams_batch.poll = poll
    if cache_ram_mib is not None:  # llama.cpp's host-memory prompt cache: 0 = off
        params.cache_ram_mib = cache_ram_mib
        params.cache_idle_slots = cache_ram_mib != 0
    if slot_save_path is not None:
        slot_save_path.mkdir(parents=True, exist_ok=True)
        params.slot_save_path = f"{slot_save_path.resolve()}/"  # it needs the trailing /
    if api_key:
        params.api_keys = [api_key]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xllamacpp.Server(params)
    url = str(server.listening_address)
    _wait_healthy(url, api_key)
    print(json.dumps({"url": url}), flush=True)
    stop.wait()
    os._exit(0)  # the server's threads need no orderly teardown


def _wait_healthy(url: str, api_key: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(f"{url}/health", headers={
        "Authorization": f"Bearer {api_key}"} if api_key else {})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


class LlamaServer:
    """The server in a child process: ``start()`` returns its URL once it answers."""

    def __init__(self, model: Path, *, port: int = 0, slots: int = 1,
                 ctx_per_slot: int = 4096, threads: int = 0,
                 slot_save_path: Path | None = None, host: str = "127.0.0.1",
                 api_key: str = "", log_file: Path | None = None, poll: int = 50,
                 cache_ram_mib: int | None = None) -> None:
        self.model = model
        self.port = port
        self.args = ["--host", host, "--slots", str(slots), "--ctx-per-slot",
                     str(ctx_per_slot), "--threads", str(threads), "--poll", str(poll)]
        if cache_ram_mib is not None:
            self.args += ["--cache-ram", str(cache_ram_mib)]
        if slot_save_path is not None:
            self.args += ["--slot-save-path", str(slot_save_path)]
        if api_key:
            self.args += ["--api-key", api_key]
        self.log_file = log_file
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout_s: float = 180.0) -> str:
        """Start it (on the port it had before, after a stop) and wait until it answers."""
        log: IO[Any] | int = (self.log_file.open("a") if self.log_file is not None
                              else subprocess.DEVNULL)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jarvis.llm.remote_server", str(self.model),
             "--port", str(self.port), *self.args],
            stdout=subprocess.PIPE, stderr=log, text=True)
        if not isinstance(log, int):
            log.close()
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(
            self.process.stdout.readline() if self.process and self.process.stdout else ""),
            daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or not line[0].strip():
            self.stop(kill=True)
            raise RuntimeError(f"the llama.cpp server did not start within {timeout_s:g} s"
                               + (f"; see {self.log_file}" if self.log_file else ""))
        self.url = str(json.loads(line[0])["url"])
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """SIGTERM (or SIGKILL: the server vanishes mid-work), and wait for the exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
        if process.stdout is not None:
            process.stdout.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="llama.cpp's server from the xllamacpp wheel")
    p.add_argument("model", type=Path, help="GGUF file")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--slots", type=int, default=1, help="parallel slots (conversations)")
    p.add_argument("--ctx-per-slot", type=int, default=4096, help="context per slot")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = llama.cpp's")
    p.add_argument("--slot-save-path", type=Path, default=None,
                   help="where slot states are saved (lets Jarvis restore its system prompt)")
    p.add_argument("--api-key", default="", help="require this bearer token")
    p.add_argument("--poll", type=int, default=50,
                   help="0-100: how much idle threads spin waiting for work (llama.cpp's "
                        "default 50); 0 on a machine whose cores are shared")
    p.add_argument("--cache-ram", type=int, default=None,
                   help="MiB for llama.cpp's host-memory prompt cache (default: llama.cpp's; "
                        "-1 = no limit; 0 = off: with a slot per conversation it only "
                        "copies idle slots)")
    args = p.parse_args(argv)
    serve(args.model, host=args.host, port=args.port, slots=args.slots,
          ctx_per_slot=args.ctx_per_slot, threads=args.threads,
          slot_save_path=args.slot_save_path, api_key=args.api_key, poll=args.poll,
          cache_ram_mib=args.cache_ram)
    return 0


if __name__ == "__main__":
    sys.exit(main())
