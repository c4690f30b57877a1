"""Admission: every request reaches its model here. At most ``max_queue`` requests per model at once (the next is
a 429), each on a request thread of its own, cancelled when its client leaves or its time runs out (a 504)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from loom_kernel.batching import Cancelled, Ticket, run_with_ticket
from loom_kernel.config import Settings
from loom_kernel.errors import LoomError, RequestTimeout, TooManyRequests
from loom_kernel.openmp import one_torch_thread
from loom_kernel.types import LoadedModel

if TYPE_CHECKING:
    from loom_kernel.models import ModelEntry

log = logging.getLogger("loom.models")
T = TypeVar("T")


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Request threads: each request's own work runs here, its forward calls on its model's thread. Enough for
        # every admitted request of every model, so none waits for a thread behind another model's queue. Torch runs
        # single-threaded on them (loom_kernel.openmp: their OpenMP teams would slow the model threads' passes).
        self.threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, settings.max_queue * max(1, settings.max_models)),
            thread_name_prefix="loom-request",
            initializer=one_torch_thread,
        )

    async def run(
        self, entry: ModelEntry, fn: Callable[[LoadedModel], T], until: Coroutine[Any, Any, None] | None = None
    ) -> T:
        """``fn(model)`` on a request thread, its forward calls batched on the model's thread.

        At most ``max_queue`` requests per model are admitted at once (queued or running); the next is a 429 with
        a Retry-After estimated from recent batches. The request is cancelled (dropped if still queued, its
        generated rows stopped) when ``until`` returns first (the client went away) and when it runs past
        ``request_timeout`` (a 504). The model stays in flight (never unloaded) until the request's thread is done
        with it.
        """
        loaded = self._admit(entry, until)
        ticket = Ticket(entry.worker)
        entry.in_flight += 1
        job = self.threads.submit(run_with_ticket, ticket, lambda: fn(loaded))
        job.add_done_callback(self._release(entry))  # before the awaiting side's: in_flight drops before the answer

        def cancel() -> None:
            ticket.cancel()
            job.cancel()

        return await self._wait(entry, job, cancel, until)

    def _admit(self, entry: ModelEntry, until: Coroutine[Any, Any, None] | None) -> LoadedModel:
        """The model, if it is loaded and its queue has room (else ModelNotFound, or the 429)."""
        try:
            loaded = entry.model()
            limit = self.settings.max_queue
            if limit and entry.in_flight >= limit:
                wait = entry.worker.seconds_per_batch * entry.in_flight / max(1, self.settings.max_batch_size)
                retry = max(1, math.ceil(wait))
                raise TooManyRequests(
                    f"model: {entry.model_id!r} has {entry.in_flight} requests in flight, its queue limit "
                    f"(max_queue {limit}); retry after {retry} s",
                    field="model",
                    retry_after=retry,
                    max_queue=limit,
                )
        except LoomError:
            if until is not None:
                until.close()
            raise
        return loaded

    @staticmethod
    def _release(entry: ModelEntry) -> Callable[[concurrent.futures.Future], None]:
        """A done callback (on whichever thread finishes the job) that ends the request's hold on the model."""
        loop = asyncio.get_running_loop()

        def done(_: concurrent.futures.Future) -> None:
            def release() -> None:
                entry.in_flight -= 1
                entry.last_used = time.monotonic()

            loop.call_soon_threadsafe(release)

        return done

    async def _wait(
        self,
        entry: ModelEntry,
        job: concurrent.futures.Future[T],
        cancel: Callable[[], None],
        until: Coroutine[Any, Any, None] | None,
    ) -> T:
        """``job``'s result; ``cancel()`` and Cancelled when ``until`` returns first, RequestTimeout past the limit."""
        result = asyncio.wrap_future(job)
        watcher = asyncio.ensure_future(until) if until is not None else None
        timeout = self.settings.request_timeout or None
        try:
            finished, _ = await asyncio.wait(
                {result} if watcher is None else {result, watcher}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        except asyncio.CancelledError:
            cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if result in finished:
            return result.result()
        cancel()
        if watcher is not None and watcher in finished:
            log.info("%s: the client went away; its request was cancelled", entry.model_id)
            raise Cancelled("request: the client closed the connection")
        raise RequestTimeout(
            f"request: took longer than this server's request_timeout of {timeout:g} s; it was stopped",
            field="request_timeout",
            allowed=f"up to {timeout:g} s",
        )
