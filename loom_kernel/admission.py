"""Admission: the one way a request reaches its model. At most ``max_queue`` requests per model at once, per API key
on a server with several (the next is a 429: one key filling its queue leaves the others theirs); each gets a
``Session`` through which its forward calls queue on the model's thread and its own CPU work runs on a request
thread; it is cancelled when its client leaves or its time runs out (a 504).

A request counts in its model's ``in_flight`` (which keeps the model from eviction, idle unload and reload) from the
moment ``ModelManager.get`` gives it the model until its response has ended and every call it queued is done: its
``Hold``. ``holding`` scopes the holds to each HTTP request, so that whatever a route awaits between getting its model
and running on it (resolving plugin fields, tokenizing a chat, starting a stream) happens on a model that stays.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from loom_kernel.batching import ModelThread
from loom_kernel.calls import CALLER, Cancelled, Ticket
from loom_kernel.config import Settings
from loom_kernel.errors import LoomError, RequestTimeout, TooManyRequests
from loom_kernel.inputs import tokenize_rows
from loom_kernel.openmp import one_torch_thread
from loom_kernel.types import Batch, Capture, ForwardOutput, LoadedModel

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from loom_kernel.entry import ModelEntry

log = logging.getLogger("loom.models")
T = TypeVar("T")


@attrs.define(eq=False)
class Hold:
    """One request's count in its model's ``in_flight``: counted once while anything keeps it (the request itself,
    and each run of its work until that work and every call it queued are done)."""

    entry: ModelEntry
    keepers: int = 0
    owner: str = attrs.field(factory=CALLER.get)

    def keep(self) -> Callable[[], None]:
        """Keep the model in flight; the function returned lets go (once, however often it is called)."""
        if not self.keepers:
            self.entry.in_flight += 1
            self.entry.flights[self.owner] = self.entry.flights.get(self.owner, 0) + 1
        self.keepers += 1
        kept = True

        def release() -> None:
            nonlocal kept
            if not kept:
                return
            kept = False
            self.keepers -= 1
            if not self.keepers:
                self.entry.in_flight -= 1
                left = self.entry.flights.pop(self.owner) - 1
                if left:
                    self.entry.flights[self.owner] = left
                self.entry.last_used = time.monotonic()

        return release


@attrs.define(eq=False)
class Holds:
    """The holds of one HTTP request, by model, each with what lets go of the request's own keep."""

    held: dict[ModelEntry, tuple[Hold, Callable[[], None]]] = attrs.field(factory=dict)
    ended: bool = False

    def end(self) -> None:
        self.ended = True
        for _, release in self.held.values():
            release()


# The HTTP request being served; None outside one (preload, code that calls the manager directly).
REQUEST: ContextVar[Holds | None] = ContextVar("loom_request_holds", default=None)


def holding(handler: ASGIApp) -> ASGIApp:
    """The app's ASGI handler, every HTTP request of it with its own ``Holds``, let go of when the request ends
    however it ends (answered, failed, its client gone, cancelled): as the whole response's last message is sent, a
    stream's included, else when the handler returns."""

    async def holding_handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await handler(scope, receive, send)
            return
        holds = Holds()

        async def sending(message: Message) -> None:
            # The client may act on the response's end at once (unload the model): let go before it leaves, not when
            # the handler returns, which a stream's does some loop turns later (Litestar's waits for its disconnect
            # listener), when a pipelined DELETE has already run (a 409, "1 request(s) in flight").
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                holds.end()
            await send(message)

        token = REQUEST.set(holds)
        try:
            await handler(scope, receive, sending)
        finally:
            REQUEST.reset(token)
            holds.end()

    return holding_handler


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

    def hold(self, entry: ModelEntry) -> Hold | None:
        """The HTTP request's hold on ``entry``, taken now if it has none: at most ``max_queue`` requests per model
        at once (queued, running, or between getting the model and running on it); the next is a 429 with a
        Retry-After estimated from recent batches. None outside a request."""
        holds = REQUEST.get()
        if holds is None or holds.ended:
            return None
        if entry not in holds.held:
            self._room(entry)
            hold = Hold(entry)
            holds.held[entry] = (hold, hold.keep())
        return holds.held[entry][0]

    def run(
        self,
        entry: ModelEntry,
        work: Callable[[Session], Awaitable[T]],
        until: Coroutine[Any, Any, None] | None = None,
    ) -> Coroutine[Any, Any, T]:
        """``work(session)`` for one request, admitted (``hold``): in a request that got ``entry`` from the manager
        it was admitted then; otherwise it is here, when the call is made, so that a stream is refused before its
        answer starts, and once more when it runs, for those that came meanwhile. The request is cancelled (its
        queued calls dropped, its generated rows stopped) when ``until`` returns first (the client went away) and
        when it runs past ``request_timeout`` (a 504). The model stays in flight (never unloaded) until every call
        the request queued is done."""
        hold, _ = self._admit(entry, until, None)
        return self._run(entry, work, until, hold)

    async def _run(
        self,
        entry: ModelEntry,
        work: Callable[[Session], Awaitable[T]],
        until: Coroutine[Any, Any, None] | None,
        hold: Hold,
    ) -> T:
        # Counted by its request's hold, it needs no second look; counted by nothing yet, it is admitted again.
        hold, loaded = self._admit(entry, until, hold if hold.keepers else None)
        session = Session(self.pm, loaded, entry.worker, self.threads)
        task = asyncio.ensure_future(work(session))
        release = hold.keep()

        def cancel() -> None:
            session.ticket.cancel()
            task.cancel()

        try:
            return await self._wait(entry, task, cancel, until)
        finally:
            _release(release, task, session.calls)

    def _admit(
        self, entry: ModelEntry, until: Coroutine[Any, Any, None] | None, hold: Hold | None
    ) -> tuple[Hold, LoadedModel]:
        """``hold``, else the request's (``hold``), else a new one not yet kept (the queue had room), and the model,
        if it is loaded (else ModelNotFound, or the 429)."""
        try:
            if hold is None:
                hold = self.hold(entry)
            if hold is None:
                self._room(entry)
                hold = Hold(entry)
            return hold, entry.model()
        except LoomError:
            if until is not None:
                until.close()
            raise

    def _room(self, entry: ModelEntry) -> None:
        """The 429 when ``entry`` has ``max_queue`` requests in flight of the caller's API key (of anyone's, on a
        server without keys)."""
        limit, owner = self.settings.max_queue, CALLER.get()
        mine = entry.flights.get(owner, 0)
        if limit and mine >= limit:
            wait = entry.worker.seconds_per_batch * entry.in_flight / max(1, self.settings.max_batch_size)
            retry = max(1, math.ceil(wait))
            whose = " of this API key" if owner else ""
            raise TooManyRequests(
                f"model: {entry.model_id!r} has {mine} requests{whose} in flight, its queue limit "
                f"(max_queue {limit}); retry after {retry} s",
                field="model",
                retry_after=retry,
                max_queue=limit,
            )

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


def _release(release: Callable[[], None], task: asyncio.Future, calls: list[concurrent.futures.Future]) -> None:
    """Let go of the run's keep on the model once its work and every call it queued are done (at once when they
    are)."""
    loop = asyncio.get_running_loop()
    left = [task, *calls]

    def done(item: Any = None) -> None:
        if item in left:
            left.remove(item)
        if not left:
            release()

    for item in list(left):
        if item.done():
            done(item)
        elif isinstance(item, asyncio.Future):
            item.add_done_callback(done)
        else:
            item.add_done_callback(lambda f: loop.call_soon_threadsafe(done, f))
