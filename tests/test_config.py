"""Configuration: defaults, every bad value, .env handling, env.example coverage."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jarvis.config import VARIABLES, load_settings, parse_size, physical_cores
from jarvis.errors import ConfigError
from jarvis.models import starter_llm_path

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_use_the_starter_model() -> None:
    s = load_settings({})
    assert s.llm.model_path == starter_llm_path()
    assert s.llm.context_window == 4096
    assert s.llm.n_threads == physical_cores() >= 1
    assert s.llm.n_threads_batch == s.llm.n_threads
    assert s.llm.n_gpu_layers == -1
    assert s.cache.enabled is True
    assert s.cache.max_entries == 100
    assert s.cache.max_bytes == 1024**3
    assert s.latency.spike_threshold_s == 5.0
    assert all(source == "default" for _, _, source in s.describe())


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("JARVIS_N_THREADS", "abc", "expected a whole number from 1 to 1024"),
        ("JARVIS_N_THREADS", "0", "expected a whole number"),
        ("JARVIS_MODEL_CONTEXT_WINDOW", "-4096", "expected a whole number"),
        ("JARVIS_N_GPU_LAYERS", "-2", "expected a whole number"),
        ("JARVIS_TEMPERATURE", "hot", "expected a number"),
        ("JARVIS_TEMPERATURE", "nan", "finite"),
        ("JARVIS_TOP_P", "1.5", "from 0.0 to 1.0"),
        ("JARVIS_ENABLE_CONTEXT_CACHE", "maybe", "expected true or false"),
        ("JARVIS_KV_CACHE_TYPE", "f32", "one of f16, q8_0, q4_0"),
        ("JARVIS_MAX_CACHE_SIZE", "0", "expected a whole number"),
        ("JARVIS_MAX_CACHE_BYTES", "lots", "expected a size in bytes"),
        ("JARVIS_MAX_CACHE_BYTES", "12 parsecs", "expected a size in bytes"),
        ("JARVIS_LOG_LEVEL", "LOUD", "one of DEBUG"),
        ("JARVIS_SPIKE_THRESHOLD_S", "0", "expected a number"),
    ],
)
def test_bad_value_names_variable_value_and_allowed(name: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}={value!r} is invalid")
    assert allowed in message
    assert "\n" not in message


def test_missing_model_lists_gguf_files_found(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "other.gguf").write_bytes(b"GGUF" + bytes(16))
    with pytest.raises(ConfigError) as info:
        load_settings({"JARVIS_MODEL_PATH": str(models / "missing.gguf")})
    message = str(info.value)
    assert f"JARVIS_MODEL_PATH={models / 'missing.gguf'}: no such file" in message
    assert str((models / "other.gguf").resolve()) in message
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in message


def test_model_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>not a model</html>")
    with pytest.raises(ConfigError, match=r"not a GGUF model \(file starts with b'<htm'"):
        load_settings({"JARVIS_MODEL_PATH": str(fake)})
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings({"JARVIS_MODEL_PATH": str(tmp_path)})


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JARVIS_FLASH_ATTN=true"):
        load_settings({"JARVIS_KV_CACHE_TYPE": "q8_0", "JARVIS_FLASH_ATTN": "false"})
    assert not load_settings({}).llm.flash_attn  # slower per turn on CPUs like this one
    assert load_settings({"JARVIS_KV_CACHE_TYPE": "q8_0"}).llm.flash_attn  # needed: turned on
    with pytest.raises(ConfigError, match="must not exceed JARVIS_N_BATCH=256"):
        load_settings({"JARVIS_N_BATCH": "256", "JARVIS_N_UBATCH": "512"})
    assert load_settings({"JARVIS_N_THREADS": "3"}).llm.n_threads_batch == 3


def test_system_prompt_file(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("  You are a lighthouse keeper.\n")
    s = load_settings({"JARVIS_SYSTEM_PROMPT_FILE": str(prompt)})
    assert s.llm.system_prompt == "You are a lighthouse keeper."
    with pytest.raises(ConfigError, match="both set"):
        load_settings({"JARVIS_SYSTEM_PROMPT_FILE": str(prompt), "JARVIS_SYSTEM_PROMPT": "x"})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings({"JARVIS_SYSTEM_PROMPT_FILE": str(tmp_path / "nope.txt")})
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_settings({"JARVIS_SYSTEM_PROMPT_FILE": str(empty)})
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot be read as UTF-8"):
        load_settings({"JARVIS_SYSTEM_PROMPT_FILE": str(binary)})


def test_env_file_precedence_and_warnings(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\nexport JARVIS_N_THREADS=3\nJARVIS_TEMPERATURE='0.5'\n"
        'JARVIS_SYSTEM_PROMPT="Line one\\nLine two"\nJARVIS_N_THRAEDS=9\n'
    )
    s = load_settings({"JARVIS_TEMPERATURE": "0.9"})
    assert s.llm.n_threads == 3
    assert s.llm.temperature == 0.9  # the environment wins over the file
    assert s.llm.system_prompt == "Line one\nLine two"
    assert s.sources["JARVIS_N_THREADS"] == ".env"
    assert s.sources["JARVIS_TEMPERATURE"] == "environment"
    assert any("JARVIS_N_THRAEDS is not a Jarvis setting" in w for w in s.warnings)


def test_malformed_env_file(tmp_path: Path) -> None:
    bad = tmp_path / "custom.env"
    bad.write_text("JARVIS_N_THREADS=2\nthis line has no equals sign\n")
    with pytest.raises(ConfigError, match=r"custom.env:2: expected KEY=VALUE"):
        load_settings({"JARVIS_ENV_FILE": str(bad)})
    with pytest.raises(ConfigError, match=r"JARVIS_ENV_FILE=.*no such file"):
        load_settings({"JARVIS_ENV_FILE": str(tmp_path / "missing.env")})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1073741824", 1 << 30), ("512MB", 512_000_000), ("2GiB", 2 << 30), ("1.5k", 1500)],
)
def test_parse_size(raw: str, expected: int) -> None:
    assert parse_size(raw) == expected


def test_env_example_documents_every_variable() -> None:
    text = (ROOT / "env.example").read_text()
    documented = set(re.findall(r"^# (JARVIS_[A-Z0-9_]+)=", text, flags=re.M))
    declared = {v.name for v in VARIABLES} | {"JARVIS_ENV_FILE"}
    assert documented == declared
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_env_example.py"),
                            "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout


def test_cli_config_and_bad_value(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JARVIS_N_THREADS": "abc"}
    bad = subprocess.run([sys.executable, "-m", "jarvis", "config"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "jarvis: error: JARVIS_N_THREADS='abc' is invalid: expected a whole number from 1 to 1024"
    )
    env["JARVIS_N_THREADS"] = "2"
    good = subprocess.run([sys.executable, "-m", "jarvis", "config"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert re.search(r"^JARVIS_N_THREADS\s+2\s+\(environment\)$", good.stdout, flags=re.M)
    assert re.search(r"^JARVIS_MODEL_CONTEXT_WINDOW\s+4096\s+\(default\)$", good.stdout,
                     flags=re.M)
