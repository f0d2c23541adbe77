"""Configuration: defaults, every bad value, .env handling, env.example coverage."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from jarvis.config import VARIABLES, load_settings, parse_size, physical_cores, shown_path
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
    assert s.cache.max_bytes == 256 * 1024**2
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
    assert f"JARVIS_MODEL_PATH={shown_path(models / 'missing.gguf')}: no such file" in message
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
    with pytest.raises(ConfigError, match=re.escape(f"{shown_path(bad)}:2: expected KEY=VALUE")):
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


# --------------------------------------------------------------------------- hostile values
# Issue 12: a fuzz of every variable found 35 tracebacks. Each is now one line that names
# the variable and quotes at most ~80 characters of the value, with exit status 2.

LONG_NAME = "/tmp/" + "a" * 10_240  # one 10 KB file name: "File name too long"
LONG_PATH = "/tmp/" + "/".join(["b" * 200] * 50)  # 10 KB of short-enough names
BAD_UTF8 = "kitchen\udcff\udcfe"  # what os.environ makes of the bytes b"kitchen\xff\xfe"
HUGE = "9" * 400  # float(HUGE) is inf: int(inf) was an OverflowError

PATH_VARIABLES = ("JARVIS_ENV_FILE", "JARVIS_MODEL_PATH", "JARVIS_TTS_VOICE",
                  "JARVIS_MQTT_TLS_CA", "JARVIS_MQTT_TLS_CERT", "JARVIS_MQTT_TLS_KEY",
                  "JARVIS_DEVICES_FILE", "JARVIS_ASR_MODEL", "JARVIS_SYSTEM_PROMPT_FILE",
                  "JARVIS_CACHE_DIR")
SIZE_VARIABLES = ("JARVIS_MAX_CACHE_BYTES", "JARVIS_DISK_CACHE_BYTES",
                  "JARVIS_TTS_PHRASE_CACHE_BYTES")
TEXT_VARIABLES = ("JARVIS_SYSTEM_PROMPT", "JARVIS_MQTT_HOST", "JARVIS_MQTT_BASE_TOPIC",
                  "JARVIS_MQTT_CLIENT_ID", "JARVIS_MQTT_USERNAME",
                  "JARVIS_MQTT_DISCOVERY_PREFIX")
FINDINGS = ([(name, value) for name in PATH_VARIABLES for value in (LONG_NAME, LONG_PATH)]
            + [(name, HUGE) for name in SIZE_VARIABLES]
            + [(name, BAD_UTF8) for name in TEXT_VARIABLES])


def run_config_cli(environ: dict[str, str]) -> tuple[int, str, str]:
    """``jarvis config`` through the real entry point, in this process, with ``environ``
    added to the environment; stdout is strict UTF-8 and stderr escapes what it cannot
    encode, as Python's own streams do. An exception that escapes ``main`` (a traceback
    for the user) fails the test."""
    from jarvis.cli.main import main

    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace")
    with mock.patch.dict(os.environ, environ), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        code = main(["config"])
        out.flush()
        err.flush()
    return code, out_bytes.getvalue().decode(), err_bytes.getvalue().decode()


def assert_one_line_naming(message: str, names: Iterable[str], values: Iterable[str]) -> None:
    lines = message.strip().splitlines()
    assert len(lines) == 1, message
    assert any(name in lines[0] for name in names), lines[0]
    for value in values:
        if len(value) > 100:
            assert value[:100] not in lines[0] and value[-100:] not in lines[0], lines[0]
    assert "Traceback" not in message


@pytest.mark.parametrize(("name", "value"), FINDINGS,
                         ids=[f"{n}-{'utf8' if v == BAD_UTF8 else len(v)}" for n, v in FINDINGS])
def test_hostile_value_is_one_line_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    assert_one_line_naming(str(info.value), [name], [value])
    assert str(info.value).startswith(name)
    code, _, err = run_config_cli({name: value})
    assert code == 2
    assert err.startswith("jarvis: error: ")
    assert_one_line_naming(err, [name], [value])


def test_hostile_values_through_the_real_command(tmp_path: Path) -> None:
    """The bytes a shell really passes (not valid UTF-8, 10 KB, 400 digits) to
    ``python -m jarvis config``."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for name, value in (("JARVIS_ENV_FILE", LONG_NAME), ("JARVIS_DISK_CACHE_BYTES", HUGE),
                        ("JARVIS_MQTT_HOST", BAD_UTF8), ("JARVIS_SYSTEM_PROMPT", BAD_UTF8)):
        env = {**base, name: value}  # a str with surrogates is passed on as the raw bytes
        result = subprocess.run([sys.executable, "-m", "jarvis", "config"], env=env,
                                capture_output=True, timeout=60, cwd=tmp_path, check=False)
        err = result.stderr.decode("utf-8", "backslashreplace")
        assert result.returncode == 2, err
        assert err.startswith(f"jarvis: error: {name}"), err
        assert_one_line_naming(err, [name], [value])
    result = subprocess.run([sys.executable, "-m", "jarvis", "config"],
                            env={**base, "JARVIS_MQTT_HOST": BAD_UTF8}, capture_output=True,
                            timeout=60, cwd=tmp_path, check=False)
    assert b"is invalid: not valid UTF-8 text (byte 0xff) at character 7" in result.stderr


