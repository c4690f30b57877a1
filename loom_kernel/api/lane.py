"""The embedding lane: POST /embed, /embed/batch and /v1/embeddings without Litestar's per-request machinery.

Under load from many clients of single texts, the model's thread waits between passes for the event loop to
answer one batch's requests and read the next ones', so the event loop's CPU a request bounds the throughput
(README, Performance). Litestar's path (two exception middlewares, routing, dependency injection, signature
parsing, response objects) cost about 0.2 ms of it a request; the lane decodes the body into the route's own
type and runs the route's own code (``loom_kernel.api.embed.EMBED_ROUTES``), nothing else.

A request takes the lane only when nothing about it needs the full path: a JSON body of declared length within
``max_body_mb`` that decodes as it is, no CORS configured, the API key (when one is set) right. Anything else,
and any body that does not decode, goes through Litestar unchanged (the body already read is handed on), so every
such error is the one the full path gives. Errors raised while serving (an unknown model, a bad field, 429, 504, a
failed pass) are rendered by the app's own exception handlers; the request id, the metrics (the app's
``before_send`` hooks) and uvicorn's access log are as on the full path.
"""

from __future__ import annotations

import msgspec
from litestar import Litestar, Request
from litestar.types import Message, Receive, Scope, Send

from loom_kernel.api.embed import EMBED_ROUTES
from loom_kernel.api.problems import begin_request, error_response, with_request_id
from loom_kernel.api.security import Guard, authorized


class LoomApp(Litestar):
    """The Loom's Litestar app: every request passes the guard first (before routing, so that an unknown path is
    refused alike), and the embedding routes take the lane when they can."""

    embedding_lane = True  # False sends every request through Litestar (the tests compare the two)
    guard: Guard | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http" and self.guard is not None and (refused := self.guard.refusal(scope)) is not None:
            scope["app"] = scope["litestar_app"] = self
            await self._problem(scope, receive, self._hooked(send, scope), refused, begin_request(scope))
            return
        route = EMBED_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or not self.embedding_lane or not self._lane_open(scope):
            await super().__call__(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before sending its body: nobody to answer
        try:
            data = msgspec.json.decode(body, type=route.body)
        except (msgspec.MsgspecError, RecursionError):
            await super().__call__(scope, replay(body, receive), send)
            return
        scope["app"] = scope["litestar_app"] = self
        scope["path_template"] = scope["path"]  # the route label of the metrics
        rid = begin_request(scope)
        send = self._hooked(send, scope)
        manager = self.state.manager
        try:
            answer = await route.serve(data, manager, manager.pm, receive)
        except Exception as exc:
            await self._problem(scope, receive, send, exc, rid)
            return
        content = msgspec.json.encode(answer)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    @staticmethod
    async def _problem(scope: Scope, receive: Receive, send: Send, exc: Exception, rid: str) -> None:
        """The app's own problem response for ``exc``, with the request's id."""
        request: Request = Request(scope, receive, send)
        response = error_response(request, exc).to_asgi_response(app=None, request=request)
        await response(scope, receive, with_request_id(send, rid))

    def _lane_open(self, scope: Scope) -> bool:
        if self.cors_config is not None:
            return False
        settings = self.state.settings
        length = content_type = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"authorization":
                authorization = value
        limit = self.request_max_body_size  # the limit Litestar enforces (max_body_mb)
        if length is None or not length.isdigit() or (limit is not None and int(length) > limit):
            return False
        if content_type is None or content_type.split(b";")[0].strip().lower() != b"application/json":
            return False
        return not settings.api_key or authorized(authorization or b"", settings.api_key.encode())

    def _hooked(self, send: Send, scope: Scope) -> Send:
        """``send`` through the app's ``before_send`` hooks, as Litestar wraps it."""
        if not self.before_send:
            return send

        async def hooked(message: Message) -> None:
            for hook in self.before_send:
                await hook(message, scope)
            await send(message)

        return hooked


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnects first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives ``body`` first, as the request's one body message, then what ``receive`` gives."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def again() -> Message:
        return pending.pop() if pending else await receive()  # type: ignore[return-value]

    return again  # type: ignore[return-value]
