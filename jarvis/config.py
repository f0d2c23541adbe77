"""One validated settings object, read once at start-up from ``JARVIS_*`` variables.

Sources, later ones winning: built-in defaults, an optional ``.env`` file (the file
named by ``JARVIS_ENV_FILE``, else ``./.env``), the process environment.

Every variable is declared once in :data:`VARIABLES`; that table drives parsing,
validation, ``jarvis config`` and the check that ``env.example`` documents them all.
A bad value raises :class:`ConfigError` with one line naming the variable, the value
and what is allowed. Each component receives only its own section
(:class:`LlmSettings`, :class:`CacheSettings`, ...), never the whole object.
"""

from __future__ import annotations

import os
import platform
import re
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jarvis.errors import ConfigError, JarvisError
from jarvis.models import check_gguf, default_llm_path, starter_llm_path

KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

DEFAULT_SYSTEM_PROMPT = (
    "You are Jarvis, a friendly voice assistant running offline in the user's home. "
    "Your replies are spoken aloud, so answer in one or two short sentences of plain "
    "text: no lists, no markdown, no emoji. If you do not know, say so briefly."
)


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share the same FP units, so llama.cpp gains
    nothing from them). Falls back to the logical count."""
    logical = os.cpu_count() or 1
    system = platform.system()
    try:
        if system == "Linux":
            cores: set[tuple[str, str]] = set()
            phys = core = ""
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    key, value = key.strip(), value.strip()
                    if key == "physical id":
                        phys = value
                    elif key == "core id":
                        core = value
                    elif not key and core:
                        cores.add((phys, core))
                        phys = core = ""
            if core:
                cores.add((phys, core))
            if cores:
                return max(1, min(len(cores), logical))
        elif system == "Darwin":
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"],
                capture_output=True, text=True, timeout=2, check=False,
            ).stdout.strip() or subprocess.run(
                ["sysctl", "-n", "hw.physicalcpu"],
                capture_output=True, text=True, timeout=2, check=False,
            ).stdout.strip()
            if out.isdigit():
                return max(1, int(out))
    except (OSError, subprocess.SubprocessError):
        pass
    return logical


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jarvis/contexts``, else ``~/.cache/jarvis/contexts``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG specification says: it would
    put the cache in whatever directory Jarvis happens to start in.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = str(Path.home() / ".cache")
    return Path(base) / "jarvis" / "contexts"


# --------------------------------------------------------------------------- parsers
# Each parser takes the raw string and returns the value or raises ValueError whose
# text says what is allowed; load_settings turns that into a ConfigError line.


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(_range_text("a whole number", minimum, maximum)) from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(_range_text("a whole number", minimum, maximum))
        return value

    return parse


def _float(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(_range_text("a number", minimum, maximum)) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(_range_text("a finite number", minimum, maximum))
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(_range_text("a number", minimum, maximum))
        return value

    return parse


def _range_text(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"expected {kind} from {minimum} to {maximum}"
    if minimum is not None:
        return f"expected {kind} >= {minimum}"
    if maximum is not None:
        return f"expected {kind} <= {maximum}"
    return f"expected {kind}"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected true or false (also 1/0, yes/no, on/off)")


def _choice(*allowed: str, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value

    return parse


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


MAX_SIZE = 1 << 60
"""The largest byte size a setting accepts (1 EiB): far above any machine, far below
where arithmetic on it could overflow."""


def parse_size(raw: str) -> int:
    """Parse a byte size such as ``1073741824``, ``512MB`` or ``2GiB`` (exactly, with no
    float rounding, so a 400-digit number is a clear "too large", not an overflow)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", raw)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError("expected a size in bytes, e.g. 1073741824, 512MB or 2GiB")
    number = match.group(1)
    if len(number.partition(".")[0].lstrip("0")) > 24:  # over 10**24 bytes in any unit
        raise ValueError("expected a size of at most 1 EiB")
    try:
        value = int(Decimal(number) * _SIZE_UNITS[unit])
    except InvalidOperation:  # the regex admits only digits, so this is not expected
        raise ValueError("expected a size in bytes, e.g. 1073741824, 512MB or 2GiB") from None
    if value < 1:
        raise ValueError("expected a size of at least 1 byte")
    if value > MAX_SIZE:
        raise ValueError("expected a size of at most 1 EiB")
    return value


MAX_PATH_BYTES = 4095
"""Longest path accepted (Linux's PATH_MAX less its NUL; macOS allows less)."""
MAX_NAME_BYTES = 255
"""Longest single file or directory name (NAME_MAX on Linux and macOS)."""
MAX_FILE_BYTES = 1 << 20
"""Largest ``.env`` or system-prompt file read (a bigger one is not what it claims)."""


def _check_path_length(path: Path) -> None:
    """ValueError unless the OS could open ``path`` as far as its length goes (else
    every later ``stat`` fails with "File name too long")."""
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise ValueError(f"the path is {size} bytes long; at most {MAX_PATH_BYTES} are allowed")
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > MAX_NAME_BYTES:
        raise ValueError(
            f"a name in the path is {longest} bytes long; at most {MAX_NAME_BYTES} are allowed "
            "per file or directory name"
        )


def _path(raw: str) -> Path | None:
    value = raw.strip()
    if not value:
        return None
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # "~" with no HOME and no password-database entry
        raise ValueError("cannot expand '~': the home directory is unknown") from None
    _check_path_length(path)
    return path


def _absolute_dir(raw: str) -> Path | None:
    """A directory Jarvis may create: absolute (or under ``~``), never relative to
    whatever directory a service happens to start in."""
    path = _path(raw)
    if path is not None and not path.is_absolute():
        raise ValueError(
            "expected an absolute directory (or one under ~/): a relative one would be "
            "created in whatever directory Jarvis starts in; empty = no persistence"
        )
    return path


def _model_name(raw: str) -> str:
    """A model directory or a model name: either way no longer than a path may be."""
    value = raw.strip()
    if value:
        _path(value)
    return value


def _text(raw: str) -> str:
    return raw


def _wake_word(raw: str) -> str:
    """A wake-word model name or phrase, lower-case; "" for off (also "off", "none")."""
    value = " ".join(raw.split()).lower()
    return "" if value in ("off", "none", "false", "0") else value


