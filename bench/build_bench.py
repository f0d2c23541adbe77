#!/usr/bin/env python3
"""Build benchmark: cold prompt evaluation of the household system prompt with one or
more llama-cpp-python builds and with llama.cpp's own server (the prebuilt
``xllamacpp`` wheel), in one run, so their ratios mean something on a shared machine.

The prompt is the bundled ~1,139-token household system prompt, rendered with the
starter model's chat template and tokenized once. Every measurement evaluates all of
it from an empty context:

* a llama-cpp-python build: ``llama_cpp.Llama(model, n_ctx, n_threads, n_batch)`` and
  ``llm.eval(tokens)`` after ``llm.reset()`` (wall time of the call);
* the server: ``POST /completion`` with the token ids, ``cache_prompt: false`` and its
  host-memory prompt cache off, timed by the server itself (``timings.prompt_ms``);
  every answer is checked to have evaluated every token (nothing reused).

Each build runs in a worker process started with *that build's* interpreter
(``--python``; the worker imports nothing but ``llama_cpp`` and the standard library,
so any venv with llama-cpp-python will do). All workers load the model first, then
the rounds interleave them (one evaluation each per round, after one discarded
warm-up), so a burst of load from elsewhere hits all of them alike. A measurement
counts only if other processes took at most ``--max-contention`` (10 %) of the CPUs
meanwhile (read from /proc/stat; each round prints the share), and rounds go on until
every row has ``--repeats`` such measurements (or ``--max-rounds``). Reported: the
median tokens/s of each row, and its ratio to the first ``--python`` (the baseline)
and to the server.

    .venv/bin/python bench/build_bench.py [--python [LABEL=]PYTHON ...] [--threads 2]
        [--batch 512] [--ctx 4096] [--repeats 5] [--flash-attn off|on|auto ...]
        [--max-contention 0.1] [--no-server] [--json FILE]
    /tmp/other-venv/bin/python bench/build_bench.py      # that venv's build vs server

The driver needs ``jarvis`` (the prompt, the starter model) and ``xllamacpp`` (the
server row). ``--python`` defaults to the running interpreter; started with one that
lacks them (another venv's), the script reruns itself with the project's ``.venv`` and
measures that interpreter's build. ``--flash-attn`` may be given more than once
(``--flash-attn off --flash-attn on``): every row is measured with each (the server's
own default is ``auto``, which is on for the CPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

FLASH = {"off": 0, "on": 1, "auto": -1}
"""``--flash-attn`` values: llama.cpp's ``llama_flash_attn_type``."""


# ------------------------------------------------------------------------------ workers
# Each runs in its own process: one JSON line in (the job), "ready" out; then one line
# per measurement ("run" in, {"seconds"|"prompt_n"...} out) until EOF.