def test_invalid_utf8_and_nul_anywhere_are_refused(tmp_path: Path) -> None:
    for var in VARIABLES:
        with pytest.raises(ConfigError, match=f"^{var.name}=.* is invalid: not valid UTF-8"):
            load_settings({var.name: BAD_UTF8})
    env_file = tmp_path / "nul.env"
    env_file.write_bytes(b"JARVIS_SYSTEM_PROMPT=You are\x00 Jarvis\n")
    with pytest.raises(ConfigError, match=r"^JARVIS_SYSTEM_PROMPT=.* contains a NUL character"):
        load_settings({"JARVIS_ENV_FILE": str(env_file)})


def test_numbers_and_sizes_out_of_any_range() -> None:
    assert parse_size("1") == 1
    with pytest.raises(ValueError, match="at most 1 EiB"):
        parse_size("2000000000000GiB")
    assert parse_size("0.5GiB") == 1 << 29  # exact, no float rounding
    for name in ("JARVIS_N_THREADS", "JARVIS_TEMPERATURE", "JARVIS_MQTT_PORT"):
        with pytest.raises(ConfigError, match=f"^{name}='9999.*' \\(400 characters\\) is invalid"):
            load_settings({name: HUGE})


def test_quoted_values_are_short_and_escaped() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"JARVIS_SITE": "kitchen\nINFO fake log line"})
    message = str(info.value)
    assert "\n" not in message and "'kitchen\\nINFO fake log line'" in message
    with pytest.raises(ConfigError) as info:
        load_settings({"JARVIS_N_THREADS": "x" * 5000})
    assert len(str(info.value)) < 250 and "(5000 characters)" in str(info.value)


def test_mqtt_host_and_topics_are_checked_where_they_are_set() -> None:
    for host in ("a" * 64 + ".example", "bad host", "x" * 300, "..."):
        with pytest.raises(ConfigError, match=r"^JARVIS_MQTT_HOST=.* is invalid"):
            load_settings({"JARVIS_MQTT_HOST": host})
    assert load_settings({"JARVIS_MQTT_HOST": "küche.local"}).mqtt.host == "küche.local"
    assert load_settings({"JARVIS_MQTT_HOST": "::1"}).mqtt.host == "::1"
    with pytest.raises(ConfigError, match=r"^JARVIS_MQTT_DISCOVERY_PREFIX='home#' is invalid"):
        load_settings({"JARVIS_MQTT_DISCOVERY_PREFIX": "home#"})
    with pytest.raises(ConfigError, match=r"^JARVIS_MQTT_BASE_TOPIC=.* at most 1024 bytes"):
        load_settings({"JARVIS_MQTT_BASE_TOPIC": "t/" * 600})
    assert load_settings({"JARVIS_MQTT_DISCOVERY_PREFIX": ""}).mqtt.discovery_prefix == ""


