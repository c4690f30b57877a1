"""Carry tokens from a model's worker thread to an async response, and stop the worker when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from litestar import Request

from loom_kernel.api.problems import request_id
from loom_kernel.batching import Cancelled as ClientGone
from loom_kernel.errors import LoomError

T = TypeVar("T")

log = logging.getLogger("loom.api")


class TokenBridge:
    """``on_token`` runs on the worker thread; ``events()`` yields ("token", dict), then ("done", result) or
    ("error", problem dict) on the event loop. Once the consumer stops iterating, the next ``on_token`` returns
    False, which ends the generation and frees the worker."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._closed = threading.Event()

    def on_token(self, row: int, token: int, piece: str, extras: dict[str, Any] | None = None) -> bool:
        if self._closed.is_set():
            return False
        event = {"row": row, "token_id": token, "text": piece, **(extras or {})}
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ("token", event))
        return True

    async def events(self, job: Awaitable[Any], request_id: str | None = None) -> AsyncIterator[tuple[str, Any]]:
        task = asyncio.ensure_future(job)
        # Tokens are queued by call_soon_threadsafe before the job's result arrives, so "end" always comes last.
        task.add_done_callback(lambda t: self._queue.put_nowait(("end", t)))
        try:
            while True:
                kind, value = await self._queue.get()
                if kind != "end":
                    yield kind, value
                    continue
                if value.cancelled():
                    return
                exc = value.exception()
                if exc is None:
                    yield "done", value.result()
                elif isinstance(exc, LoomError):
                    yield "error", {**exc.problem(), "request_id": request_id}
                else:
                    log.error("request %s: generation failed mid-stream", request_id, exc_info=exc)
                    yield (
                        "error",
                        {
                            "type": "about:blank",
                            "title": "Internal error",
                            "status": 500,
                            "detail": "generation failed; see the server log for this request id",
                            "request_id": request_id,
                        },
                    )
                return
        finally:
            self._closed.set()


async def unless_gone(request: Request, job: Awaitable[T]) -> T:
    """Await ``job`` while watching the connection: when the client goes away first, ``job`` is cancelled (its
    call leaves the model's queue, its generated rows stop) instead of running on for nobody.

    The body has been read by then, so the next ASGI message is ``http.disconnect``: the client left, or the
    response was sent (after ``job`` is done, when nobody waits for it any more)."""
    task = asyncio.ensure_future(job)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself was cancelled: so is its job
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        log.info("request %s: the client went away; its work was cancelled", request_id(request))
        raise ClientGone("request: the client closed the connection")
    return task.result()
