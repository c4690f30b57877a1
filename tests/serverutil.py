"""Helpers for tests that run a real `loom serve` process."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


# A client's timeout in tests bounds a hang, it makes no claim about speed: generous enough that a machine under
# load (a 480-token generation at load 13) never meets it.
HANG_S = 600.0


def server_env(home: Path) -> dict[str, str]:
    """The caller's environment without Loom settings, so the server runs with defaults and loads no model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}  # LOOM_LOAD_PLUGINS too: all plugins
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")  # HOME: no ~/.config/loom/config.yaml
    # Its Hugging Face cache is its HOME's whatever the caller's environment says (HF_HOME, XDG_CACHE_HOME).
    env["HF_HUB_CACHE"] = str(home / ".cache" / "huggingface" / "hub")
    return env


# `loom serve --transport ray` on this 2-core machine: half a CPU reserved per replica, so two fit beside Ray's own
# actors, yet two torch threads each, as one process has (Ray's rule would give each 1).
RAY_ENV = {"LOOM_RAY_CPUS_PER_REPLICA": "0.5", "LOOM_RAY_THREADS_PER_REPLICA": "2", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    """A loopback port free now, for a server that must be told its port (Ray's proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition: Callable[[], T], what: str = "the condition", hang: float = 120, every: float = 0.01) -> T:
    """Wait for ``condition`` to hold (something another thread or process does) and return its value; ``hang``
    only bounds a test that would otherwise never end, it is no claim about time."""
    start = time.monotonic()
    while not (value := condition()):
        assert time.monotonic() - start < hang, f"never happened: {what}"
        time.sleep(every)
    return value


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


REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def loom_server(args: list[str], home: Path, **env: str) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """Run `loom serve --port 0 ARGS...` until the block ends; yields (base URL, log file, process)."""
    import sys

    log = home / "server.log"
    cmd = [sys.executable, "-m", "loom_kernel", "serve", "--port", "0", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**server_env(home), **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = int(wait_for(r"listening on http://127\.0\.0\.1:(\d+)", log, proc).group(1))
        wait_for(r"Application startup complete", log, proc)
        yield f"http://127.0.0.1:{port}", log, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def rss_bytes(pid: int) -> int:
    """A process's resident set size in bytes (VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def killed_mid_fit(*args: object) -> None:
    """Stands for a probe fit's scikit-learn call in its worker process and ends that process there with SIGKILL, as
    the kernel's OOM killer would. Here, not in a test file: the worker imports it by its module's name."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def refused_by_sklearn(x: object, y: list[int], classes: list[str], folds: int) -> object:
    """Stands for a probe fit's scikit-learn call with one that scikit-learn itself refuses (more folds than texts),
    in the worker process: a refusal the server's checks cannot foresee."""
    from loom_interp.fitting import train

    return train(x, y, classes, len(y) + 1)
