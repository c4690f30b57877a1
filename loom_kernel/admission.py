"""Admission: the one way a request reaches its model. At most ``max_queue`` requests per model at once (the next
is a 429); each gets a ``Session`` through which its forward calls queue on the model's thread and its own CPU
work runs on a request thread; it is cancelled when its client leaves or its time runs out (a 504)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from loom_kernel.batching import ModelThread
from loom_kernel.calls import Cancelled, Ticket
from loom_kernel.config import Settings
from loom_kernel.errors import LoomError, RequestTimeout, TooManyRequests
from loom_kernel.inputs import tokenize_rows
from loom_kernel.openmp import one_torch_thread
from loom_kernel.types import Batch, Capture, ForwardOutput, LoadedModel

if TYPE_CHECKING:
    from loom_kernel.entry import ModelEntry

log = logging.getLogger("loom.models")
T = TypeVar("T")


@attrs.define(eq=False)
class Session:
    """One admitted request's way to its model: ``forward`` queues a call on the model's thread (merged there with
    other requests'), ``thread`` runs the request's own CPU work (encoding, metrics) off the event loop."""

    pm: pluggy.PluginManager
    model: LoadedModel
    worker: ModelThread
    threads: concurrent.futures.Executor
    ticket: Ticket = attrs.field(factory=Ticket)
    calls: list[concurrent.futures.Future] = attrs.field(factory=list)

    async def forward(self, batch: Batch, capture: Capture, then: Callable[[ForwardOutput], T] | None = None) -> Any:
        """The call's rows, or ``then(rows)`` computed on the model's thread right after its pass (for a few small
        tensor operations, which a request thread would otherwise wake up for while the next pass runs). A
        generation's rows are tokenized and checked here, on a request thread, before they are queued."""
        if batch.generation is not None and self.model.decoder is not None:
            batch, refused = await self.thread(tokenize_rows, self.model, batch)
            if (error := next((r for r in refused if r is not None), None)) is not None:
                raise error
        future = self.worker.enqueue(self.ticket, self.pm, self.model, batch, capture, then)
        self.calls.append(future)
        # Shielded: a cancelled request cancels its ticket (its call leaves the queue, its rows stop), never the
        # future the model's thread answers. Once the request is gone nobody awaits that future, so its error (the
        # call dropped as cancelled) is marked seen here, not reported by asyncio as "never retrieved".
        answer = asyncio.wrap_future(future)
        answer.add_done_callback(_seen)
        return await asyncio.shield(answer)

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn, *args)


class Admission:
    def __init__(self, pm: pluggy.PluginManager, settings: Settings) -> None:
        self.pm = pm
        self.settings = settings
        # Request threads: a request's own CPU work. Enough for every admitted request of every model, so none waits
        # for a thread behind another model's queue. Torch runs single-threaded on them (loom_kernel.openmp: their
        # OpenMP teams would slow the model threads' passes).
        self.threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, settings.max_queue * max(1, settings.max_models)),
            thread_name_prefix="loom-request",
            initializer=one_torch_thread,
        )

    def run(
        self,
        entry: ModelEntry,
        work: Callable[[Session], Awaitable[T]],
        until: Coroutine[Any, Any, None] | None = None,
    ) -> Coroutine[Any, Any, T]:
        """``work(session)`` for one request, admitted: at most ``max_queue`` requests per model at once (queued or
        running); the next is a 429 with a Retry-After estimated from recent batches, raised here, when the call is
        made, so that a stream is refused before its answer starts (and once more when it runs, for those that came
        meanwhile). The request is cancelled (its queued calls dropped, its generated rows stopped) when ``until``
        returns first (the client went away) and when it runs past ``request_timeout`` (a 504). The model stays in
        flight (never unloaded) until every call the request queued is done."""
        self._admit(entry, until)
        return self._run(entry, work, until)

    async def _run(
        self,
        entry: ModelEntry,
        work: Callable[[Session], Awaitable[T]],
        until: Coroutine[Any, Any, None] | None,
    ) -> T:
        loaded = self._admit(entry, until)
        session = Session(self.pm, loaded, entry.worker, self.threads)
        entry.in_flight += 1
        task = asyncio.ensure_future(work(session))

        def cancel() -> None:
            session.ticket.cancel()
            task.cancel()

        try:
            return await self._wait(entry, task, cancel, until)
        finally:
            _release(entry, task, session.calls)

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

    async def _wait(
        self,
        entry: ModelEntry,
        task: asyncio.Future[T],
        cancel: Callable[[], None],
        until: Coroutine[Any, Any, None] | None,
    ) -> T:
        """``task``'s result; ``cancel()`` and Cancelled when ``until`` returns first, RequestTimeout past the
        limit."""
        watcher = asyncio.ensure_future(until) if until is not None else None
        timeout = self.settings.request_timeout or None
        try:
            finished, _ = await asyncio.wait(
                {task} if watcher is None else {task, watcher}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        except asyncio.CancelledError:
            cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if task in finished:
            if task.cancelled() or task.exception() is not None:
                cancel()  # what the failed work still has queued or generating (a gather's siblings) stops
            return task.result()
        cancel()
        if watcher is not None and watcher in finished:
            log.info("%s: the client went away; its request was cancelled", entry.model_id)
            raise Cancelled("request: the client closed the connection")
        raise RequestTimeout(
            f"request: took longer than this server's request_timeout of {timeout:g} s; it was stopped",
            field="request_timeout",
            allowed=f"up to {timeout:g} s",
        )


def _seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _release(entry: ModelEntry, task: asyncio.Future, calls: list[concurrent.futures.Future]) -> None:
    """End the request's hold on the model once its work and every call it queued are done (at once when they
    are: in_flight drops before the answer leaves)."""
    loop = asyncio.get_running_loop()
    left = [task, *calls]

    def done(item: Any = None) -> None:
        if item in left:
            left.remove(item)
        if not left:
            entry.in_flight -= 1
            entry.last_used = time.monotonic()

    for item in list(left):
        if item.done():
            done(item)
        elif isinstance(item, asyncio.Future):
            item.add_done_callback(done)
        else:
            item.add_done_callback(lambda f: loop.call_soon_threadsafe(done, f))
