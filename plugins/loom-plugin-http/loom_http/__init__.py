"""The ``http`` transport: one TCP listening socket on ``settings.host:settings.port``."""

from __future__ import annotations

from typing import Any

from loom_http.tcp import TcpListener
from loom_kernel import Transport, hookimpl


@hookimpl
def transport(settings: Any) -> Transport:
    # Building the listener binds nothing: `loom plugins` and unselected transports stay side-effect free.
    listener = TcpListener(settings.host, settings.port)
    return Transport(
        name="http",
        describe=f"HTTP over TCP on {listener.url} (port 0 picks a free port, logged at start)",
        bind=listener.bind,
        cleanup=listener.close,
    )