def _auto_bool(raw: str) -> bool | None:
    """true/false, or None for "auto" (decided from other settings)."""
    return None if raw.strip().lower() == "auto" else _bool(raw)


def _url(raw: str) -> str:
    """An http(s) URL (no trailing ``/``), or empty."""
    value = raw.strip().rstrip("/")
    if not value:
        return ""
    expected = "expected an http:// or https:// URL such as http://192.168.1.20:8080"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(expected + " (empty = the in-process model)")
    return value


WYOMING_URI_SCHEMES = ("tcp", "unix")


def parse_wyoming_uri(raw: str) -> str:
    """A Wyoming server address: ``tcp://HOST:PORT`` or ``unix:///absolute/path``, or
    empty (off). ValueError (whose text says what is allowed) otherwise."""
    value = raw.strip()
    if not value:
        return ""
    expected = ("expected tcp://HOST:PORT (e.g. tcp://0.0.0.0:10700) or "
                "unix:///absolute/path.sock; empty = off")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme == "tcp":
        host = parts.hostname or ""
        if not host or port is None or not 1 <= port <= 65535 or parts.path not in ("", "/") \
                or any(ch.isspace() or not ch.isprintable() for ch in host):
            raise ValueError(expected)
        return f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"
    if parts.scheme == "unix":
        path = value[len("unix://"):]
        if not path.startswith("/"):
            raise ValueError(expected + " (a unix socket path must be absolute)")
        _check_path_length(Path(path))
        return f"unix://{path}"
    raise ValueError(expected)


ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""A room's name: it goes into MQTT topics and Home Assistant ids."""


def parse_satellites(raw: str) -> tuple[tuple[str, str], ...]:
    """``name=tcp://HOST:PORT`` pairs separated by commas: the satellites the hub drives,
    one room each. Names are lowercased; each must be unique. ValueError naming the
    entry that is wrong otherwise. Host names are resolved when connecting (a name that
    does not resolve marks that room unavailable, it is not a configuration error)."""
    rooms: list[tuple[str, str]] = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, sep, uri = entry.partition("=")
        name = name.strip().lower()
        if not sep:
            raise ValueError(f"{shown(entry)}: expected NAME=tcp://HOST:PORT, e.g. "
                             "kitchen=tcp://10.0.0.21:10700")
        if not ROOM_NAME.fullmatch(name):
            raise ValueError(f"room name {shown(name)}: use 1-32 of a-z, 0-9, '_' and '-', "
                             "starting with a letter or digit")
        try:
            checked = parse_wyoming_uri(uri)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if not checked:
            raise ValueError(f"{name}: no address after '='")
        if any(name == other for other, _ in rooms):
            raise ValueError(f"room {name!r} is named twice")
        rooms.append((name, checked))
    return tuple(rooms)


def _show_satellites(value: object) -> str:
    rooms = value if isinstance(value, tuple) else ()
    return ", ".join(f"{n}={u}" for n, u in rooms) or "(none)"


def _show_llm_url(value: object) -> str:
    return str(value) or "(empty: the in-process llama.cpp engine answers)"


NO_MODEL = Path()
"""The model path of settings loaded with ``load_settings(model=False)`` when
JARVIS_MODEL_PATH is unset and the starter model is not installed (a satellite)."""


def _show_model_path(value: object) -> str:
    return "(none: the starter model is not installed)" if value == NO_MODEL else str(value)


SHOWN_CHARS = 80
"""At most this many characters of a value appear in an error line."""


def shown(value: object) -> str:
    """``value`` quoted for a one-line message: control characters and undecodable
    bytes escaped (``repr``), and a long value cut to its first and last characters
    with its length, so that a 10 KB value does not make a 10 KB error line."""
    text = str(value)
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    half = SHOWN_CHARS // 2
    return f"{text[:half]!r}...{text[-half:]!r} ({len(text)} characters)"


def shown_path(path: Path) -> str:
    """A path as an error line shows it: as it is when printable and no longer than
    :data:`SHOWN_CHARS`, else :func:`shown` (quoted, its first and last 40 characters:
    the tail names the file)."""
    text = str(path)
    return text if len(text) <= SHOWN_CHARS and text.isprintable() else shown(text)


def _check_raw(raw: str) -> None:
    """ValueError for what no setting can hold: NUL characters (possible in a ``.env``
    file) and bytes that are not UTF-8 (``os.environ`` turns them into lone surrogates,
    which cannot be printed, logged or sent anywhere)."""
    if "\x00" in raw:
        raise ValueError("contains a NUL character")
    for index, char in enumerate(raw):
        if 0xD800 <= ord(char) <= 0xDFFF:
            byte = f" (byte 0x{ord(char) - 0xDC00:02x})" if ord(char) >= 0xDC80 else ""
            raise ValueError(
                f"not valid UTF-8 text{byte} at character {index}; settings are UTF-8"
            )


