"""Named groups of tensors with metadata (steering vectors, probes, sparse autoencoders), bounded by a byte budget.

With a directory each tensor is one safetensors file, written under a temporary name, flushed to disk and renamed
over the old one, so that a crash leaves the old file or the new one, never half of one; a write or a delete is
answered only once the directory is flushed too, so that a crash after the answer does not undo it. The store reads
them back when the server first uses it. Without a directory it lives in memory only. A server (its model manager)
has one store of vectors and one of probes, under the settings ``vectors.*`` and ``probes.*``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from loom_kernel import Conflict, InsufficientStorage, InvalidField, LoomError, Option, echo

log = logging.getLogger("loom")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Between an owner (an API key's digest) and a name in the store's keys and files: never in a name, so one key's
# entries cannot be named by another's requests.
OWNED = "~"
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
SUFFIX = ".safetensors"
# What an entry costs beside its numbers and metadata: its file's header and its block on disk.
ENTRY_OVERHEAD = 4096
DEFAULT_MAX_ENTRIES = 4096
MAX_META_CHARS = 1024  # a description, a model id, a site: what an entry keeps beside its numbers (labels aside)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a used-up quota: a 507, not a fault of the server's
RECENT_NS = 2_000_000_000  # a directory changed this recently is looked at in full on every read
_HOST = socket.gethostname().replace(".", "_") or "host"


class NotFound(LoomError):
    status = 404
    title = "Not found"


@attrs.define
class Stored:
    name: str
    tensors: dict[str, Any]  # float32 CPU tensors by role ("vector"; "weight", "bias"; "W_enc", ...)
    meta: dict[str, str]

    @property
    def tensor(self) -> Any:
        """The one tensor of a single-tensor entry (a vector)."""
        (only,) = self.tensors.values()
        return only

    @property
    def shown(self) -> str:
        """The name its owner uses (the store keys it with its owner's digest in front)."""
        return self.name.rpartition(OWNED)[2]

    def same(self, other: Stored) -> bool:
        """The same numbers and fields (when each was made aside)."""
        ours, theirs = ({k: v for k, v in s.meta.items() if k != "created"} for s in (self, other))
        return (
            ours == theirs
            and self.tensors.keys() == other.tensors.keys()
            and all(
                t.shape == other.tensors[r].shape and bool((t == other.tensors[r]).all())
                for r, t in self.tensors.items()
            )
        )

    @property
    def nbytes(self) -> int:
        """Every byte the entry keeps: its numbers, its metadata, and ``ENTRY_OVERHEAD``."""
        numbers = sum(int(t.numel()) * 4 for t in self.tensors.values())
        meta = sum(len(k.encode()) + len(v.encode()) for k, v in self.meta.items())
        return numbers + meta + sum(len(role) for role in self.tensors) + ENTRY_OVERHEAD

    def describe(self) -> dict[str, Any]:
        shapes = {role: list(t.shape) for role, t in self.tensors.items()}
        out: dict[str, Any] = {"name": self.shown, "dtype": "float32", "bytes": self.nbytes, **self.meta}
        # The file keeps text; the answer gives the fields their types (a probe's labels a list, its k a number).
        if "labels" in out:
            with contextlib.suppress(ValueError):
                out["labels"] = json.loads(out["labels"])
        for key in ("k", "top_features"):
            if key in out and out[key].isdecimal():
                out[key] = int(out[key])
        if len(self.tensors) == 1:
            out.update(shape=next(iter(shapes.values())), norm=float(self.tensor.double().norm()))
        else:
            out["shapes"] = shapes
        return out


class TensorStore:
    """A store in memory, or over a directory that several processes (Ray replicas) may share.

    Over a directory, the files are the truth: every read first looks whether the directory changed (one ``stat``;
    a full look while its time stamp is recent, finer than the file system's clock) and reads what other processes
    wrote, replaced or deleted; every write holds the directory's lock file (``flock``) from the budget check to the
    rename, so two processes never pass the budget together or clobber each other's files. Temporary files carry the
    host and process that write them; a starting store removes only those of its own host's dead processes.
    """

    def __init__(
        self,
        kind: str,
        max_bytes: int,
        directory: str | os.PathLike[str] | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        check: Callable[[Stored], None] | None = None,
    ) -> None:
        self.kind, self.max_bytes, self.max_entries = kind, max_bytes, max_entries
        self.directory = Path(directory) if directory else None
        # Validates an entry read from the directory (a file written by hand, or by an older version).
        self.check = check
        self.items: dict[str, Stored] = {}
        self._lock = threading.RLock()
        self._seen: dict[str, tuple[int, int, int]] = {}  # name -> (mtime_ns, size, inode) of the file last read
        self._looked: int | None = None  # the directory's mtime_ns at the last full look
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._remove_leftovers()
            with self._lock:
                self._refresh(force=True)
            log.info("%s store: %d read from %s (%d bytes)", self.kind, len(self.items), self.directory, self.used)

    @property
    def used(self) -> int:
        return sum(item.nbytes for item in self.items.values())

    def admissible(self, name: str, meta: dict[str, str | None]) -> None:
        """A name and metadata ``put`` takes (a 422 naming the field otherwise): checked before a fit's work too."""
        if not NAME.match(name):
            raise InvalidField(f"name: {echo(name)} is not a valid {self.kind} name", field="name", allowed=NAME_RULE)
        long = next((k for k, v in meta.items() if v and k != "labels" and len(v) > MAX_META_CHARS), None)
        if long is not None:
            raise InvalidField(
                f"{long}: {len(str(meta[long]))} characters", field=long, allowed=f"at most {MAX_META_CHARS} characters"
            )

    def put(
        self, name: str, tensors: Any, meta: dict[str, str | None], replace: bool = False, owner: str = ""
    ) -> tuple[Stored, bool]:
        """Store ``tensors`` (a dict of them by role, or one tensor, kept under the store's kind) under ``owner``'s
        ``name``; (the entry, whether it is new or changed). The same content again under its name is no change
        (a notebook cell run twice), other content a 409 unless ``replace``."""
        self.admissible(name, meta)
        group = tensors if isinstance(tensors, dict) else {self.kind: tensors}
        key = _key(owner, name)
        item = Stored(
            key,
            {role: t.detach().float().cpu().contiguous() for role, t in group.items()},
            {k: v for k, v in meta.items() if v},
        )
        item.meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with self._lock, self._directory_lock():
            self._refresh(force=True)
            if key in self.items and self.items[key].same(item):
                return self.items[key], False
            if key in self._seen and key not in self.items and not replace:
                raise Conflict(
                    f"name: a {self.kind} named {name!r} is in the store's directory but this server cannot use it "
                    "(the log says why: another version's file?); send replace: true to overwrite it",
                    field="name",
                )
            if key in self.items and not replace:
                raise Conflict(
                    f"name: a {self.kind} named {name!r} exists with other content; send replace: true to overwrite "
                    "it (the same content again is no conflict)",
                    field="name",
                )
            if key not in self.items and len(self.items) >= self.max_entries:
                raise InsufficientStorage(
                    f"{self.kind}s: the store holds its limit of {self.max_entries} entries; delete some or raise "
                    f"the server's {self.kind}s.max_entries",
                    field=self.kind,
                )
            freed = self.items[key].nbytes if key in self.items else 0
            if self.used - freed + item.nbytes > self.max_bytes:
                raise InsufficientStorage(
                    f"{self.kind}s: storing {name!r} ({item.nbytes} bytes, its metadata included) would pass the "
                    f"budget of {self.max_bytes} bytes ({self.used} used); delete some or raise the server's "
                    f"{self.kind}s.max_mb",
                    field=self.kind,
                )
            if self.directory is not None:
                self._seen[key] = self._write(item)
            self.items[key] = item
        return item, True

    def get(self, name: str, owner: str = "") -> Stored:
        item = self.find(name, owner)
        if item is None:
            raise NotFound(f"name: no {self.kind} named {echo(name)}", field="name", allowed=self.names(owner))
        return item

    def tensor(self, name: str, owner: str = "") -> Any | None:
        item = self.find(name, owner)
        return None if item is None else item.tensor

    def find(self, name: str, owner: str = "") -> Stored | None:
        with self._lock:
            self._refresh()
            return self.items.get(_key(owner, name))

    def names(self, owner: str = "") -> list[str]:
        """``owner``'s names (an API key's entries; "" those stored without a key)."""
        with self._lock:
            self._refresh()
            return sorted(item.shown for item in self._owned(owner))

    def listing(self, owner: str = "") -> dict[str, Any]:
        """What ``GET /vectors`` or ``GET /probes`` answers: ``owner``'s items, and the store's bytes (every
        owner's: the budget is the server's)."""
        with self._lock:
            self._refresh()
            return {
                f"{self.kind}s": [item.describe() for item in self._owned(owner)],
                "bytes": self.used,
                "max_bytes": self.max_bytes,
                "entries": len(self.items),
                "max_entries": self.max_entries,
                "persistent": self.directory is not None,
            }

    def delete(self, name: str, owner: str = "") -> None:
        with self._lock, self._directory_lock():
            self._refresh(force=True)
            key = self.get(name, owner).name
            if self.directory is not None:
                (self.directory / f"{key}{SUFFIX}").unlink(missing_ok=True)
                self._sync_directory()
                self._seen.pop(key, None)
            del self.items[key]

    def _owned(self, owner: str) -> list[Stored]:
        return [item for item in self.items.values() if item.name.rpartition(OWNED)[0] == owner]

    # -- the directory ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _directory_lock(self) -> Iterator[None]:
        """The directory's lock, across processes (none in memory)."""
        if self.directory is None:
            yield
            return
        import fcntl

        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _refresh(self, force: bool = False) -> None:
        """Under ``_lock``: the entries as the directory holds them now."""
        if self.directory is None:
            return
        stamp = os.stat(self.directory).st_mtime_ns
        recent = time.time_ns() - stamp < RECENT_NS  # changes within one tick of a coarse clock share a stamp
        if not force and stamp == self._looked and not recent:
            return
        self._looked = stamp
        present: dict[str, tuple[int, int, int]] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):  # deleted since the listing
                        st = entry.stat()
                        present[entry.name[: -len(SUFFIX)]] = (st.st_mtime_ns, st.st_size, st.st_ino)
        for name in [n for n in self.items if n not in present]:
            del self.items[name]
        for name in [n for n in self._seen if n not in present]:
            del self._seen[name]
        for name, seen in present.items():
            if self._seen.get(name) != seen:
                self._seen[name] = seen  # read once per version, also when it cannot be read
                self._read(name)

    def _read(self, name: str) -> None:
        from safetensors import safe_open

        assert self.directory is not None
        path = self.directory / f"{name}{SUFFIX}"
        self.items.pop(name, None)
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {role: f.get_tensor(role).float() for role in f.keys()}  # noqa: SIM118
                item = Stored(name, tensors, dict(f.metadata() or {}))
            if self.check is not None:
                self.check(item)
        except FileNotFoundError:
            return  # deleted by another process since the listing
        except Exception as exc:  # one bad file must not stop the server or hide the others
            log.error("%s store: cannot use %s: %s", self.kind, path, getattr(exc, "detail", exc))
            return
        self.items[name] = item

    def _write(self, item: Stored) -> tuple[int, int, int]:
        """Under the directory's lock: ``item`` written under a temporary name of this process, flushed and renamed
        over its file; (mtime_ns, size, inode) of the file. A disk without room for it is a 507, the old file kept."""
        from safetensors.torch import save

        assert self.directory is not None
        final = self.directory / f"{item.name}{SUFFIX}"
        temporary = self.directory / f".{item.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        # Written here, not by safetensors' save_file, whose I/O errors arrive as text without their errno: a full
        # disk must be told from a fault of the server's.
        data = memoryview(save(item.tensors, metadata=item.meta))
        try:
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    while data:
                        data = data[os.write(fd, data) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                if exc.errno not in NO_ROOM:
                    raise
                log.error("%s store: cannot write %s: %s", self.kind, final, exc)
                raise InsufficientStorage(
                    f"{self.kind}s: {item.shown!r} was not stored: the disk of the store's directory has no room for "
                    f"it ({os.strerror(exc.errno)}); the store is as it was. Free space on that disk, or delete some "
                    f"{self.kind}s",
                    field=self.kind,
                ) from None
            os.replace(temporary, final)
            self._sync_directory()
        finally:
            temporary.unlink(missing_ok=True)
        st = os.stat(final)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _sync_directory(self) -> None:
        """The directory's own entries flushed to disk: a rename or an unlink survives a crash only once they are."""
        assert self.directory is not None
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _remove_leftovers(self) -> None:
        """Temporary files of this host's processes that died mid-write (their old files are intact); another
        process's write in progress, or another host's, is left alone."""
        assert self.directory is not None
        for leftover in self.directory.glob(".*.tmp"):
            parts = leftover.name.rsplit(".", 4)  # ".<name>", host, pid, token, "tmp"
            if len(parts) == 5 and (parts[1] != _HOST or not parts[2].isdigit() or _alive(int(parts[2]))):
                continue
            leftover.unlink(missing_ok=True)


def stored(item: Stored, changed: bool, **more: Any) -> Any:
    """A store's answer: 201 for a new or replaced entry, 200 for the same one sent again."""
    from litestar import Response

    content = {**more, "stored": item.describe()} if more else item.describe()
    return Response(content=content, status_code=201 if changed else 200)


def _key(owner: str, name: str) -> str:
    return f"{owner}{OWNED}{name}" if owner else name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# A directory keeps a store across restarts (one safetensors file per entry); unset, it lives in memory.
VECTORS_DIRECTORY = Option("vectors", "directory", None, "where stored steering vectors persist")
VECTORS_MAX_MB = Option("vectors", "max_mb", 64.0, "MiB all stored vectors may take (beyond: 507)", minimum=0)
VECTORS_MAX_ENTRIES = Option("vectors", "max_entries", 4096, "vectors the store may hold (beyond: 507)", minimum=1)
PROBES_DIRECTORY = Option("probes", "directory", None, "where stored probes and sparse autoencoders persist")
PROBES_MAX_MB = Option("probes", "max_mb", 512.0, "MiB all stored probes may take (beyond: 507)", minimum=0)
PROBES_MAX_ENTRIES = Option("probes", "max_entries", 1024, "probes the store may hold (beyond: 507)", minimum=1)
