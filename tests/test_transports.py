"""Transports end to end: the hook, serve's selection and binding, and a real `loom serve` on TCP and a Unix socket."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pluggy
import pytest
from serverutil import server_env, wait_for

from loom_kernel import LoomError, Transport, hookimpl
from loom_kernel.config import ConfigError, Settings, load_settings
from loom_kernel.plugins import create_plugin_manager
from loom_kernel.serve import bind_all, listen_url, select_transports

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="loom-") as d:
        yield Path(d)


@pytest.fixture
def pm(monkeypatch: pytest.MonkeyPatch) -> pluggy.PluginManager:
    monkeypatch.delenv("LOOM_LOAD_PLUGINS", raising=False)
    return create_plugin_manager()


def test_transport(pm: pluggy.PluginManager) -> None:
    """The `transport` hookspec: http and unix come from their distributions' entry points."""
    pm.check_pending()
    offered = [t for t in pm.hook.transport(settings=Settings()) if t is not None]
    assert {t.name for t in offered} >= {"http", "unix"}
    assert all(isinstance(t, Transport) and t.describe for t in offered)


def test_select_both_binds_http_and_unix(pm: pluggy.PluginManager, short_dir: Path) -> None:
    settings = load_settings(env={}, port=0, unix_socket=str(short_dir / "s.sock"), transports="both,http")
    transports = select_transports(settings, pm)
    assert [t.name for t in transports] == ["http", "unix"]  # "both" expanded, the repeated http bound once
    sockets, bound = bind_all(transports)
    try:
        assert [s.family for s in sockets] == [socket.AF_INET, socket.AF_UNIX]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", listen_url(sockets[0]))
        assert listen_url(sockets[1]) == f"unix:{short_dir / 's.sock'}"
        assert stat.S_IMODE(os.stat(short_dir / "s.sock").st_mode) == 0o600
    finally:
        for t in bound:
            t.cleanup()
    assert not (short_dir / "s.sock").exists()


def test_unknown_transport_lists_the_known_ones(pm: pluggy.PluginManager) -> None:
    known = r"unknown transport 'carrier-pigeon'; known transports: http, ray, unix"
    with pytest.raises(ConfigError, match=known) as exc:
        select_transports(Settings(transports=["http", "carrier-pigeon"]), pm)
    assert exc.value.allowed == ["http", "ray", "unix"]


def test_third_party_transport_is_selectable(pm: pluggy.PluginManager) -> None:
    class Pigeon:
        @hookimpl
        def transport(self, settings: Settings) -> Transport:
            return Transport(name="pigeon", describe="by air", bind=list)

    pm.register(Pigeon(), name="pigeon")
    assert [t.name for t in select_transports(Settings(transports=["pigeon"]), pm)] == ["pigeon"]


def test_failed_bind_cleans_up_the_transports_already_bound(pm: pluggy.PluginManager, short_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(
            port=taken.getsockname()[1], unix_socket=str(short_dir / "s.sock"), transports=["unix", "http"]
        )
        with pytest.raises(LoomError, match="in use"):
            bind_all(select_transports(settings, pm))
    assert not (short_dir / "s.sock").exists()  # unix bound first, then removed when http failed


# -- a real server ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_both_answers_over_tcp_and_unix_then_removes_the_socket(short_dir: Path) -> None:
    sock_path = short_dir / "loom.sock"
    log = short_dir / "server.log"
    cmd = [sys.executable, "-m", "loom_kernel", "serve", "--transport", "both", "--port", "0"]
    cmd += ["--unix-socket", str(sock_path)]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # what a killed server leaves: replaced at start
    stale.bind(str(sock_path))
    stale.close()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(short_dir), stdout=out, stderr=subprocess.STDOUT)
    try:
        port = int(wait_for(r"listening on http://127\.0\.0\.1:(\d+) \(http transport\)", log, proc).group(1))
        wait_for(re.escape(f"listening on unix:{sock_path} (unix transport)"), log, proc)
        wait_for(r"Application startup complete", log, proc)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600

        def health_tcp() -> httpx.Response:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)

        def health_unix() -> httpx.Response:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock_path)), base_url="http://loom") as c:
                return c.get("/health", timeout=30)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            tcp, unix = (f.result(timeout=60) for f in [pool.submit(health_tcp), pool.submit(health_unix)])
        for r in (tcp, unix):
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "ok"
            assert r.json()["loaded_models"] == [] and r.json()["loading_models"] == []

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    text = log.read_text()
    assert not sock_path.exists(), text
    assert text.count("Application startup complete") == 1, text  # one server, one lifespan, both sockets
    assert "Application shutdown complete" in text
    assert "Traceback" not in text
