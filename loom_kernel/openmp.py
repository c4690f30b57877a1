"""One OpenMP thread for torch on the threads that are not a model's (request threads).

A torch operation big enough to run in parallel starts an OpenMP team owned by the thread that calls it, and each
team keeps its own worker threads. Once libgomp's threads outnumber the cores it throttles their spinning, so the
model thread's workers fall asleep between the hundreds of small parallel regions of a forward pass: measured here,
a pass of a 12-layer GPT-2 took 10-20% longer once a request thread had encoded one large answer. A request
thread's own work (encoding, pooling) gains little from a second core anyway.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger("loom")


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (GNU or Intel), found among the process's mapped libraries: the one in
    torch's own directory, since other wheels (scikit-learn, ...) map runtimes of their own beside it."""
    import torch

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line or "/libiomp" in line}
    except OSError:  # no /proc (not Linux): leave the default
        return None
    home = os.path.dirname(torch.__file__) + os.sep
    mine = [p for p in paths if p.startswith(home)] or (sorted(paths) if len(paths) == 1 else [])
    for path in mine:
        try:
            lib = ctypes.CDLL(path)  # already loaded: dlopen hands back the same library
        except OSError:
            continue
        if hasattr(lib, "omp_set_num_threads"):
            return lib
    return None


def one_torch_thread() -> None:
    """Make torch run single-threaded on the calling thread only (the model threads keep theirs)."""
    import torch

    torch.get_num_threads()  # torch's once-per-thread setup first: it would set the count back later
    lib = _runtime()
    if lib is None:
        log.debug("no OpenMP runtime found; request threads keep torch's thread count")
        return
    lib.omp_set_num_threads(1)
