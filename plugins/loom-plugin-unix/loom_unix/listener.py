"""A Unix domain listening socket: stale files removed, live servers and non-sockets left alone, mode 0600."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loom_kernel import LoomError

BACKLOG = 2048  # uvicorn's default
PROBE_TIMEOUT_S = 1.0

log = logging.getLogger("loom.unix")


def default_unix_socket() -> str:
    """Where the socket goes unless the user names a path: ``$XDG_RUNTIME_DIR/loom.sock`` where the session has a
    private runtime directory, else ``loom.sock`` in ``loom-<uid>`` under the temporary directory, which ``bind``
    makes (mode 0700) and refuses to use unless it is this user's own. Never a name in a shared directory such as
    /tmp: another local user could bind it first and receive the clients' requests, API key included."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and private_directory(runtime):
        return os.path.join(runtime, "loom.sock")
    return os.path.join(tempfile.gettempdir(), f"loom-{os.getuid()}", "loom.sock")


def private_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory (not a symlink) owned by this user that no other user may enter."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def remove_stale(path: Path) -> None:
    """Delete a socket file nobody listens on; refuse when a server answers or the path is not a socket."""
    try:
        mode = os.lstat(path).st_mode  # lstat: a symlink is not ours to follow or delete
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LoomError(f"unix: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody accepts on it: left behind by a server that was killed
    except FileNotFoundError:
        return
    except TimeoutError:
        # A full backlog makes connect wait: somebody is there, so do not pull the socket from under them.
        raise LoomError(f"unix: a server on {path} does not answer in time; refusing to replace it") from None
    except OSError as exc:
        raise LoomError(f"unix: cannot check {path}: {exc.strerror or exc}") from None
    else:
        raise LoomError(f"unix: another server is listening on {path}; stop it or choose another --unix-socket")
    finally:
        probe.close()
    log.info("removing stale socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def start_lock(path: Path) -> Iterator[None]:
    """Held from the check for a stale socket file until the new socket listens: two servers started at once on one
    path would both find the file stale, and the second's removal would take away the first's socket. Refused, not
    waited for, when another server holds it (it is about to listen there). The lock file (mode 0600) stays: a
    server that removed it would let the next one lock a new file of the same name beside a holder of the old."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LoomError(f"unix: cannot bind {path}: {exc.strerror or exc} (its start lock, {lock.name})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoomError(
                f"unix: another server is starting on {path} (it holds {lock}); stop it or choose another --unix-socket"
            ) from None
        yield
    finally:
        os.close(fd)  # which releases the lock


def make_private_directory(path: Path) -> None:
    """``path`` as a directory only this user may enter (mode 0700), made if missing; refused when it exists as
    anything else: another local user who made it first could replace the socket in it."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    if not private_directory(path):
        st = os.lstat(path)
        raise LoomError(
            f"unix: {path} is not a private directory of this user (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}); another user may have made it. Remove it, or choose --unix-socket"
        )


class UnixListener:
    def __init__(self, path: str, make_directory: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.make_directory = make_directory
        self.sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created

    def bind(self) -> list[socket.socket]:
        if self.make_directory:
            make_private_directory(self.path.parent)
        with start_lock(self.path):
            remove_stale(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # bind() creates the file with the umask applied: a 0177 umask means it never exists with looser
            # permissions, not even between bind and chmod. The umask is process-wide, so keep the window tiny.
            old_umask = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            except OSError as exc:
                sock.close()
                raise LoomError(f"unix: cannot bind {self.path}: {exc.strerror or exc}") from None
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)  # explicit too, for filesystems that ignore the umask
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            # Listening before the lock is let go: a bound socket that does not listen yet refuses connections,
            # which the next server's check would take for a stale file.
            sock.listen(BACKLOG)
        self.sock = sock
        return [sock]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._identity is None:
            return
        # Remove the file only if it is still the one we bound: another server may have replaced it since.
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()
        self._identity = None
