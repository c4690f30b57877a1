"""What the interp plugin keeps for one server, on that server's kernel: the stores, the upload slots, the fit
workers. Made on first use (or at start-up), ended with the server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import attrs

from loom_interp.fitting import FIT_SECONDS, MAX_FITS, Fitter
from loom_interp.stores import (
    PROBES_DIRECTORY,
    PROBES_MAX_ENTRIES,
    PROBES_MAX_MB,
    VECTORS_DIRECTORY,
    VECTORS_MAX_ENTRIES,
    VECTORS_MAX_MB,
    Stored,
    TensorStore,
)
from loom_kernel import Kernel

MAX_UPLOADS = 2  # SAE files read and parsed at once (the next waits before its body is read)


@attrs.define(eq=False)
class Interp:
    vectors: TensorStore
    probes: TensorStore
    fitter: Fitter
    upload_slots: asyncio.Semaphore = attrs.field(factory=lambda: asyncio.Semaphore(MAX_UPLOADS))

    @contextlib.asynccontextmanager
    async def uploads(self) -> AsyncIterator[None]:
        """One of the ``MAX_UPLOADS`` upload slots."""
        async with self.upload_slots:
            yield


def interp(kernel: Kernel) -> Interp:
    """The server's stores, upload slots and fit workers, made from its settings on first use."""
    return kernel.state("interp", _make)


def check_stored_vector(item: Stored) -> None:
    """A vector file read back is one finite tensor, [D] or [P, D] (another is logged and left out, as a probe
    file its store cannot use is)."""
    if len(item.tensors) != 1:
        raise ValueError(f"{len(item.tensors)} tensors where a vector has one")
    (t,) = item.tensors.values()
    if t.ndim not in (1, 2) or t.numel() == 0 or not bool(t.isfinite().all()):
        raise ValueError(f"a tensor of shape {list(t.shape)} that is not a finite [D] or [P, D] vector")


def _make(kernel: Kernel) -> Interp:
    from loom_interp.readouts import check_stored_probe

    s = kernel.settings
    return Interp(
        vectors=TensorStore(
            "vector",
            int(VECTORS_MAX_MB.of(s) * 2**20),
            VECTORS_DIRECTORY.of(s),
            VECTORS_MAX_ENTRIES.of(s),
            check=check_stored_vector,
        ),
        probes=TensorStore(
            "probe",
            int(PROBES_MAX_MB.of(s) * 2**20),
            PROBES_DIRECTORY.of(s),
            PROBES_MAX_ENTRIES.of(s),
            check=check_stored_probe,
        ),
        fitter=Fitter(MAX_FITS.of(s), FIT_SECONDS.of(s)),
    )
