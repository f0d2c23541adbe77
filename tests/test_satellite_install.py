"""A satellite installs on a small board without the heavy stack: a virtualenv holding
only ``requirements-satellite.txt`` and Jarvis itself (``pip install --no-deps``, as the
file says to install it) runs ``jarvis --help``, ``jarvis config`` and ``jarvis
satellite``, and none of the model packages (llama.cpp, whisper, piper, onnx) or the
MQTT client is there to be imported by accident.

The virtualenv is built once per content of the requirements file (and Python version)
under ``~/.cache/jarvis/peers/satellite-minimal-<hash>/`` by
:func:`tests.support.peers.ensure_venv` (a lock, a marker once complete); Jarvis is
installed into it anew on every run, from a wheel of the current tree, so what is
tested is this checkout."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from wyoming.event import Event

from jarvis.audio import ASR_RATE, read_audio, to_int16
from tests.support import peers
from tests.support.speech import JFK, write_asoundrc

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-satellite.txt"
ABSENT = ("faster_whisper", "llama_cpp", "piper", "ctranslate2", "onnxruntime", "onnx",
          "aiomqtt", "httpx", "diskcache")
"""Import names that must not be installed in the satellite's virtualenv."""
PAD_S = 30.0


def requirement_lines() -> list[str]:
    """The requirements file's requirements (comments and blank lines left out)."""
    lines = []
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def satellite_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The minimal virtualenv with this tree's Jarvis installed, held under its lock for
    the module's tests (another session reinstalling Jarvis waits)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()
                            + sys.version.split()[0].encode()).hexdigest()[:12]
    venv = peers.PEERS_DIR / f"satellite-minimal-{digest}"
    started = time.monotonic()
    python = peers.ensure_venv(venv, requirement_lines(),
                               check="import numpy, sounddevice, wyoming, zeroconf, "
                                     "pymicro_wakeword")
    print(f"satellite venv {venv} ready in {time.monotonic() - started:.1f} s")
    # A wheel of the tree as it is, built from a copy (no build/ or egg-info in the
    # checkout) with this interpreter's setuptools.
    tmp = tmp_path_factory.mktemp("satellite-wheel")
    source = tmp / "src"
    shutil.copytree(ROOT / "jarvis", source / "jarvis",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    started = time.monotonic()
    peers._run_step([sys.executable, "-m", "pip", "wheel", "--no-deps",
                     "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"),
                     str(source)], "building the jarvis wheel")
    wheel = next((tmp / "dist").glob("jarvis_voice-*.whl"))
    with peers._file_lock(venv.parent / f"{venv.name}.lock", peers.LOCK_TIMEOUT_S):
        peers._run_step([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                         "--force-reinstall", "-q", str(wheel)], f"pip install {wheel.name}")
        print(f"jarvis built and installed in {time.monotonic() - started:.1f} s")
        yield venv


def venv_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in peers.peer_env().items() if not k.startswith("JARVIS_")}
    env.update({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                "JARVIS_CACHE_DIR": "", **extra})
    return env


