"""The command line as a user runs it: separate processes, real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jarvis.evaluation.dialogues import HOME_SYSTEM_PROMPT_FILE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], tmp_path: Path, timeout: float = 300, **env: str
        ) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "JARVIS_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run(args, env=environ, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def jarvis(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "jarvis", *args], tmp_path, **env)


def test_ask_json_and_persistence_across_processes(tmp_path: Path) -> None:
    env = {"JARVIS_SYSTEM_PROMPT_FILE": str(HOME_SYSTEM_PROMPT_FILE), "JARVIS_MAX_TOKENS": "12"}
    first = jarvis("ask", "Is the garage door open?", "--json", tmp_path=tmp_path, **env)
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert {"reply", "ttft_s", "total_s", "prompt_tokens", "cached_tokens"} <= one.keys()
    assert one["reply"] and one["cached_tokens"] == 0 and one["prompt_tokens"] > 500

    second = jarvis("ask", "When is Leo's bedtime?", "--json", tmp_path=tmp_path, **env)
    assert second.returncode == 0, second.stderr
    two = json.loads(second.stdout)
    assert two["cached_tokens"] > 500
    assert two["ttft_s"] <= one["ttft_s"] / 5

    stats = jarvis("cache", "stats", "--json", tmp_path=tmp_path)
    assert stats.returncode == 0, stats.stderr
    usage = json.loads(stats.stdout)
    assert usage["system_prompts"] == 1 and usage["contexts"] >= 1
    assert 0 < usage["bytes_on_disk"] <= usage["max_bytes"]

    cleared = jarvis("cache", "clear", tmp_path=tmp_path)
    assert cleared.returncode == 0 and "cleared" in cleared.stdout
    after = json.loads(jarvis("cache", "stats", "--json", tmp_path=tmp_path).stdout)
    assert after["contexts"] == 0


def test_ask_plain_output_and_errors(tmp_path: Path) -> None:
    ok = jarvis("ask", "Say hello.", tmp_path=tmp_path, JARVIS_MAX_TOKENS="8")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    assert "first token" in ok.stderr and "total" in ok.stderr

    empty = jarvis("ask", "   ", tmp_path=tmp_path)
    assert empty.returncode == 2
    assert "the request text is empty" in empty.stderr

    long = jarvis("ask", "x" * 4001, tmp_path=tmp_path)
    assert long.returncode == 2
    assert "jarvis: error: the request is 4,001 characters long; the limit is 4,000" \
        in long.stderr

    missing = jarvis("ask", "hi", tmp_path=tmp_path, JARVIS_MODEL_PATH="/nope/model.gguf")
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "JARVIS_MODEL_PATH=/nope/model.gguf: no such file" in lines[0]
    assert "Traceback" not in missing.stderr


def test_ask_speak_goes_through_the_device_map_like_every_entry_point(tmp_path: Path) -> None:
    # `jarvis ask --speak` used to skip the device matcher; it is now a turn like any other.
    wav = tmp_path / "reply.wav"
    out = jarvis("ask", "Turn on the kitchen light.", "--speak", "-o", str(wav), "--json",
                 tmp_path=tmp_path, JARVIS_DEVICES_FILE=str(ROOT / "config" /
                                                          "devices.example.toml"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["intent"] == "local" and result["outcome"] == "answered"
    assert [a["device"] for a in result["actions"]] == ["kitchen_light"]
    assert result["completion_tokens"] is None  # the model was not asked
    assert wav.stat().st_size > 10_000 and "kitchen light" in result["reply"].lower()
    assert "not sent (no MQTT bridge)" in out.stderr  # and it says so


def test_latency_script_sequential_and_concurrent(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "test_latency.py")
    out = tmp_path / "seq.json"
    seq = run([sys.executable, script, "--iterations", "2", "--json", str(out)], tmp_path,
              JARVIS_MAX_TOKENS="12")
    assert seq.returncode == 0, seq.stderr + seq.stdout
    report = json.loads(out.read_text())
    for key in ("mean_s", "median_s", "p95_s", "std_s", "spikes", "cache_hit_rate",
                "ttft_mean_s", "iterations", "concurrent", "errors"):
        assert key in report
    assert report["iterations"] == 2 and report["concurrent"] is False
    assert report["errors"] == 0 and report["count"] == 2
    assert report["cold_ttft_s"] > report["warm_ttft_mean_s"]
    assert "cold first turn ttft" in seq.stdout and "[seq   1/2]" in seq.stdout

    out = tmp_path / "conc.json"
    conc = run([sys.executable, script, "--concurrent", "--clients", "2", "--iterations", "2",
                "--json", str(out)], tmp_path, JARVIS_MAX_TOKENS="12")
    assert conc.returncode == 0, conc.stderr + conc.stdout
    report = json.loads(out.read_text())
    assert report["concurrent"] is True and report["count"] == 4 and report["errors"] == 0
    assert report["baseline"]["p95_s"] > 0
    assert report["p95_over_sequential"] == pytest.approx(
        report["p95_s"] / report["baseline"]["p95_s"])
