"""GET /metrics in the Prometheus text format, and the hook that counts every response."""

from __future__ import annotations

import time

from litestar import Controller, Response, get
from litestar.types import Message, Scope

from loom_kernel.api.deps import Manager
from loom_kernel.reports import gauges

PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4"  # Litestar adds the charset (once)


async def count_response(message: Message, scope: Scope) -> None:
    """Litestar's ``before_send`` hook: one count per response (an unknown path is route "unmatched")."""
    if message["type"] != "http.response.start" or scope["type"] != "http":
        return
    state = scope.get("state", {})
    started = state.get("started")
    seconds = None if started is None else time.perf_counter() - started
    route = scope.get("path_template") or "unmatched"
    scope["app"].state.manager.metrics.request(scope["method"], route, message["status"], seconds)


class MetricsController(Controller):
    tags = ["system"]

    @get("/metrics", sync_to_thread=False, media_type=PROMETHEUS_MEDIA_TYPE)
    def metrics(self, manager: Manager) -> Response[str]:
        """Requests, latency, tokens, loads, batches and queue depth, per route and per model."""
        body = manager.metrics.exposition(gauges(manager.ready()))
        return Response(content=body, media_type=PROMETHEUS_MEDIA_TYPE)