@pytest.mark.slow
def test_only_the_satellite_stack_is_installed(satellite_venv: Path, tmp_path: Path) -> None:
    python = satellite_venv / "bin" / "python"
    script = ("import importlib.util, json, jarvis\n"
              f"print(json.dumps([[m for m in {ABSENT!r} if importlib.util.find_spec(m)],\n"
              "                  jarvis.__file__]))\n")
    out = subprocess.run([str(python), "-c", script], env=venv_env(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    present, location = json.loads(out.stdout)
    assert present == [], f"installed in the satellite venv: {present}"
    assert location.startswith(str(satellite_venv)), location  # not this checkout
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                            env=venv_env(tmp_path), capture_output=True, text=True,
                            timeout=60, check=True)
    names = sorted(p["name"] for p in json.loads(listed.stdout))
    print(f"satellite venv packages: {names}")
    assert "llama_cpp_python" not in names and "llama-cpp-python" not in names


@pytest.mark.slow
def test_help_config_and_devices_run(satellite_venv: Path, tmp_path: Path) -> None:
    """The commands a satellite's owner uses besides ``satellite``; they need no model."""
    jarvis = satellite_venv / "bin" / "jarvis"
    write_asoundrc(tmp_path, tmp_path / "mic.raw")
    for argv, expected in ((["--help"], "satellite"), (["satellite", "--help"], "--uri"),
                           (["config"], "JARVIS_WAKE_WORD"), (["devices"], "jmic")):
        result = subprocess.run([str(jarvis), *argv], env=venv_env(tmp_path), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout, result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        if argv == ["config"]:
            assert "(none: the starter model is not installed)" in result.stdout
    # A command that loads the model still says, in one line, that there is none.
    result = subprocess.run([str(jarvis), "ask", "hello"], env=venv_env(tmp_path),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("jarvis: error: JARVIS_MODEL_PATH is not set and the "
                                    "starter model is not installed"), result.stderr


def start_satellite(venv: Path, home: Path, mic: np.ndarray,
                    wake_word: str) -> tuple[peers.SatelliteProcess, int, Path]:
    """``jarvis satellite --name kitchen`` of the venv on a free port; its log in a file."""
    padded = np.concatenate([mic, np.zeros(int(PAD_S * ASR_RATE), np.int16)])
    home.mkdir(parents=True)
    (home / "mic.raw").write_bytes(padded.astype("<i2").tobytes())
    speaker = write_asoundrc(home, home / "mic.raw")["speaker"]
    port = peers.free_port()
    log_path = home / "satellite.log"
    with log_path.open("wb") as log:
        proc = peers.SatelliteProcess(
            [str(venv / "bin" / "jarvis"), "satellite", "--uri", f"tcp://127.0.0.1:{port}",
             "--no-zeroconf", "--name", "kitchen"],
            env=venv_env(home, JARVIS_WAKE_WORD=wake_word), cwd=home,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    proc.port, proc.name, proc.log_path = port, "kitchen", log_path
    try:
        peers.wait_for_port(port, timeout_s=60, proc=proc, log_path=log_path)
    except BaseException:
        peers.stop_process(proc)
        raise
    return proc, port, speaker


@pytest.mark.slow
def test_the_satellite_streams_and_plays_from_the_minimal_venv(satellite_venv: Path,
                                                               tmp_path: Path) -> None:
    mic = to_int16(read_audio(JFK).samples[:3 * ASR_RATE])
    proc, port, speaker = start_satellite(satellite_venv, tmp_path / "home", mic, "off")
    reply = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000) * 32767).astype("<i2")

    async def scenario() -> None:
        async with peers.WyomingClient(port) as client:
            await client.send(Event("describe"))
            info = (await client.read_until("info", 10))[-1].data
            assert info["satellite"]["name"] == "kitchen", info
            assert info["satellite"]["active_wake_words"] == []
            await client.send(Event("run-satellite"))
            events = await client.read_until("audio-start", 10)
            assert [e.type for e in events] == ["run-pipeline", "audio-start"]
            heard: list[np.ndarray] = []
            while sum(map(len, heard)) < ASR_RATE:
                event = await client.read(10)
                assert event is not None and event.type == "audio-chunk", event
                heard.append(np.frombuffer(event.payload or b"", dtype="<i2"))
            audio = np.concatenate(heard)
            assert np.array_equal(audio, mic[:len(audio)])  # the microphone, from its start
            fmt = {"rate": 16000, "width": 2, "channels": 1}
            await client.send(Event("audio-start", fmt))
            await client.send(Event("audio-chunk", fmt, reply.tobytes()))
            await client.send(Event("audio-stop"))
            await client.read_until("played", 10)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        status = peers.stop_process(proc, timeout_s=20)
    log = proc.log_path.read_text()
    assert status == 0, log
    assert "Traceback" not in log, log
    played = np.frombuffer(speaker.read_bytes(), dtype="<i2")
    assert np.count_nonzero(played) > 0.9 * len(reply), log  # resampled to 22050 Hz


@pytest.mark.slow
def test_the_wake_word_model_loads_in_the_minimal_venv(satellite_venv: Path,
                                                       tmp_path: Path) -> None:
    proc, port, _ = start_satellite(satellite_venv, tmp_path / "home", np.zeros(1, np.int16),
                                    "hey_jarvis")

    async def scenario() -> None:
        async with peers.WyomingClient(port) as client:
            await client.send(Event("describe"))
            info = (await client.read_until("info", 10))[-1].data
            assert info["satellite"]["active_wake_words"] == ["hey_jarvis"], info

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        status = peers.stop_process(proc, timeout_s=20)
    assert status == 0, proc.log_path.read_text()


def test_requirements_match_the_project_pins() -> None:
    """Each satellite requirement is pinned as in pyproject.toml's dependencies."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = set(project["dependencies"])
    for line in requirement_lines():
        assert line in pins, f"{line!r} is not in pyproject.toml's dependencies as such"