def test_relative_cache_dir_is_refused_not_created(tmp_path: Path) -> None:
    """``JARVIS_CACHE_DIR=abc`` would create ./abc wherever the service starts."""
    with pytest.raises(ConfigError) as info:
        load_settings({"JARVIS_CACHE_DIR": "abc"})
    assert str(info.value).startswith("JARVIS_CACHE_DIR='abc' is invalid: expected an "
                                      "absolute directory")
    assert not (Path.cwd() / "abc").exists()
    home = load_settings({"JARVIS_CACHE_DIR": "~/jarvis-cache"}).cache.dir
    assert home == Path.home() / "jarvis-cache"
    assert load_settings({"JARVIS_CACHE_DIR": ""}).cache.dir is None


def test_relative_xdg_cache_home_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The XDG specification says a relative XDG_CACHE_HOME is invalid."""
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert load_settings({}).cache.dir == Path.home() / ".cache" / "jarvis" / "contexts"


BLOCKING = """
import sys
from jarvis.config import load_settings
from jarvis.errors import ConfigError
try:
    load_settings({sys.argv[1]: sys.argv[2]})
    print("LOADED")
except ConfigError as exc:
    print(exc)
"""


@pytest.mark.parametrize("name", ["JARVIS_ENV_FILE", "JARVIS_SYSTEM_PROMPT_FILE",
                                  "JARVIS_MODEL_PATH", "JARVIS_DEVICES_FILE"])
def test_a_fifo_or_device_as_a_file_setting_is_refused_not_read(tmp_path: Path,
                                                                name: str) -> None:
    """A FIFO blocked start-up forever; /dev/zero would be read until memory ran out."""
    fifo = tmp_path / "settings.fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        result = subprocess.run([sys.executable, "-c", BLOCKING, name, path], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        expected = f"{name}={shown_path(Path(path))}: is not a regular file"
        assert result.stdout.startswith(expected), result.stdout


# Values a hostile or careless user might set: any text, numbers far out of range,
# 10 KB names and paths, bytes that are not UTF-8 (as os.environ delivers them:
# U+DC80..U+DCFF), special files and words that look like values.
_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_UNDECODABLE = st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)
HOSTILE = st.one_of(
    st.text(_TEXT, max_size=40),
    st.integers().map(str),
    st.integers(10**299, 10**420).map(str),
    st.floats().map(str),
    st.builds(lambda n, c: c * n, st.integers(200, 11_000), st.sampled_from("a/9é~. ")),
    st.lists(st.text("ab", min_size=150, max_size=300), min_size=1, max_size=40)
      .map(lambda parts: "/" + "/".join(parts)),
    st.lists(st.one_of(_TEXT, _UNDECODABLE), min_size=1, max_size=20).map("".join),
    st.sampled_from(["", " ", "/", ".", "..", "~", "~nobody-here/x", "/dev/zero", "/dev/null",
                     "/dev/stdin", "/etc/passwd", "/etc", "abc", "nan", "inf", "-inf", "1e999",
                     "0x10", "１２", "1_000", "-1", "0", "true", "TRUE", "512MB", "2GiB",
                     "1.5k", "localhost", "#", "+/+", "a\nb", "\t", "\x1b[31m"]),
)
NAMES = sorted([v.name for v in VARIABLES] + ["JARVIS_ENV_FILE"])


@hypothesis_settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(NAMES), HOSTILE, min_size=1, max_size=3))
def test_any_value_of_any_variable_is_accepted_or_one_line(values: dict[str, str]) -> None:
    """Whatever the values, ``jarvis config`` either prints the settings (exit 0) or
    one line naming one of the variables (exit 2), quoting little of the value; and a
    value that is not UTF-8 is always refused."""
    code, out, err = run_config_cli(values)
    assert code in (0, 2), (code, err)
    if code == 0:
        assert not any(_UNDECODABLE_RE.search(v) for v in values.values())
        assert "JARVIS_MODEL_PATH" in out
        return
    assert err.startswith("jarvis: error: ")
    assert_one_line_naming(err, values, values.values())


_UNDECODABLE_RE = re.compile("[\udc80-\udcff]")
