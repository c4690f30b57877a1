"""Named groups of tensors with metadata (steering vectors, probes, sparse autoencoders), bounded by a byte budget.

With a directory each tensor is one safetensors file, written under a temporary name, flushed to disk and renamed
over the old one, so that a crash leaves the old file or the new one, never half of one; the store reads them back
when the server first uses it. Without a directory it lives in memory only. A server (its model manager) has one
store of vectors and one of probes, under the settings ``vectors.*`` and ``probes.*``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import attrs

from loom_kernel import Option, echo
from loom_kernel.errors import Conflict, InsufficientStorage, InvalidField, LoomError

log = logging.getLogger("loom")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"


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
    def nbytes(self) -> int:
        return sum(int(t.numel()) * 4 for t in self.tensors.values())

    def describe(self) -> dict[str, Any]:
        shapes = {role: list(t.shape) for role, t in self.tensors.items()}
        out: dict[str, Any] = {"name": self.name, "dtype": "float32", "bytes": self.nbytes, **self.meta}
        if len(self.tensors) == 1:
            out.update(shape=next(iter(shapes.values())), norm=float(self.tensor.double().norm()))
        else:
            out["shapes"] = shapes
        return out


class TensorStore:
    def __init__(self, kind: str, max_bytes: int, directory: str | os.PathLike[str] | None = None) -> None:
        self.kind, self.max_bytes = kind, max_bytes
        self.directory = Path(directory) if directory else None
        self.items: dict[str, Stored] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._read_all()

    @property
    def used(self) -> int:
        return sum(item.nbytes for item in self.items.values())

    def put(self, name: str, tensors: Any, meta: dict[str, str | None], replace: bool = False) -> Stored:
        """Store ``tensors`` (a dict of them by role, or one tensor, kept under the store's kind) under ``name``."""
        if not NAME.match(name):
            raise InvalidField(f"name: {echo(name)} is not a valid {self.kind} name", field="name", allowed=NAME_RULE)
        if name in self.items and not replace:
            raise Conflict(
                f"name: a {self.kind} named {name!r} exists; send replace: true to overwrite it", field="name"
            )
        group = tensors if isinstance(tensors, dict) else {self.kind: tensors}
        item = Stored(
            name,
            {role: t.detach().float().cpu().contiguous() for role, t in group.items()},
            {k: v for k, v in meta.items() if v},
        )
        item.meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        freed = self.items[name].nbytes if name in self.items else 0
        if self.used - freed + item.nbytes > self.max_bytes:
            raise InsufficientStorage(
                f"{self.kind}s: storing {name!r} ({item.nbytes} bytes) would pass the budget of {self.max_bytes} bytes "
                f"({self.used} used); delete some or raise the server's {self.kind}s.max_mb",
                field=self.kind,
            )
        if self.directory is not None:
            self._write(item)
        self.items[name] = item
        return item

    def get(self, name: str) -> Stored:
        item = self.items.get(name)
        if item is None:
            raise NotFound(f"name: no {self.kind} named {echo(name)}", field="name", allowed=sorted(self.items))
        return item

    def tensor(self, name: str) -> Any | None:
        item = self.items.get(name)
        return None if item is None else item.tensor

    def find(self, name: str) -> Stored | None:
        return self.items.get(name)

    def listing(self) -> dict[str, Any]:
        """What ``GET /vectors`` or ``GET /probes`` answers: every item, and the store's bytes."""
        return {
            f"{self.kind}s": [item.describe() for item in self.items.values()],
            "bytes": self.used,
            "max_bytes": self.max_bytes,
            "persistent": self.directory is not None,
        }

    def delete(self, name: str) -> None:
        self.get(name)
        if self.directory is not None:
            (self.directory / f"{name}.safetensors").unlink(missing_ok=True)
        del self.items[name]

    def _write(self, item: Stored) -> None:
        from safetensors.torch import save_file

        assert self.directory is not None
        final = self.directory / f"{item.name}.safetensors"
        temporary = self.directory / f".{item.name}.{os.getpid()}.tmp"
        try:
            save_file(item.tensors, str(temporary), metadata=item.meta)
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temporary, final)
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        finally:
            temporary.unlink(missing_ok=True)

    def _read_all(self) -> None:
        from safetensors import safe_open

        assert self.directory is not None
        for leftover in self.directory.glob(".*.tmp"):  # a write a crash interrupted: its old file is intact
            leftover.unlink(missing_ok=True)
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    tensors = {role: f.get_tensor(role).float() for role in f.keys()}  # noqa: SIM118
                    item = Stored(path.stem, tensors, dict(f.metadata() or {}))
            except Exception as exc:  # one unreadable file must not stop the server or hide the others
                log.error("%s store: cannot read %s: %s", self.kind, path, exc)
                continue
            self.items[item.name] = item
        log.info("%s store: %d read from %s (%d bytes)", self.kind, len(self.items), self.directory, self.used)


@attrs.define(frozen=True)
class Stores:
    vectors: TensorStore
    probes: TensorStore


# A directory keeps a store across restarts (one safetensors file per entry); unset, it lives in memory.
VECTORS_DIRECTORY = Option("vectors", "directory", None, "where stored steering vectors persist")
VECTORS_MAX_MB = Option("vectors", "max_mb", 64.0, "MiB all stored vectors may take (beyond: 507)", minimum=0)
PROBES_DIRECTORY = Option("probes", "directory", None, "where stored probes and sparse autoencoders persist")
PROBES_MAX_MB = Option("probes", "max_mb", 512.0, "MiB all stored probes may take (beyond: 507)", minimum=0)

_STORES: weakref.WeakKeyDictionary[Any, Stores] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def stores(manager: Any) -> Stores:
    """The stores of the server ``manager`` runs (one pair per app), made from its settings on first use."""
    with _LOCK:
        found = _STORES.get(manager)
        if found is None:
            s = manager.settings
            found = _STORES[manager] = Stores(
                vectors=TensorStore("vector", int(VECTORS_MAX_MB.of(s) * 2**20), VECTORS_DIRECTORY.of(s)),
                probes=TensorStore("probe", int(PROBES_MAX_MB.of(s) * 2**20), PROBES_DIRECTORY.of(s)),
            )
        return found
