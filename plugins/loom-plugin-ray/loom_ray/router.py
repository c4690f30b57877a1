"""The ingress: an ASGI app in front of the replicas that reads each request's model (its JSON body's ``model``,
or the id in ``/models/{id}``) and sends the request to a replica that has that model, through Ray Serve's model
multiplexing. ``GET /health``, ``GET /models`` and ``GET /metrics`` answer for the whole application from the
registry the replicas report to. A replica that dies mid-request is a 503 with Retry-After, never a hang.

Nothing reaches a replica that the app would refuse at its door: the router runs the app's own checks first (Host,
Origin, content type, API key), from the headers alone, then reads the body only up to the limit of the route it
names (``max_body_mb``, or an upload route's own), in chunks, and stops there. Its refusals are the app's own
problem responses."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from ray import serve

APP = "loom"
STALE_S = 10.0  # a replica that has not reported for this long is gone (killed, or replaced by Ray)
PROBLEM = b"application/problem+json"
ROUTER_STATS = "/ray/router"
AGGREGATED = {"/health", "/models", "/models/", "/metrics", ROUTER_STATS}


class RouterStats:
    """What the router did: bodies read (bytes), requests refused before forwarding, requests forwarded; and what it
    is doing: HTTP requests in flight, and whether it is draining (the server stops: new requests are a 503)."""

    def __init__(self) -> None:
        self.body_bytes = 0
        self.refused = 0
        self.forwarded = 0
        self.in_flight = 0
        self.draining = False

    def asdict(self) -> dict[str, int]:
        return {
            "body_bytes": self.body_bytes,
            "refused": self.refused,
            "forwarded": self.forwarded,
            "in_flight": self.in_flight,
        }


class ClientGone(Exception):
    """The client closed the connection while its body was being read."""


async def read_body(scope: dict[str, Any], receive: Any, limit: int, stats: RouterStats) -> bytes | None:
    """The request's body, in chunks collected in a list; None, having read no further, once it passes ``limit``
    (a Content-Length over it is refused before any of the body is read)."""
    length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        stats.body_bytes += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def model_of(method: str, path: str, body: bytes) -> str:
    """The model a request is for: ``model`` of a JSON body, or the id of ``/models/{id}[/sites]``; "" for none."""
    if path.startswith("/models/") and path not in ("/models/", "/models/load"):
        return path[len("/models/") :].removesuffix("/sites")
    if method == "POST" and body[:1] == b"{":
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""  # the replica's app answers a malformed body with its own problem details
        return model if isinstance(model, str) else ""
    return ""


class Registry:
    """What each replica last reported: its models and its metrics."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, Any]] = {}

    def report(self, snapshot: dict[str, Any]) -> None:
        self.replicas[snapshot["replica"]] = snapshot

    def live(self) -> list[dict[str, Any]]:
        now = time.time()
        return sorted((s for s in self.replicas.values() if now - s["time"] < STALE_S), key=lambda s: s["replica"])


@serve.ingress()
class LoomRouter:
    """The ingress deployment: Ray Serve builds its ASGI app after the constructor, on the router's replica."""

    def __init__(self, replicas: Any, registry: Any, settings: dict[str, Any]) -> None:
        from loom_ray.loopback import keep_serve_on_loopback

        keep_serve_on_loopback()
        self.replicas, self.registry, self.settings = replicas, registry, settings
        self.stats = RouterStats()

    def __serve_build_asgi_app__(self) -> Any:
        return build_router(self.replicas, self.registry, self.settings, self.stats)

    async def drain(self) -> int:
        """The server stops (``loom serve`` calls this through Ray, before Ray Serve's shutdown, which ends Ray's
        proxy at once and with it every connection): from now on a request is a 503, and the requests in flight,
        how many are left, go on to their answers."""
        self.stats.draining = True
        return self.stats.in_flight

    async def in_flight(self) -> int:
        return self.stats.in_flight