def _file_problem(path: Path) -> str | None:
    """None when ``path`` is a regular file, else what is wrong with it (missing, a
    directory, a FIFO or device that would block or never end, not accessible)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a part of the path is a file, not a directory)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device); expected a file"
    return None


def _read_small_text(path: Path, what: str) -> str:
    """The UTF-8 text of a regular file of at most :data:`MAX_FILE_BYTES`; OSError or
    ValueError (whose text says why) otherwise."""
    problem = _file_problem(path)
    if problem is not None:
        raise ValueError(problem)
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"is larger than {MAX_FILE_BYTES >> 20} MiB, too large for {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Variable:
    """One ``JARVIS_*`` variable: where it goes, how it parses, its default."""

    name: str
    section: str
    field: str
    parse: Callable[[str], Any]
    default: str | Callable[[], str]
    """Raw default, parsed like user input; a callable is evaluated at load time."""
    help: str
    secret: bool = False
    show: Callable[[Any], str] | None = None
    """How ``jarvis config`` shows the value, when plain ``str`` would not say enough."""

    def default_text(self) -> str:
        return self.default() if callable(self.default) else self.default


VARIABLES: tuple[Variable, ...] = (
    # --- LLM
    Variable("JARVIS_MODEL_PATH", "llm", "model_path", _path, "",
             "GGUF model file; empty = the bundled starter model (SmolLM2-135M-Instruct Q4_1)",
             show=_show_model_path),
    Variable("JARVIS_MODEL_CONTEXT_WINDOW", "llm", "context_window", _int(64, 1 << 20), "4096",
             "context size in tokens; larger holds more history but costs KV memory"),
    Variable("JARVIS_PARALLEL", "llm", "parallel", _int(1, 64), "4",
             "conversations the local model answers at once, decoded together in one batch; "
             "each has its own context of JARVIS_MODEL_CONTEXT_WINDOW tokens, so the KV "
             "memory is this many times the window's (more requests wait their turn)"),
    Variable("JARVIS_N_THREADS", "llm", "n_threads", _int(1, 1024),
             lambda: str(physical_cores()), "threads for generation (default: physical cores)"),
    Variable("JARVIS_N_THREADS_BATCH", "llm", "n_threads_batch", _int(0, 1024), "0",
             "threads for prompt processing; 0 = same as JARVIS_N_THREADS"),
    Variable("JARVIS_N_BATCH", "llm", "n_batch", _int(1, 1 << 16), "512",
             "prompt tokens evaluated per llama_decode call"),
    Variable("JARVIS_N_UBATCH", "llm", "n_ubatch", _int(1, 1 << 16), "512",
             "physical micro-batch size (<= JARVIS_N_BATCH)"),
    Variable("JARVIS_N_GPU_LAYERS", "llm", "n_gpu_layers", _int(-1, 100000), "-1",
             "layers to offload to a GPU; -1 = all, 0 = none; no effect on a CPU-only build"),
    Variable("JARVIS_FLASH_ATTN", "llm", "flash_attn", _bool, "false",
             "flash attention: on a 2-core x86 CPU it speeds up a long cold prompt but slows "
             "each turn's short evaluation after a long context (bench/attention_bench.py); "
             "turned on by a quantized KV cache, which needs it"),
    Variable("JARVIS_KV_CACHE_TYPE", "llm", "kv_cache_type", _choice(*KV_CACHE_TYPES), "f16",
             "KV cache precision: f16, q8_0 (half the memory) or q4_0"),
    Variable("JARVIS_USE_MMAP", "llm", "use_mmap", _bool, "true",
             "memory-map the model file (fast start, pages shared with the OS cache)"),
    Variable("JARVIS_USE_MLOCK", "llm", "use_mlock", _bool, "false",
             "lock the model in RAM so it is never swapped out"),
    Variable("JARVIS_TEMPERATURE", "llm", "temperature", _float(0.0, 5.0), "0.2",
             "sampling temperature; 0 = greedy (deterministic)"),
    Variable("JARVIS_TOP_P", "llm", "top_p", _float(0.0, 1.0), "0.95", "nucleus sampling"),
    Variable("JARVIS_TOP_K", "llm", "top_k", _int(0, 100000), "40", "top-k sampling; 0 = off"),
    Variable("JARVIS_REPEAT_PENALTY", "llm", "repeat_penalty", _float(0.0, 10.0), "1.1",
             "penalty for repeating recent tokens; 1.0 = off"),
    Variable("JARVIS_MAX_TOKENS", "llm", "max_tokens", _int(1, 1 << 20), "64",
             "upper bound on reply length in tokens (spoken replies should be short)"),
    Variable("JARVIS_SEED", "llm", "seed", _int(-1, 2**31 - 1), "-1",
             "sampling seed; -1 = random"),
    Variable("JARVIS_SYSTEM_PROMPT", "llm", "system_prompt", _text, DEFAULT_SYSTEM_PROMPT,
             "system prompt (kept first so the context cache can reuse it)"),
    Variable("JARVIS_SYSTEM_PROMPT_FILE", "llm", "system_prompt_file", _path, "",
             "read the system prompt from this file instead (for long prompts)"),
    Variable("JARVIS_WARMUP", "llm", "warmup", _bool, "true",
             "run a tiny generation at start so the first request does not pay for it"),
    Variable("JARVIS_LLM_URL", "llm", "url", _url, "",
             "an OpenAI-compatible LLM server answers instead of the in-process model: "
             "llama.cpp's llama-server (e.g. http://192.168.1.20:8080), vLLM "
             "(http://host:8000) or Ollama (http://host:11434); empty = in-process",
             show=_show_llm_url),
    Variable("JARVIS_LLM_MODEL", "llm", "remote_model", _text, "",
             "model name on that server; empty = the one it serves (one serving several, "
             "like Ollama, needs a name)"),
    Variable("JARVIS_LLM_API_KEY", "llm", "api_key", _text, "",
             "sent as a bearer token (llama-server --api-key, vLLM --api-key)", secret=True),
    Variable("JARVIS_LLM_CONNECT_TIMEOUT_S", "llm", "connect_timeout_s", _float(0.1, 600.0),
             "3", "longest wait for a connection to the LLM server"),
    Variable("JARVIS_LLM_READ_TIMEOUT_S", "llm", "read_timeout_s", _float(0.1, 3600.0), "60",
             "longest wait for the LLM server's next bytes (the first token after a long "
             "uncached prompt included); past it the turn fails"),
    Variable("JARVIS_LLM_FALLBACK", "llm", "fallback", _choice("none", "local"), "none",
             "local = the in-process model answers while the LLM server is unreachable "
             "(it is loaded at start too)"),
    Variable("JARVIS_LLM_KEEP_ALIVE", "llm", "keep_alive", _text, "-1",
             "Ollama only: how long it keeps the model loaded after a request (e.g. 30m); "
             "-1 = until it stops, so no request waits for the model to load"),
    # --- context cache
    Variable("JARVIS_ENABLE_CONTEXT_CACHE", "cache", "enabled", _bool, "true",
             "reuse evaluated prompt prefixes (system prompt, history) across requests"),
    Variable("JARVIS_MAX_CACHE_SIZE", "cache", "max_entries", _int(1, 1_000_000), "100",
             "most saved contexts held in memory"),
    Variable("JARVIS_MAX_CACHE_BYTES", "cache", "max_bytes", parse_size, "256MiB",
             "most RAM the saved contexts may hold, counted as the process holds it (KV "
             "states in whole pages, bookkeeping); resident memory stays within the loaded "
             "models plus this. The starter model's states take ~23 KB a token, so 256MiB "
             "keeps the system prompt and about ten conversations. Raspberry Pi 4 (2-4 GB): "
             "128MiB-256MiB; Pi 5 (4-8 GB): 256MiB-1GiB; a 2-core box with 4+ GB: 512MiB "
             "or more; a bigger model takes more per token"),
    Variable("JARVIS_CACHE_DIR", "cache", "dir", _absolute_dir, lambda: str(default_cache_dir()),
             "where the system-prompt state persists across restarts (an absolute path or "
             "~/...; a relative one is refused); empty = no persistence"),
    Variable("JARVIS_DISK_CACHE_BYTES", "cache", "disk_max_bytes", parse_size, "1GiB",
             "most disk space the persisted contexts may use"),
    Variable("JARVIS_CACHE_SLIDE", "cache", "slide", _bool, "true",
             "when a conversation's oldest turns are dropped, slide the rest of its KV state "
             "back instead of evaluating it again (near-instant; the kept turns were computed "
             "with the dropped ones in view, so such states are never cached)"),
    Variable("JARVIS_CACHE_PERSIST_RECENT", "cache", "persist_recent", _int(0, 1000), "4",
             "recent conversations also saved to disk at shutdown; 0 = only the system prompt"),
    # --- audio devices
    Variable("JARVIS_INPUT_DEVICE", "audio", "input_device", _text, "",
             "microphone: sounddevice name (substring) or index; empty = system default"),
    Variable("JARVIS_OUTPUT_DEVICE", "audio", "output_device", _text, "",
             "speaker: sounddevice name (substring) or index; empty = system default"),
    Variable("JARVIS_MAX_INPUT_S", "audio", "max_input_s", _float(1.0, 86400.0), "30",
             "longest sound file `jarvis transcribe` and `jarvis converse` accept, in seconds; "
             "a longer one is refused before it is read. Whisper takes a file whole and its "
             "memory grows with the length: measured peak RSS of `jarvis transcribe` 252 MB "
             "for 10 s, 271 MB for 30 s, ~410 MB for 60-120 s (and ~30x slower, long-form), "
             "917 MB for 10 minutes. `jarvis run --input` streams and has no limit"),
    # --- voice activity detection
    Variable("JARVIS_VAD_THRESHOLD", "vad", "threshold", _float(0.01, 0.99), "0.5",
             "Silero speech probability that counts as speech; lower catches quiet voices"),
    Variable("JARVIS_VAD_SILENCE_MS", "vad", "silence_ms", _int(50, 10000), "300",
             "silence that ends an utterance; shorter answers sooner but may cut pauses"),
    Variable("JARVIS_VAD_MIN_SPEECH_MS", "vad", "min_speech_ms", _int(0, 10000), "200",
             "shorter bursts of speech (clicks, coughs) are ignored"),
    Variable("JARVIS_VAD_PREROLL_MS", "vad", "preroll_ms", _int(0, 5000), "500",
             "audio kept from before speech onset so the first syllable is never cut"),
    Variable("JARVIS_VAD_MAX_UTTERANCE_S", "vad", "max_utterance_s", _float(1.0, 120.0), "15",
             "an utterance longer than this is cut and transcribed"),
    Variable("JARVIS_VAD_SPECULATE_MS", "vad", "speculate_ms", _int(0, 10000), "150",
             "after this much silence, start transcribing and answering before the "
             "endpoint (JARVIS_VAD_SILENCE_MS); discarded if speech resumes; 0 = off"),
    # --- speech recognition
    Variable("JARVIS_ASR_MODEL", "asr", "model", _model_name, "",
             "faster-whisper model directory or name; empty = the bundled tiny.en"),
    Variable("JARVIS_ASR_LANGUAGE", "asr", "language", _text, "en",
             "fixed language code (faster); empty = detect per utterance"),
    Variable("JARVIS_ASR_COMPUTE_TYPE", "asr", "compute_type", _choice(
        "int8", "int8_float32", "int8_float16", "float16", "float32", "default"), "int8",
             "CTranslate2 precision; int8 is fastest on CPU"),
    Variable("JARVIS_ASR_BEAM_SIZE", "asr", "beam_size", _int(1, 16), "1",
             "1 = greedy (fastest); larger may be slightly more accurate"),
    Variable("JARVIS_ASR_THREADS", "asr", "threads", _int(0, 1024), "0",
             "CPU threads for whisper; 0 = physical cores"),
    Variable("JARVIS_ASR_TRIM_PADDING", "asr", "trim_padding", _bool, "true",
             "encode only the utterance's real length instead of 30 s of padding"),
    # --- text to speech
    Variable("JARVIS_TTS_VOICE", "tts", "voice", _path, "",
             "piper voice .onnx (with its .onnx.json beside it); empty = bundled en_US-joe-medium"),
    Variable("JARVIS_TTS_LENGTH_SCALE", "tts", "length_scale", _float(0.3, 3.0), "1.0",
             "speaking pace: below 1 is faster, above 1 slower"),
    Variable("JARVIS_TTS_PHRASE_CACHE_BYTES", "tts", "phrase_cache_bytes", parse_size, "64MB",
             "disk cache for frequent short replies (\"OK.\", \"Done.\")"),
    # --- voice pipeline
    Variable("JARVIS_WAKE_WORD", "pipeline", "wake_word", _wake_word, "hey_jarvis",
             "what wakes Jarvis: a bundled wake-word model (hey_jarvis, okay_nabu, alexa, "
             "hey_mycroft) listening on the microphone stream, or any other phrase, matched "
             "on transcripts; off (or empty) = answer everything heard"),
    Variable("JARVIS_WAKE_THRESHOLD", "pipeline", "wake_threshold", _float(0.05, 0.99), "0.8",
             "how sure the wake-word model must be; lower hears the wake word more often "
             "(and more that is not it); whisper must then read the phrase at the start of "
             "the utterance"),
    Variable("JARVIS_ECHO_CANCEL", "pipeline", "echo_cancel", _choice("auto", "on", "off"),
             "auto", "remove the speaker's own sound from the microphone (WebRTC AEC3); "
             "auto = on when Jarvis plays on a speaker and listens on a microphone"),
    Variable("JARVIS_BARGE_IN", "pipeline", "barge_in", _auto_bool, "auto",
             "speaking over Jarvis stops its reply; auto = on with echo cancellation (without "
             "it the speaker's own sound would interrupt it)"),
    Variable("JARVIS_FOLLOW_UP_S", "pipeline", "follow_up_s", _float(0.0, 3600.0), "8",
             "after a reply, seconds during which no wake phrase is needed"),
    Variable("JARVIS_HISTORY_TURNS", "pipeline", "history_turns", _int(0, 1000), "8",
             "conversation turns kept as context (older ones are dropped first)"),
    Variable("JARVIS_CONVERSATION_IDLE_S", "pipeline", "conversation_idle_s",
             _float(0.0, 86400.0), "300",
             "a conversation silent this long starts afresh (as Home Assistant does); "
             "0 = never; \"start over\" or \"new conversation\" starts afresh at once"),
    Variable("JARVIS_REPETITION_GUARD", "pipeline", "repetition_guard", _bool, "true",
             "a reply that opens like an earlier reply of the conversation is asked again "
             "without the history, and a reply that loops on itself is cut and not kept"),
    # --- MQTT
    Variable("JARVIS_SITE", "mqtt", "site", _text, "default",
             "name of this assistant (room/satellite); used in topics and client id"),
    Variable("JARVIS_MQTT_HOST", "mqtt", "host", _text, "",
             "broker host name; empty = MQTT off"),
    Variable("JARVIS_MQTT_PORT", "mqtt", "port", _int(1, 65535), "1883", "broker port"),
    Variable("JARVIS_MQTT_USERNAME", "mqtt", "username", _text, "", "broker user name"),
    Variable("JARVIS_MQTT_PASSWORD", "mqtt", "password", _text, "", "broker password",
             secret=True),
    Variable("JARVIS_MQTT_TLS_CA", "mqtt", "tls_ca", _path, "",
             "CA certificate file; setting it turns TLS on"),
    Variable("JARVIS_MQTT_TLS_CERT", "mqtt", "tls_cert", _path, "",
             "client certificate file (mutual TLS)"),
    Variable("JARVIS_MQTT_TLS_KEY", "mqtt", "tls_key", _path, "",
             "client key file (mutual TLS)", secret=True),
    Variable("JARVIS_MQTT_CLIENT_ID", "mqtt", "client_id", _text, "",
             "MQTT client id; empty = jarvis-<site>"),
    Variable("JARVIS_MQTT_BASE_TOPIC", "mqtt", "base_topic", _text, "",
             "topic prefix; empty = jarvis/<site>"),
    Variable("JARVIS_MQTT_QOS", "mqtt", "qos", _int(0, 2), "1",
             "QoS of commands and replies; 1 = at least once"),
    Variable("JARVIS_MQTT_DISCOVERY_PREFIX", "mqtt", "discovery_prefix", _text, "homeassistant",
             "Home Assistant MQTT discovery prefix; empty = no discovery"),
    Variable("JARVIS_MQTT_METRICS_INTERVAL_S", "mqtt", "metrics_interval_s",
             _float(1.0, 86400.0), "60", "how often the latency summary is published"),
    Variable("JARVIS_DEVICES_FILE", "mqtt", "devices_file", _path, "",
             "home-automation device map (TOML); empty = no device actions"),
    Variable("JARVIS_MQTT_MAX_AGE_S", "mqtt", "max_age_s", _float(0.0, 31_536_000.0), "300",
             "a command whose sent_at is older than this is answered 'expired' and not "
             "acted on (commands without sent_at are always served); 0 = no limit"),
    Variable("JARVIS_SHUTDOWN_GRACE_S", "mqtt", "shutdown_grace_s", _float(0.0, 3600.0), "10",
             "on SIGTERM/SIGINT, how long the MQTT reply being generated may take to "
             "finish; asks still waiting are left to the broker for the next start"),
    # --- Wyoming (Home Assistant's voice services)
    Variable("JARVIS_WYOMING_URI", "wyoming", "uri", parse_wyoming_uri, "",
             "serve speech to text, text to speech and the conversation agent to Home "
             "Assistant over the Wyoming protocol inside `jarvis run` and `jarvis hub`: "
             "tcp://0.0.0.0:10700 or unix:///path.sock; empty = off (`jarvis wyoming` "
             "serves on tcp://0.0.0.0:10700 unless --uri or this says otherwise)"),
    Variable("JARVIS_WYOMING_ZEROCONF", "wyoming", "zeroconf", _bool, "true",
             "advertise the Wyoming server on the local network (zeroconf/mDNS, tcp only) "
             "so Home Assistant discovers it by itself"),
    Variable("JARVIS_WYOMING_IDLE_TIMEOUT_S", "wyoming", "idle_timeout_s",
             _float(0.1, 86400.0), "30",
             "a Wyoming connection that sends nothing for this long is closed (work in "
             "progress does not count)"),
    Variable("JARVIS_WYOMING_MAX_CONNECTIONS", "wyoming", "max_connections",
             _int(1, 10000), "100",
             "Wyoming connections served at once; one more is answered with an error "
             "and closed"),
    # --- satellites (a microphone and a speaker in every room)
    Variable("JARVIS_SATELLITES", "satellites", "satellites", parse_satellites, "",
             "Wyoming satellites this assistant drives, one room each: "
             "kitchen=tcp://10.0.0.21:10700,bedroom=tcp://bedroom-pi.local:10700 "
             "(`jarvis satellite` or wyoming-satellite on the other end); empty = none",
             show=_show_satellites),
    Variable("JARVIS_SATELLITE_DISCOVERY", "satellites", "discovery", _bool, "false",
             "also drive the Wyoming satellites found on the local network (zeroconf); "
             "each becomes a room named after the satellite"),
    Variable("JARVIS_SATELLITE_AUDIO_TIMEOUT_S", "satellites", "audio_timeout_s",
             _float(1.0, 3600.0), "10",
             "a satellite that announced a stream but sends no audio for this long is "
             "marked unavailable and reconnected"),
    Variable("JARVIS_SATELLITE_RECONNECT_MAX_S", "satellites", "reconnect_max_s",
             _float(1.0, 3600.0), "30",
             "longest wait between attempts to reach a satellite that is gone (the wait "
             "doubles from 1 s up to this)"),
    # --- latency tracker
    Variable("JARVIS_SPIKE_THRESHOLD_S", "latency", "spike_threshold_s", _float(0.001, 3600.0),
             "5.0", "a request slower than this counts as a spike"),
    # --- general
    Variable("JARVIS_LOG_LEVEL", "general", "log_level", _choice(*LOG_LEVELS, upper=True),
             "INFO", "DEBUG, INFO, WARNING or ERROR"),
)

KNOWN_NAMES = frozenset(v.name for v in VARIABLES) | {"JARVIS_ENV_FILE"}


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class LlmSettings:
    """What the LLM backend needs."""

    model_path: Path
    context_window: int
    n_threads: int
    n_threads_batch: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    flash_attn: bool
    kv_cache_type: str
    use_mmap: bool
    use_mlock: bool
    temperature: float
    top_p: float
    top_k: int
    repeat_penalty: float
    max_tokens: int
    seed: int
    system_prompt: str
    system_prompt_file: Path | None
    warmup: bool
    url: str = ""
    """An OpenAI-compatible server (JARVIS_LLM_URL); empty = the in-process engine."""
    remote_model: str = ""
    api_key: str = ""
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 60.0
    fallback: str = "none"
    """``local``: the in-process model answers while the server is unreachable."""
    keep_alive: str = "-1"
    parallel: int = 4
    """Sequences the in-process engine decodes together (JARVIS_PARALLEL)."""


@dataclass(frozen=True)
class CacheSettings:
    """What the context cache needs."""

    enabled: bool
    max_entries: int
    max_bytes: int
    dir: Path | None
    disk_max_bytes: int
    persist_recent: int
    slide: bool = True
    """Drop trimmed turns from the live KV state and slide the rest back (see env.example)."""


@dataclass(frozen=True)
class AudioSettings:
    """Sound devices (names or indexes as sounddevice knows them; empty = default)."""

    input_device: str
    output_device: str
    max_input_s: float = 30.0
    """Longest sound file read whole (``transcribe``, ``converse``), in seconds."""


@dataclass(frozen=True)
class VadSettings:
    """Endpointing: when an utterance starts and ends."""

    threshold: float
    silence_ms: int
    min_speech_ms: int
    preroll_ms: int
    max_utterance_s: float
    speculate_ms: int = 0
    """Start work this long into the silence (0 = at the endpoint only)."""


@dataclass(frozen=True)
class AsrSettings:
    """faster-whisper."""

    model: str
    language: str
    compute_type: str
    beam_size: int
    threads: int
    trim_padding: bool


@dataclass(frozen=True)
class TtsSettings:
    """piper."""

    voice: Path | None
    length_scale: float
    phrase_cache_bytes: int


@dataclass(frozen=True)
class PipelineSettings:
    """The always-on voice loop."""

    barge_in: bool | None
    """None: on when echo cancellation is on (``JARVIS_BARGE_IN=auto``)."""
    wake_word: str
    """A bundled wake-word model name, a phrase matched on transcripts, or "" (off)."""
    follow_up_s: float
    history_turns: int
    conversation_idle_s: float = 300.0
    repetition_guard: bool = True
    echo_cancel: str = "auto"
    wake_threshold: float = 0.8


@dataclass(frozen=True)
class MqttSettings:
    """The MQTT bridge; ``enabled`` when a host is set."""

    site: str
    host: str
    port: int
    username: str
    password: str
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    client_id: str
    base_topic: str
    qos: int
    discovery_prefix: str
    metrics_interval_s: float
    devices_file: Path | None
    max_age_s: float = 300.0
    shutdown_grace_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True)
class WyomingSettings:
    """The Wyoming server; ``enabled`` when a URI is set."""

    uri: str
    """``tcp://HOST:PORT`` or ``unix:///path``; empty = off."""
    zeroconf: bool
    """Advertise a tcp server over mDNS for Home Assistant's discovery."""
    idle_timeout_s: float = 30.0
    max_connections: int = 100

    @property
    def enabled(self) -> bool:
        return bool(self.uri)


