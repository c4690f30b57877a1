"""Carry tokens from a model's worker thread to an async response, and stop the worker when the client leaves."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.types import Receive

from loom_kernel.errors import LoomError

log = logging.getLogger("loom.api")
EVENT_STREAM = "text/event-stream"


def event_stream(events: AsyncIterable[ServerSentEventMessage]) -> ServerSentEvent:
    """An SSE response that says ``text/event-stream`` whatever its route declares: a route that answers JSON unless
    the request asks for a stream (OpenAI's ``stream: true``) declares JSON, and Litestar lets the route's media type
    override the response's own."""
    response = ServerSentEvent(events)
    response.headers["content-type"] = f"{EVENT_STREAM}; charset=utf-8"
    return response


@dataclass
class MayStream(Operation):
    """The OpenAPI operation of such a route (its ``operation_class``): its 200 answer is JSON, or events."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            events = Schema(type=OpenAPIType.STRING, description="server-sent events, when the request streams")
            ok.content = {**(ok.content or {}), EVENT_STREAM: OpenAPIMediaType(schema=events)}


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
            if not task.done():  # the client left before the end: its request leaves the queue, its rows stop
                task.cancel()


def client_gone(request: Request) -> Coroutine[Any, Any, None]:
    """Returns once the client has closed the connection (pass to ``ModelManager.run`` as ``until``)."""
    return disconnected(request.receive)


async def disconnected(receive: Receive) -> None:
    """Return once ``receive`` gives ``http.disconnect``. The body has been read by then, so that is the next
    message: the client left, or the response was sent (when nobody waits for this any more)."""
    while (await receive())["type"] != "http.disconnect":
        pass