def build_router(handle: Any, registry: Any, settings: dict[str, Any], stats: RouterStats | None = None) -> Any:
    """The ingress ASGI app: ``handle`` reaches the replicas, ``registry`` knows what they hold."""
    from litestar.exceptions import HTTPException

    from loom_kernel import (
        Guard,
        Settings,
        __version__,
        begin_request,
        body_limit,
        create_app,
        key_refusal,
        refuse,
        route_of,
        with_request_id,
    )

    guard = Guard.of(settings["host"], settings["allowed_hosts"], settings["cors_origins"])
    # The app the replicas run, never started here: its routes say how large each one's body may be.
    routes = create_app(settings=Settings(**settings))
    stats = stats or RouterStats()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await other(scope, receive, send)
            return
        if stats.draining:
            stats.refused += 1
            problem = {"type": "about:blank", "title": "Service unavailable", "status": 503}
            problem["detail"] = "the server is stopping: retry on another, or once it is back"
            await answer(send, 503, problem, headers=[(b"retry-after", b"1"), (b"connection", b"close")])
            return
        stats.in_flight += 1
        try:
            await forward(scope, receive, send)
        finally:
            stats.in_flight -= 1

    async def other(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "websocket":
            # Ray's proxy passes WebSockets on; the app serves none. Closed before it is accepted, which the server
            # answers with a 403 at the handshake; nothing reaches a replica.
            stats.refused += 1
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "The Loom serves no WebSocket"})

    async def forward(scope: dict[str, Any], receive: Any, send: Any) -> None:
        method, path = scope["method"], scope["path"]
        handler = route_of(routes, method, path)
        refused = guard.refusal(scope) or key_refusal(scope, settings.get("api_key"), handler)
        if refused is None:
            limit = body_limit(routes, handler)
            try:
                body = await read_body(scope, receive, limit, stats)
            except ClientGone:
                return
            if body is None:
                refused = HTTPException(status_code=413, detail=f"body: more than this route's {limit} bytes")
        if refused is not None:
            stats.refused += 1
            await refuse(scope, receive, with_request_id(send, begin_request(scope)), refused)
            return
        assert body is not None
        if method == "GET" and path in AGGREGATED:
            if path == ROUTER_STATS:
                await answer(send, 200, stats.asdict())
                return
            try:
                live = await registry.live.remote()
            except Exception as exc:  # the registry died: Ray restarts it, and the replicas' next reports refill it
                detail = f"the replicas' registry is gone ({type(exc).__name__}); Ray is restarting it: retry"
                problem = {"type": "about:blank", "title": "Service unavailable", "status": 503, "detail": detail}
                await answer(send, 503, problem, headers=[(b"retry-after", b"1")])
                return
            await answer(send, 200, aggregate(path, live, __version__), path == "/metrics")
            return
        request = {
            "method": method,
            "path": path,
            "raw_path": scope.get("raw_path") or path.encode(),
            "query_string": scope.get("query_string", b""),
            "headers": [(bytes(k), bytes(v)) for k, v in scope["headers"]],
            "client": scope.get("client"),
            "server": scope.get("server"),
            "body": body,
        }
        stats.forwarded += 1
        model = model_of(method, path, body)
        streams = path.endswith("/stream") or b'"stream":true' in body.replace(b" ", b"")
        started: dict[str, Any] | None = None  # the answer's http.response.start, once sent
        finished = False  # its last body message sent
        try:
            if streams:  # events as the replica makes them
                call = handle.options(stream=True, multiplexed_model_id=model, method_name="stream")
                async for message in call.remote(request):
                    started = started or message
                    finished = message["type"] == "http.response.body" and not message.get("more_body", False)
                    await send(message)
            else:  # the whole answer in one hand-off: a streaming call costs Ray a round trip per message
                for message in await handle.options(multiplexed_model_id=model).remote(request):
                    started = started or message
                    await send(message)
        except Exception as exc:  # a replica that died (or is being replaced) under the request
            detail = f"the replica serving this request is gone ({type(exc).__name__}); Ray is replacing it: retry"
            problem = {"type": "about:blank", "title": "Service unavailable", "status": 503, "detail": detail}
            if started is None:
                await answer(send, 503, problem, headers=[(b"retry-after", b"1")])
                return
            if finished:  # the whole answer went out: nothing of it was lost
                return
            kind = next((bytes(v) for k, v in started.get("headers", []) if bytes(k).lower() == b"content-type"), b"")
            if not kind.startswith(b"text/event-stream"):
                raise
            # Its status is sent: the stream ends as the app ends one it cannot finish, with an error event the client
            # reads. Cut short without one, a client could not tell what it got from a whole answer.
            await send({"type": "http.response.body", "body": stream_error(path, problem), "more_body": False})

    return app


def stream_error(path: str, problem: dict[str, Any]) -> bytes:
    """The last events of a stream cut short by ``problem``, in the form the app itself ends one: an ``error``
    event carrying the problem, or on /v1 OpenAI's ``data: {"error": ...}`` and ``[DONE]``."""
    from loom_kernel import openai_error

    if path.startswith("/v1/"):
        error = openai_error(problem["status"], problem["title"], problem["detail"])
        return b"data: %s\n\ndata: [DONE]\n\n" % json.dumps({"error": {**error, "status": problem["status"]}}).encode()
    return b"event: error\ndata: %s\n\n" % json.dumps(problem).encode()


def aggregate(path: str, live: list[dict[str, Any]], version: str) -> Any:
    rows = [{**row, "replica": s["replica"]} for s in live for row in s["loaded_models"]]
    if path == "/metrics":
        return "".join(labelled(s["metrics"], s["replica"]) for s in live)
    if path.startswith("/models"):
        return {"loaded_models": rows, "replicas": [s["replica"] for s in live]}
    return {
        "status": "ok" if live else "starting",
        "version": version,
        "replicas": [
            {
                "replica": s["replica"],
                "reported": s["time"],
                "torch_threads": s["torch_threads"],
                "loaded_models": [r["model_id"] for r in s["loaded_models"]],
            }
            for s in live
        ],
        "loaded_models": sorted({r["model_id"] for r in rows if r["state"] == "ready"}),
        "loading_models": sorted({r["model_id"] for r in rows if r["state"] == "loading"}),
    }


def labelled(text: str, replica: str) -> str:
    """A replica's Prometheus text with ``replica="..."`` on every sample."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, rest = re.match(r"([^{\s]+)(.*)", line).groups()  # type: ignore[union-attr]
            if rest.startswith("{"):
                line = f'{name}{{replica="{replica}",{rest[1:]}'
            else:
                line = f'{name}{{replica="{replica}"}}{rest}'
        out.append(line)
    return "\n".join(out) + "\n"


async def answer(send: Any, status: int, body: Any, text: bool = False, headers: list | None = None) -> None:
    data = body.encode() if text else json.dumps(body).encode()
    kind = b"text/plain; version=0.0.4" if text else PROBLEM if status >= 400 else b"application/json"
    head = [(b"content-type", kind), (b"content-length", str(len(data)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})