@dataclass(frozen=True)
class SatelliteSettings:
    """The Wyoming satellites the assistant drives (one room each)."""

    satellites: tuple[tuple[str, str], ...]
    """(room name, tcp://HOST:PORT) pairs."""
    discovery: bool
    audio_timeout_s: float = 10.0
    reconnect_max_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.satellites) or self.discovery


@dataclass(frozen=True)
class LatencySettings:
    """What the latency tracker needs."""

    spike_threshold_s: float


@dataclass(frozen=True)
class GeneralSettings:
    log_level: str


@dataclass(frozen=True)
class Settings:
    """The effective configuration; ``sources`` says where each variable came from."""

    llm: LlmSettings
    cache: CacheSettings
    audio: AudioSettings
    vad: VadSettings
    asr: AsrSettings
    tts: TtsSettings
    pipeline: PipelineSettings
    mqtt: MqttSettings
    wyoming: WyomingSettings
    satellites: SatelliteSettings
    latency: LatencySettings
    general: GeneralSettings
    sources: Mapping[str, str]
    warnings: tuple[str, ...] = ()

    def describe(self, mask_secrets: bool = True) -> list[tuple[str, str, str]]:
        """(variable, effective value, source) for every variable, secrets masked."""
        rows = []
        for var in VARIABLES:
            value = getattr(getattr(self, var.section), var.field)
            text = var.show(value) if var.show else "" if value is None else str(value)
            if var.secret and text and mask_secrets:
                text = "********"
            rows.append((var.name, text, self.sources.get(var.name, "default")))
        return rows


