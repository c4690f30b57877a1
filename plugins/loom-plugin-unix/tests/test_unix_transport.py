"""The unix transport: a real socket file, mode 0600, stale files replaced, live servers and other files kept."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import loom_unix
import pytest
from loom_unix.listener import UnixListener, default_unix_socket

from loom_kernel import LoomError, Transport
from loom_kernel.config import Settings


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="loom-") as d:
        yield Path(d) / "loom.sock"


def stale_socket(path: Path) -> None:
    """A socket file with nobody listening: what a killed server leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_hook_offers_unix_without_touching_the_path(sock_path: Path) -> None:
    t = loom_unix.transport(settings=Settings(unix_socket=str(sock_path)))
    assert isinstance(t, Transport)
    assert t.name == "unix"
    assert str(sock_path) in t.describe
    assert not sock_path.exists()


def test_bind_creates_a_0600_socket_and_cleanup_removes_it(sock_path: Path) -> None:
    umask_before = os.umask(0o022)
    os.umask(umask_before)
    t = loom_unix.transport(settings=Settings(unix_socket=str(sock_path)))
    (sock,) = t.bind()
    try:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert os.umask(umask_before) == umask_before  # bind restored the process umask
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(sock_path))
    finally:
        t.cleanup()
    assert not sock_path.exists()
    assert sock.fileno() == -1


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    stale_socket(sock_path)
    os.chmod(sock_path, 0o644)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client, pytest.raises(ConnectionRefusedError):
        client.connect(str(sock_path))
    listener = UnixListener(str(sock_path))
    listener.bind()
    try:
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600  # ours now, not the stale 0644 file
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(sock_path))
    finally:
        listener.close()
    assert not sock_path.exists()


def test_live_server_is_not_replaced(sock_path: Path) -> None:
    first = UnixListener(str(sock_path))
    first.bind()
    try:
        inode = os.stat(sock_path).st_ino
        with pytest.raises(LoomError, match="another server is listening"):
            UnixListener(str(sock_path)).bind()
        assert os.stat(sock_path).st_ino == inode  # the live server's socket is untouched
    finally:
        first.close()


def test_a_server_starting_on_the_same_path_is_refused_and_removes_nothing(sock_path: Path) -> None:
    """Two servers started at once on one path: while one holds the start lock (from its check for a stale file to
    its listening socket), the other is refused and leaves the file alone, so neither takes the other's socket; the
    lock file is 0600 and stays."""
    import fcntl

    stale_socket(sock_path)
    inode = os.stat(sock_path).st_ino
    lock = sock_path.with_name(sock_path.name + ".lock")
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LoomError, match="another server is starting"):
            UnixListener(str(sock_path)).bind()
        assert os.stat(sock_path).st_ino == inode  # the file the other one is replacing is untouched
    finally:
        os.close(held)
    listener = UnixListener(str(sock_path))
    listener.bind()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(sock_path))
    finally:
        listener.close()
    assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_path_that_is_not_a_socket_is_refused(sock_path: Path, kind: str) -> None:
    if kind == "file":
        sock_path.write_text("precious")
    elif kind == "dir":
        sock_path.mkdir()
    else:
        target = sock_path.with_name("target.sock")
        stale_socket(target)
        sock_path.symlink_to(target)
    with pytest.raises(LoomError, match="exists and is not a socket"):
        UnixListener(str(sock_path)).bind()
    assert sock_path.exists() or sock_path.is_symlink()
    if kind == "file":
        assert sock_path.read_text() == "precious"


def test_cleanup_leaves_a_socket_another_server_put_there(sock_path: Path) -> None:
    listener = UnixListener(str(sock_path))
    listener.bind()
    sock_path.unlink()  # someone removed ours and started their own server on the same path
    successor = UnixListener(str(sock_path))
    successor.bind()
    try:
        listener.close()
        assert sock_path.exists()
    finally:
        successor.close()
    assert not sock_path.exists()


def test_missing_directory_is_a_clear_error(sock_path: Path) -> None:
    with pytest.raises(LoomError, match=r"unix: cannot bind .*nowhere"):
        UnixListener(str(sock_path.parent / "nowhere" / "loom.sock")).bind()


def test_path_too_long_is_a_clear_error(sock_path: Path) -> None:
    with pytest.raises(LoomError, match="unix: cannot bind"):
        UnixListener(str(sock_path.parent / ("x" * 200))).bind()


# -- the default path ------------------------------------------------------------------------------------------


def test_the_default_path_is_never_in_a_shared_directory(sock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = sock_path.parent / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert default_unix_socket() == str(runtime / "loom.sock")
    assert str(runtime / "loom.sock") in loom_unix.transport(settings=Settings()).describe
    runtime.chmod(0o755)  # not private: a session without a proper runtime directory
    fallback = Path(tempfile.gettempdir()) / f"loom-{os.getuid()}" / "loom.sock"
    assert default_unix_socket() == str(fallback)
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_unix_socket() == str(fallback)


def serve_unix(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    from serverutil import REPO, server_env

    log = home / "server.log"
    environment = {k: v for k, v in server_env(home).items() if k != "XDG_RUNTIME_DIR"} | env
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loom_kernel", "serve", "--transport", "unix"],
            cwd=REPO,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


@pytest.mark.slow
def test_a_server_without_a_runtime_directory_listens_in_a_private_one(sock_path: Path) -> None:
    """No XDG_RUNTIME_DIR: the socket goes in ``loom-<uid>`` (0700) under the temporary directory."""
    from serverutil import wait_for

    temp = sock_path.parent
    proc, log = serve_unix(temp, {"TMPDIR": str(temp)})
    private = temp / f"loom-{os.getuid()}"
    try:
        wait_for(re.escape(f"listening on unix:{private / 'loom.sock'} (unix transport)"), log, proc)
        wait_for(r"Application startup complete", log, proc)
        assert stat.S_IMODE(os.lstat(private).st_mode) == 0o700 and os.lstat(private).st_uid == os.getuid()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(private / "loom.sock")), base_url="http://loom") as c:
            assert c.get("/health", timeout=60).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not (private / "loom.sock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("taken", ["another user's", "world-writable", "a symlink"])
def test_a_private_directory_another_user_made_first_is_refused(sock_path: Path, taken: str) -> None:
    """Another local user who made ``loom-<uid>`` first could swap the socket in it: the server will not start."""
    temp = sock_path.parent
    private = temp / f"loom-{os.getuid()}"
    if taken == "a symlink":
        (temp / "elsewhere").mkdir(mode=0o700)
        private.symlink_to(temp / "elsewhere")
    else:
        private.mkdir(mode=0o700 if taken == "another user's" else 0o777)
        private.chmod(0o700 if taken == "another user's" else 0o777)
        if taken == "another user's":
            if os.getuid() != 0:
                pytest.skip("giving a directory to another user needs root")
            os.chown(private, 65534, 65534)
    proc, log = serve_unix(temp, {"TMPDIR": str(temp)})
    assert proc.wait(timeout=120) != 0
    assert f"unix: {private} is not a private directory of this user" in log.read_text()
    assert not (private / "loom.sock").exists() and not (temp / "elsewhere" / "loom.sock").exists()
