"""A replica: The Loom's whole app (its own plugin manager and model manager) inside a Ray Serve replica.

The router hands each request over as a plain dict (method, path, query, headers, body) with the request's model as
Ray Serve's multiplexed model id; the replica runs the request through its app and streams the app's ASGI messages
back. Only the app loads models, after its own checks (nothing loads for a request it refuses); the moment it has the
request's model, the replica registers it with Ray's multiplexing, so that the next requests for it come here. It
tells the registry what it holds after every request and every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from loom_ray import THREADS

REPORT_EVERY_S = 3.0


class Loaded:
    """What Ray's multiplexing keeps per model id: the id (the model itself stays in the replica's manager)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


def replica_class(max_models: int) -> type:
    """The deployment's class, its multiplexing bounded by the manager's ``max_models``."""

    class LoomReplica:
        async def __init__(self, settings: dict[str, Any], registry: Any) -> None:
            from loom_kernel import Settings, configure_logging, create_app
            from loom_ray.loopback import keep_serve_on_loopback

            keep_serve_on_loopback()

            mine = Settings(**settings)
            configure_logging(mine.log_level)
            if threads := THREADS.of(mine):
                # Before the model threads start: each takes torch's count when it first runs torch.
                torch.set_num_threads(threads)
            self.loom_app = create_app(settings=mine)
            self.manager = self.loom_app.state.manager
            self.registry = registry
            self.replica = serve.get_replica_context().replica_id.unique_id
            self._loading: dict[str, asyncio.Future[None]] = {}  # the request gets that registrations wait for
            self.manager.get = self._registered(self.manager.get)
            await self.manager.start()
            # Every replica loads the preloaded models; Ray learns where they are as requests for them arrive.
            await self.manager.preload(list(self.manager.settings.preload))
            self._dirty = False
            self._reporter = asyncio.create_task(self._report_forever())

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def load(self, model_id: str) -> Loaded:
            # Registration only: it loads nothing, it waits for the request's own ``get`` of the model (which holds
            # it for the request, with the request's load options). A get of its own, with default options, raced
            # the request's: a revision named by the request loaded beside the repo's main, a dtype was a 409 ("is
            # being loaded with other options") whenever the registration's load started first.
            pending = self._loading.get(model_id)
            if pending is not None:
                await asyncio.shield(pending)
            return Loaded(model_id)

        def _registered(self, get: Any) -> Any:
            """The manager's ``get``, which also registers the request's own model with Ray's multiplexing as the
            app asks for it (after the app's own checks): Ray tells the router within a tenth of a second that the
            model is loading here, so that the next requests for it come here while it loads. The registration
            completes when this ``get`` does, and fails with it."""

            async def get_and_register(model_id: str, *args: Any, **kwargs: Any) -> Any:
                if model_id != serve.get_multiplexed_model_id() or model_id in self._loading:
                    return await get(model_id, *args, **kwargs)
                loaded = asyncio.get_running_loop().create_future()
                self._loading[model_id] = loaded

                def registered(f: asyncio.Future[Loaded]) -> None:
                    # Until now, for a registration that Ray's multiplexing ran after the get had ended (it loads one
                    # model at a time): it learns how the get ended. Routing is an optimisation: a model that failed
                    # to load is the request's own error, not the registration's.
                    if self._loading.get(model_id) is loaded:
                        del self._loading[model_id]
                    f.cancelled() or f.exception()

                asyncio.ensure_future(self.load(model_id)).add_done_callback(registered)
                try:
                    entry = await get(model_id, *args, **kwargs)
                except BaseException as exc:
                    # An Exception: Ray's multiplexing forgets a model whose load raised one, and only then.
                    failed = exc if isinstance(exc, Exception) else RuntimeError(f"the request for {model_id} ended")
                    loaded.set_exception(failed)
                    loaded.exception()  # retrieved: the registration re-raises it
                    raise
                loaded.set_result(None)
                return entry

            return get_and_register

        async def __call__(self, request: dict[str, Any]) -> list[dict[str, Any]]:
            """The whole answer's ASGI messages at once."""
            return [message async for message in self.stream(request)]

        async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            """The answer's ASGI messages as the app sends them (a stream's events one by one)."""
            async for message in run_asgi(self.loom_app, request, self.replica):
                yield message
            self._dirty = True

        async def state(self) -> dict[str, Any]:
            return self._snapshot()

        def _snapshot(self) -> dict[str, Any]:
            from loom_kernel import gauges

            manager = self.manager
            return {
                "replica": self.replica,
                "torch_threads": torch.get_num_threads(),
                "loaded_models": manager.describe(),
                "metrics": manager.metrics.exposition(gauges(manager.ready())),
                "time": time.time(),
            }

        async def _report(self) -> None:
            with contextlib.suppress(Exception):  # the registry is bookkeeping: serving goes on without it
                await self.registry.report.remote(self._snapshot())

        async def _report_forever(self) -> None:
            """Every ``REPORT_EVERY_S``, or a second after a request (a model loaded, a count moved): often enough
            for /models to follow, seldom enough that reporting costs a busy replica nothing it would notice."""
            while True:
                await self._report()
                waited = 0.0
                while waited < REPORT_EVERY_S and not (self._dirty and waited >= 1.0):
                    await asyncio.sleep(0.25)
                    waited += 0.25
                self._dirty = False

    return LoomReplica


async def run_asgi(app: Any, request: dict[str, Any], replica: str) -> AsyncIterator[dict[str, Any]]:
    """``request`` through ``app``: its ASGI send messages as they come (a stream's events one by one), each
    response marked with the replica that answered."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["raw_path"],
        "root_path": "",
        "query_string": request["query_string"],
        "headers": request["headers"],
        "client": request["client"],
        "server": request["server"],
    }
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    delivered = False
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()  # the router stopped listening: the client left
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"x-loom-replica", replica.encode())]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            # The answer is whole: the app's next receive is a disconnect, as a server's is (uvicorn's). A stream
            # listens for one until it returns, and waited for it forever: the request, its hold on the model and
            # Ray's count of its ongoing requests never ended, and the server's stop waited them out.
            gone.set()
        await messages.put(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(call())
    try:
        while (message := await messages.get()) is not None:
            yield message
        await task
    finally:
        gone.set()
        if not task.done():
            task.cancel()