_SECTIONS: dict[str, type[Any]] = {
    "llm": LlmSettings,
    "cache": CacheSettings,
    "audio": AudioSettings,
    "vad": VadSettings,
    "asr": AsrSettings,
    "tts": TtsSettings,
    "pipeline": PipelineSettings,
    "mqtt": MqttSettings,
    "wyoming": WyomingSettings,
    "satellites": SatelliteSettings,
    "latency": LatencySettings,
    "general": GeneralSettings,
}


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes and
    ``export``. A malformed line is a ConfigError naming the file and line; so is a file
    that is missing, not a regular file (a FIFO would block), over 1 MiB or not UTF-8."""
    values: dict[str, str] = {}
    try:
        text = _read_small_text(path, "an env file")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read env file {shown_path(path)}: {reason}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        stripped = stripped.removeprefix("export ").strip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(
                f"{shown_path(path)}:{lineno}: expected KEY=VALUE, got {shown(line.strip())}"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if line.strip().split("=", 1)[1].strip().startswith('"'):
                value = value.replace("\\n", "\n")
        values[key] = value
    return values


def _env_file_from(env: Mapping[str, str]) -> Path | None:
    """The file ``JARVIS_ENV_FILE`` names, checked, else ``./.env`` if there is one."""
    raw = env.get("JARVIS_ENV_FILE", "")
    if not raw:
        return Path(".env") if Path(".env").is_file() else None
    try:
        _check_raw(raw)
        path = _path(raw)
    except ValueError as exc:
        raise ConfigError(f"JARVIS_ENV_FILE={shown(raw)} is invalid: {exc}") from None
    if path is None:
        return None
    problem = _file_problem(path)
    if problem is not None:
        raise ConfigError(f"JARVIS_ENV_FILE={shown_path(path)}: {problem}")
    return path


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: Path | None = None, *,
    model: bool = True,
) -> Settings:
    """Build the validated :class:`Settings` (see the module docstring for sources).

    Every problem is a :class:`ConfigError` whose one line names the variable and
    quotes at most :data:`SHOWN_CHARS` characters of its value.

    ``model=False`` is for a command that never loads the language model (``jarvis
    satellite``, installed on a small board without it; ``jarvis config``): with
    JARVIS_MODEL_PATH unset and no starter model installed, the model path is
    :data:`NO_MODEL` instead of an error. A JARVIS_MODEL_PATH that is set is checked
    all the same.
    """
    env = dict(os.environ if environ is None else environ)
    file_values: dict[str, str] = {}
    file_label = ""
    named = env_file is None and bool(env.get("JARVIS_ENV_FILE"))
    if env_file is None:
        env_file = _env_file_from(env)
    if env_file is not None:
        try:
            file_values = read_env_file(env_file)
        except ConfigError as exc:
            raise ConfigError(f"JARVIS_ENV_FILE: {exc}" if named else str(exc)) from None
        file_label = str(env_file)

    warnings = [
        f"{shown(name) if not name.isprintable() or len(name) > SHOWN_CHARS else name} is "
        "not a Jarvis setting (typo?); see env.example for the list"
        for name in sorted(set(env) | set(file_values))
        if name.startswith("JARVIS_") and name not in KNOWN_NAMES
    ]
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    sources: dict[str, str] = {}
    for var in VARIABLES:
        if var.name in env:
            raw, sources[var.name] = env[var.name], "environment"
        elif var.name in file_values:
            raw, sources[var.name] = file_values[var.name], file_label
        else:
            raw, sources[var.name] = var.default_text(), "default"
        try:
            _check_raw(raw)
            values[var.section][var.field] = var.parse(raw)
        except (ValueError, ArithmeticError) as exc:
            value = shown(raw) if not var.secret else "'********'"
            raise ConfigError(f"{var.name}={value} is invalid: {exc}") from None

    llm = values["llm"]
    _resolve_llm(llm, sources, model=model)
    _resolve_speech(values["asr"], values["tts"])
    _resolve_mqtt(values["mqtt"])
    sections = {name: cls(**values[name]) for name, cls in _SECTIONS.items()}
    return Settings(**sections, sources=sources, warnings=tuple(warnings))


def _resolve_llm(llm: dict[str, Any], sources: dict[str, str], *, model: bool) -> None:
    """Cross-field rules and files the LLM section refers to."""
    if model or llm["model_path"] is not None or starter_llm_path() is not None:
        llm["model_path"] = _model_path(llm["model_path"])
    else:
        llm["model_path"] = NO_MODEL  # a command that loads no model, none installed
    if llm["n_threads_batch"] == 0:
        llm["n_threads_batch"] = llm["n_threads"]
    if llm["n_ubatch"] > llm["n_batch"]:
        raise ConfigError(
            f"JARVIS_N_UBATCH={llm['n_ubatch']} is invalid: must not exceed "
            f"JARVIS_N_BATCH={llm['n_batch']}"
        )
    if llm["kv_cache_type"] != "f16" and not llm["flash_attn"]:
        if sources.get("JARVIS_FLASH_ATTN", "default") != "default":
            raise ConfigError(
                f"JARVIS_KV_CACHE_TYPE={llm['kv_cache_type']!r} is invalid without flash "
                "attention: llama.cpp needs JARVIS_FLASH_ATTN=true for a quantized KV cache"
            )
        llm["flash_attn"] = True  # a quantized KV cache needs it, and nobody said otherwise
    _resolve_prompt_file(llm, sources)


def _model_path(path: Path | None) -> Path:
    """The GGUF file ``JARVIS_MODEL_PATH`` names (checked), else the starter model."""
    try:
        if path is None:
            return default_llm_path()
        problem = _file_problem(path)
        if problem is not None and problem != "no such file":
            raise ConfigError(f"JARVIS_MODEL_PATH={shown_path(path)}: {problem}")
        return check_gguf(path)  # a missing file: lists the GGUF files that do exist
    except ConfigError:
        raise
    except JarvisError as exc:
        raise ConfigError(str(exc).replace(str(path), shown_path(path) if path else "")) \
            from None
    except OSError as exc:  # a directory near the path that cannot be listed
        raise ConfigError(
            f"JARVIS_MODEL_PATH={shown_path(path) if path else ''}: cannot be read "
            f"({exc.strerror or exc})"
        ) from None


def _resolve_prompt_file(llm: dict[str, Any], sources: dict[str, str]) -> None:
    prompt_file: Path | None = llm["system_prompt_file"]
    if prompt_file is not None:
        if sources.get("JARVIS_SYSTEM_PROMPT", "default") != "default":
            raise ConfigError(
                "JARVIS_SYSTEM_PROMPT and JARVIS_SYSTEM_PROMPT_FILE are both set: keep one"
            )
        shown_file = shown_path(prompt_file)
        try:
            text = _read_small_text(prompt_file, "a system prompt").strip()
            _check_raw(text)
        except OSError as exc:
            raise ConfigError(f"JARVIS_SYSTEM_PROMPT_FILE={shown_file}: cannot be read as "
                              f"UTF-8 text ({exc.strerror or exc})") from None
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith("is not UTF-8"):
                reason = f"cannot be read as UTF-8 text ({reason.removeprefix('is not ')})"
            raise ConfigError(f"JARVIS_SYSTEM_PROMPT_FILE={shown_file}: {reason}") from None
        if not text:
            raise ConfigError(f"JARVIS_SYSTEM_PROMPT_FILE={shown_file}: the file is empty")
        llm["system_prompt"] = text
    llm["system_prompt"] = llm["system_prompt"].strip()


def _resolve_speech(asr: dict[str, Any], tts: dict[str, Any]) -> None:
    if asr["threads"] == 0:
        asr["threads"] = physical_cores()
    asr["language"] = asr["language"].strip().lower()
    voice: Path | None = tts["voice"]
    if voice is not None:
        problem = _file_problem(voice)
        if problem is not None:
            raise ConfigError(
                f"JARVIS_TTS_VOICE={shown_path(voice)}: {problem} (expected a piper .onnx)")
        if _file_problem(Path(f"{voice}.json")) is not None:
            raise ConfigError(
                f"JARVIS_TTS_VOICE={shown_path(voice)}: its config "
                f"{shown_path(Path(voice.name + '.json'))} is missing; piper voices come as a "
                ".onnx and a .onnx.json pair"
            )


def _resolve_mqtt(mqtt: dict[str, Any]) -> None:
    site = mqtt["site"].strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", site):
        raise ConfigError(
            f"JARVIS_SITE={shown(site)} is invalid: use 1 to 64 letters, digits, '-' and '_' "
            "(it becomes part of MQTT topics)"
        )
    mqtt["site"] = site
    mqtt["host"] = _mqtt_host(mqtt["host"])
    mqtt["client_id"] = _mqtt_string("JARVIS_MQTT_CLIENT_ID", mqtt["client_id"].strip()) \
        or f"jarvis-{site}"
    mqtt["username"] = _mqtt_string("JARVIS_MQTT_USERNAME", mqtt["username"])
    mqtt["password"] = _mqtt_string("JARVIS_MQTT_PASSWORD", mqtt["password"], secret=True)
    base = mqtt["base_topic"].strip().strip("/") or f"jarvis/{site}"
    mqtt["base_topic"] = _topic_prefix("JARVIS_MQTT_BASE_TOPIC", base)
    mqtt["discovery_prefix"] = _topic_prefix("JARVIS_MQTT_DISCOVERY_PREFIX",
                                             mqtt["discovery_prefix"].strip().strip("/"),
                                             empty_ok=True)
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = mqtt[name]
        problem = _file_problem(path) if path is not None else None
        if path is not None and problem is not None:
            raise ConfigError(f"JARVIS_MQTT_{name.upper()}={shown_path(path)}: {problem}")
    if (mqtt["tls_cert"] is None) != (mqtt["tls_key"] is None):
        raise ConfigError("JARVIS_MQTT_TLS_CERT and JARVIS_MQTT_TLS_KEY must be set together")
    devices = mqtt["devices_file"]
    problem = _file_problem(devices) if devices is not None else None
    if devices is not None and problem is not None:
        raise ConfigError(f"JARVIS_DEVICES_FILE={shown_path(devices)}: {problem}")


MQTT_MAX_STRING = 65535
"""MQTT's limit for a UTF-8 string (topic, client id, user name, password), in bytes."""
_MAX_TOPIC_PREFIX = 1024
"""Bytes a topic prefix may take, so that every topic built on it stays far below
:data:`MQTT_MAX_STRING`."""