def _send(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def worker_llama() -> int:
    """A llama-cpp-python build (this interpreter's ``llama_cpp``)."""
    job = json.loads(sys.stdin.readline())
    import llama_cpp

    kwargs: dict[str, Any] = dict(n_ctx=job["ctx"], n_threads=job["threads"],
                                  n_threads_batch=job["threads"], n_batch=job["batch"],
                                  n_ubatch=job["batch"], verbose=False)
    # llama-cpp-python's Llama offers on/off only; 'auto' is on for the CPU backend.
    kwargs["flash_attn"] = job["flash"] != FLASH["off"]
    llm: Any = llama_cpp.Llama(job["model"], **kwargs)
    tokens: list[int] = job["tokens"]
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    lib = Path(llama_cpp.__file__).parent / "lib"
    _send(sys.stdout, {"ready": True, "version": llama_cpp.__version__, "system_info": info,
                       "lib": str(lib), "python": sys.executable})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        seconds = time.perf_counter() - t0
        _send(sys.stdout, {"seconds": seconds, "prompt_n": len(tokens)})
    llm.close()
    return 0


def worker_server() -> int:
    """llama.cpp's server from the ``xllamacpp`` wheel, on 127.0.0.1, any free port."""
    job = json.loads(sys.stdin.readline())
    xllamacpp: Any = importlib.import_module("xllamacpp")  # a dev dependency, no stubs

    params: Any = xllamacpp.CommonParams()
    params.model.path = job["model"]
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.n_parallel = 1
    params.n_ctx = job["ctx"]
    params.n_batch = job["batch"]
    params.n_ubatch = job["batch"]
    params.cpuparams.n_threads = job["threads"]
    params.cpuparams_batch.n_threads = job["threads"]
    params.flash_attn_type = job["flash"]
    params.cache_ram_mib = 0  # no host-memory prompt cache: nothing may be reused
    params.cache_idle_slots = False
    params.cache_prompt = False
    server: Any = xllamacpp.Server(params)
    url = str(server.listening_address)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)
    _send(sys.stdout, {"ready": True, "version": getattr(xllamacpp, "__version__", "?"),
                       "system_info": "", "url": url, "python": sys.executable})
    body = json.dumps({"prompt": job["tokens"], "n_predict": 1, "cache_prompt": False,
                       "temperature": 0}).encode()
    for line in sys.stdin:
        if line.strip() != "run":
            break
        request = urllib.request.Request(f"{url}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as answer:
            timings = json.loads(answer.read())["timings"]
        _send(sys.stdout, {"seconds": timings["prompt_ms"] / 1000,
                           "prompt_n": timings["prompt_n"]})
    os._exit(0)  # the server's threads need no orderly teardown


# ------------------------------------------------------------------------------- driver


def _cpu_busy_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat (Linux only).
    Busy includes steal: time the hypervisor gave to someone else is contention too."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def _process_ticks(pid: int) -> int | None:
    """User + system clock ticks used by process ``pid`` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


class Contention:
    """The share of the machine's CPU time that went to anything but one process while
    it was measured: 0 on a quiet machine; 0.3 means other work took 30 % of all cores
    (then a 2-thread evaluation on 2 cores waits for its threads, often badly)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = (_cpu_busy_ticks(), _process_ticks(pid))

    def share(self) -> float | None:
        (cpu0, own0), cpu1, own1 = self.start, _cpu_busy_ticks(), _process_ticks(self.pid)
        if cpu0 is None or cpu1 is None or own0 is None or own1 is None:
            return None
        total = cpu1[1] - cpu0[1]
        if total <= 0:
            return None
        return max(0.0, (cpu1[0] - cpu0[0]) - (own1 - own0)) / total


@dataclass
class Candidate:
    """One row: a worker process and what it measured."""

    label: str
    kind: str  # "llama" or "server"
    python: str
    flash: str
    process: subprocess.Popen[str] | None = None
    log: Any = None
    """The worker's stderr (llama.cpp's and the server's chatter), shown if it fails."""
    ready: dict[str, Any] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    """Clean measurements: other work took at most ``--max-contention`` of the CPUs."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """Every measurement, clean or not: seconds and contention."""

    def start(self, job: dict[str, Any]) -> None:
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [self.python, os.path.abspath(__file__), "--worker", self.kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.process.stdin is not None
        _send(self.process.stdin, dict(job, flash=FLASH[self.flash]))
        self.ready = self._read()

    def run(self, tokens: int) -> tuple[float, float | None]:
        """Seconds to evaluate the prompt once, and the contention meanwhile."""
        assert self.process is not None and self.process.stdin is not None
        contention = Contention(self.process.pid)
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        answer = self._read()
        share = contention.share()
        if answer["prompt_n"] != tokens:
            raise RuntimeError(f"{self.label}: evaluated {answer['prompt_n']} of {tokens} "
                               "tokens (a cache was reused?)")
        return float(answer["seconds"]), share

    def _read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            tail = ""
            if self.log is not None:
                self.log.seek(0)
                tail = "".join(self.log.readlines()[-20:])
            raise RuntimeError(f"{self.label} ({self.python}): worker exited with {code}\n"
                               f"{tail}")
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        if self.log is not None:
            self.log.close()

    def counted(self) -> list[float]:
        """The clean measurements, or all of them when none was clean."""
        return self.seconds or [r["seconds"] for r in self.rounds]

    def tok_s(self, tokens: int) -> float:
        return tokens / statistics.median(self.counted())


def prompt_tokens(model: Path) -> list[int]:
    """The household system prompt in the model's chat template, as token ids."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from jarvis.evaluation.dialogues import home_system_prompt

    llm: Any = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                              eos_token="<|im_end|>", bos_token="<|im_start|>")
    prompt = fmt(messages=[{"role": "system", "content": home_system_prompt()}]).prompt
    tokens: list[int] = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.close()
    return tokens


def parse_python(spec: str) -> tuple[str, str]:
    label, sep, python = spec.partition("=")
    if not sep:
        python = spec
        label = str(Path(spec).parent.parent) if Path(spec).parent.name == "bin" else spec
    return label, python


