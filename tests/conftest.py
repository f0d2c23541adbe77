"""Shared fixtures: settings for the real starter model, isolated from the user's
environment and cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jarvis.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray JARVIS_* variables or .env from the developer's shell; caches in tmp."""
    for name in list(os.environ):
        if name.startswith("JARVIS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.chdir(tmp_path)


def make_settings(tmp_path: Path, **env: str) -> Settings:
    """Settings from defaults plus ``env`` (names without the JARVIS_ prefix)."""
    environ = {"JARVIS_CACHE_DIR": str(tmp_path / "ctx-cache"), "JARVIS_TEMPERATURE": "0"}
    environ.update({f"JARVIS_{k}": v for k, v in env.items()})
    return load_settings(environ)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)