def _mqtt_host(raw: str) -> str:
    """A broker host name or address as the resolver will take it (IDNA), or "" (off)."""
    host = raw.strip()
    if not host:
        return host
    problem = ""
    if len(host) > 253:
        problem = f"a host name has at most 253 characters, this one {len(host)}"
    elif any(ch.isspace() or not ch.isprintable() for ch in host):
        problem = "a host name has no spaces or control characters"
    else:
        try:
            host.encode("idna")
        except UnicodeError as exc:
            problem = f"not a valid host name ({exc})"
    if problem:
        raise ConfigError(f"JARVIS_MQTT_HOST={shown(raw)} is invalid: {problem}")
    return host


def _mqtt_string(name: str, value: str, *, secret: bool = False) -> str:
    """``value`` if MQTT can carry it as a string (at most 64 KiB of UTF-8)."""
    size = len(value.encode("utf-8"))
    if size > MQTT_MAX_STRING:
        quoted = "'********'" if secret else shown(value)
        raise ConfigError(f"{name}={quoted} is invalid: {size} bytes; MQTT allows at most "
                          f"{MQTT_MAX_STRING}")
    return value


def _topic_prefix(name: str, value: str, *, empty_ok: bool = False) -> str:
    """A topic prefix: no wildcards, no empty levels at its ends, at most 1 KiB."""
    problem = ""
    if not value and not empty_ok:
        problem = "expected a topic such as jarvis/kitchen"
    elif any(c in value for c in "#+"):
        problem = "no wildcards (# or +)"
    elif len(value.encode("utf-8")) > _MAX_TOPIC_PREFIX:
        problem = f"at most {_MAX_TOPIC_PREFIX} bytes"
    elif not value.isprintable():
        problem = "no control characters"
    if problem:
        raise ConfigError(f"{name}={shown(value)} is invalid: {problem}")
    return value
