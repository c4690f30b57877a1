"""Helpers for tests that run a real `loom serve` process."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest


def server_env(home: Path) -> dict[str, str]:
    """The caller's environment without Loom settings, so the server runs with defaults and loads no model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}  # LOOM_LOAD_PLUGINS too: all plugins
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")  # HOME: no ~/.config/loom/config.yaml
    return env


def wait_for(pattern: str, log: Path, proc: subprocess.Popen, timeout: float = 60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if m := re.search(pattern, text):
            return m
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before {pattern!r}:\n{text}")
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} within {timeout} s:\n{log.read_text()}")