def _run_in_project_venv(args: argparse.Namespace) -> None:
    """Started with another venv's interpreter (a build to measure, without ``jarvis`` or
    ``xllamacpp``)? Then run as the project's ``.venv`` would, measuring this one."""
    import importlib.util

    needed = ["jarvis", "llama_cpp"] + ([] if args.no_server else ["xllamacpp"])
    if all(importlib.util.find_spec(name) for name in needed):
        return
    venv = Path(__file__).resolve().parent.parent / ".venv"
    project = venv / "bin" / "python"
    if not project.exists() or Path(sys.prefix).resolve() == venv.resolve():
        missing = [name for name in needed if not importlib.util.find_spec(name)]
        sys.exit(f"build_bench: {', '.join(missing)} not importable here and no project "
                 f".venv at {project} (bash scripts/setup.sh)")
    argv = sys.argv[1:] if args.python else ["--python", sys.executable, *sys.argv[1:]]
    print(f"build_bench: measuring {sys.executable} from {project}", flush=True)
    os.execv(str(project), [str(project), os.path.abspath(__file__), *argv])


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--python", action="append", default=[], metavar="[LABEL=]PYTHON",
                   help="an interpreter whose llama_cpp to measure (repeatable; the first "
                        "is the baseline; default: this one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=512, help="n_batch (and n_ubatch)")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5,
                   help="clean measurements of each row wanted (after a warm-up)")
    p.add_argument("--max-contention", type=float, default=0.10,
                   help="a measurement counts only if other processes took at most this "
                        "share of all CPUs meanwhile (default 0.10; 1 = count all)")
    p.add_argument("--max-rounds", type=int, default=0,
                   help="give up after this many rounds (default: 4 x --repeats)")
    p.add_argument("--flash-attn", action="append", choices=sorted(FLASH), default=[],
                   help="flash attention for every row (repeatable; default: off)")
    p.add_argument("--no-server", action="store_true", help="skip the xllamacpp row")
    p.add_argument("--model", type=Path, default=None, help="default: the starter model")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--worker", choices=["llama", "server"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "llama":
        return worker_llama()
    if args.worker == "server":
        return worker_server()
    _run_in_project_venv(args)
    args.max_rounds = args.max_rounds or 4 * args.repeats

    from jarvis.models import starter_llm_path

    model = args.model or starter_llm_path()
    if model is None:
        p.error("no starter model installed (bash scripts/setup.sh) and no --model")
    tokens = prompt_tokens(model)
    job = {"model": str(model), "tokens": tokens, "ctx": args.ctx, "threads": args.threads,
           "batch": args.batch}
    flashes = args.flash_attn or ["off"]
    candidates: list[Candidate] = []
    for flash in flashes:
        suffix = f" fa={flash}" if len(flashes) > 1 else ""
        for spec in args.python or [sys.executable]:
            label, python = parse_python(spec)
            candidates.append(Candidate(label + suffix, "llama", python, flash))
        if not args.no_server:
            candidates.append(Candidate("xllamacpp server" + suffix, "server", sys.executable,
                                        flash))
    print(f"{model.name}: {len(tokens)} prompt tokens, {args.threads} threads, "
          f"n_batch {args.batch}, n_ctx {args.ctx}, {args.repeats} clean measurements each "
          "after a warm-up",
          flush=True)
    try:
        for c in candidates:
            c.start(job)
            print(f"  loaded {c.label}: {c.ready.get('version')} "
                  f"{c.ready.get('system_info', '')}", flush=True)
        rnd = 0
        while rnd <= args.max_rounds and any(len(c.seconds) < args.repeats
                                            for c in candidates):
            for c in candidates:
                if rnd > 0 and len(c.seconds) >= args.repeats:
                    continue
                seconds, share = c.run(len(tokens))
                clean = share is None or share <= args.max_contention
                note = "" if share is None else f", others {share:4.0%}"
                if rnd == 0:
                    note += " (warm-up)"
                else:
                    c.rounds.append({"seconds": seconds, "contention": share})
                    if clean:
                        c.seconds.append(seconds)
                    else:
                        note += " (busy machine: not counted)"
                print(f"  round {rnd} {c.label}: {seconds:.2f} s = "
                      f"{len(tokens) / seconds:.1f} tok/s{note}", flush=True)
            rnd += 1
    finally:
        for c in candidates:
            c.stop()

    rows: list[dict[str, Any]] = []
    width = max(len(c.label) for c in candidates)
    print(f"\ncold prompt evaluation of {len(tokens)} tokens: median of the measurements "
          f"with other work <= {args.max_contention:.0%} of the CPUs")
    print(f"{'build':<{width}}  {'tok/s':>7}  {'n':>2}  {'best s':>6}  {'worst s':>7}  "
          f"{'x base':>6}  {'x server':>8}")
    for flash in flashes:
        group = [c for c in candidates if c.flash == flash]
        base = group[0].tok_s(len(tokens))
        server = next((c.tok_s(len(tokens)) for c in group if c.kind == "server"), None)
        for c in group:
            rate = c.tok_s(len(tokens))
            vs_server = f"{rate / server:8.2f}" if server else f"{'-':>8}"
            counted = c.counted()
            flag = "" if c.seconds else "  (no clean measurement: all counted)"
            print(f"{c.label:<{width}}  {rate:7.1f}  {len(counted):>2}  {min(counted):6.2f}  "
                  f"{max(counted):7.2f}  {rate / base:6.2f}  {vs_server}{flag}")
            rows.append({"label": c.label, "kind": c.kind, "python": c.python,
                         "flash_attn": flash, "version": c.ready.get("version"),
                         "system_info": c.ready.get("system_info"), "tok_s": rate,
                         "clean_seconds": c.seconds, "rounds": c.rounds,
                         "vs_baseline": rate / base,
                         "vs_server": rate / server if server else None})
    if args.json is not None:
        args.json.write_text(json.dumps({
            "model": str(model), "prompt_tokens": len(tokens), "threads": args.threads,
            "n_batch": args.batch, "n_ctx": args.ctx, "repeats": args.repeats,
            "max_contention": args.max_contention,
            "cpu": _cpu_model(), "rows": rows}, indent=2) + "\n")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
