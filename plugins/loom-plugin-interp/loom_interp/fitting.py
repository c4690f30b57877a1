"""``/probes/fit``'s scikit-learn part, in worker processes of its own: a fit is one uninterruptible call into
scikit-learn, so the only way to stop one that runs past ``probes.fit_seconds``, or whose client left, is to end
the process it runs in. At most ``probes.max_fits`` fits run at once (the next waits); a worker is spawned on first
use, kept for the next fit, and ended when a fit is stopped. A worker that dies (killed, or crashed) fails the fit
it was running with a 503, and the next fit gets a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
from typing import Any

from loom_kernel import LoomError, Option

log = logging.getLogger("loom")

FIT_SECONDS = Option(
    "probes", "fit_seconds", 300.0, "seconds a POST /probes/fit may spend fitting (past it: 503)", minimum=0
)
MAX_FITS = Option("probes", "max_fits", 1, "fits that may run at once (the next waits)", minimum=1)
FIT_OPTIONS = [FIT_SECONDS, MAX_FITS]


class FitStopped(LoomError):
    """A fit that did not finish: past ``probes.fit_seconds``, or its worker process died."""

    status = 503
    title = "Fit stopped"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def train(x: Any, y: Any, classes: list[str], folds: int) -> dict[str, Any]:
    """LogisticRegression fitted on ``x`` [n, H] and ``y`` (class indices), with ``folds``-fold stratified
    cross-validation; runs in a worker process."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    y = np.asarray(y)
    clf = LogisticRegression(max_iter=2000)
    cv = cross_val_score(
        LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0)
    )
    clf.fit(x, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(classes) == 2:  # sklearn's binary model is one logit: softmax([0, z]) gives the same probabilities
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    return {
        "weight": coef,
        "bias": intercept,
        "train_accuracy": float(clf.score(x, y)),
        "cv_accuracy": float(cv.mean()),
    }


def _serve(conn: Any) -> None:
    """A worker's loop: (function, args) in, ("ok", result), ("refused", text) or ("error", text) out, until the
    pipe closes."""
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(*args)))
        except ValueError as exc:  # scikit-learn's word for data it cannot fit: the request's fault, not the server's
            conn.send(("refused", str(exc)))
        except Exception as exc:  # the fit's own failure, reported to the server
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Worker:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the server's threads (torch's) must not be copied
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), name="loom-fit", daemon=True)
        self.process.start()
        child.close()

    def call(self, fn: Any, *args: Any) -> Any:
        self.conn.send((fn, args))
        kind, value = self.conn.recv()  # EOFError once the process is ended
        if kind == "refused":
            raise ValueError(value)
        if kind == "error":
            raise RuntimeError(value)
        return value

    def end(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class Fitter:
    """The worker processes of one server (one per fit running at once)."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size, self.seconds = size, seconds
        self.idle: list[Worker] = []
        self._slots = asyncio.Semaphore(size)
        self._lock = threading.Lock()
        self.stopped = 0  # fits ended before they finished (past the time, or their client gone)
        self.busy: list[Worker] = []  # the workers fitting now

    async def run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker: FitStopped past ``seconds`` or when the worker dies, ValueError when ``fn``
        raised one (its data refused); a cancelled call ends its worker."""
        async with self._slots:
            return await self._run(fn, *args)

    async def _run(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            worker = self.idle.pop() if self.idle else None
        if worker is not None and not worker.process.is_alive():  # died while idle
            worker.end()
            worker = None
        if worker is None:
            spawn = asyncio.ensure_future(asyncio.to_thread(Worker))
            try:
                worker = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                spawn.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().end())
                raise
        self.busy.append(worker)
        call = asyncio.ensure_future(asyncio.to_thread(worker.call, fn, *args))
        kept = False
        try:
            result = await asyncio.wait_for(asyncio.shield(call), self.seconds or None)
            kept = True
            return result
        except TimeoutError:
            self._stop(worker, call)
            raise FitStopped(
                f"fit: took longer than this server's probes.fit_seconds of {self.seconds:g} s and was stopped; "
                "fit on fewer texts or classes, or raise the limit",
                field="texts",
            ) from None
        except (EOFError, OSError):  # its pipe closed: the worker died (TimeoutError, an OSError, is caught above)
            worker.end()
            ended = _ended(worker.process.exitcode)
            log.error("a probe fit's worker process %s died: %s", worker.process.pid, ended)
            raise FitStopped(
                f"fit: its worker process died before the fit finished ({ended}); nothing was stored, and the next "
                "fit runs in a new worker. Try again, or fit on fewer texts if it dies again"
            ) from None
        except ValueError:  # the data refused, the worker unharmed
            kept = True
            raise
        except asyncio.CancelledError:  # the client left, or the request ran out of time
            self._stop(worker, call)
            raise
        finally:
            self.busy.remove(worker)
            if kept:
                with self._lock:
                    self.idle.append(worker)
            else:  # stopped, or failed on its own: a fresh worker next time
                worker.end()

    def _stop(self, worker: Worker, call: asyncio.Future) -> None:
        self.stopped += 1
        log.info("a probe fit was stopped (its worker process %s ended)", worker.process.pid)
        worker.end()
        call.add_done_callback(lambda f: f.cancelled() or f.exception())  # its EOFError is expected

    def close(self) -> None:
        with self._lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            with contextlib.suppress(Exception):
                worker.end()


def _ended(code: int | None) -> str:
    """How a worker process ended, from its exit code (negative: the signal that ended it)."""
    if code is not None and code < 0:
        try:
            return f"killed by signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
