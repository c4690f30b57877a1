"""The ``ray`` transport: ``loom serve --transport ray`` runs The Loom as a Ray Serve application, its replicas
each with their own model manager, requests routed to a replica that has their model."""

from __future__ import annotations

import functools
from typing import Any

from loom_kernel import Transport, hookimpl


@hookimpl
def transport(settings: Any) -> Transport:
    from loom_ray.deploy import run

    where = settings.ray_address or "a local Ray"
    return Transport(
        name="ray",
        describe=f"Ray Serve on {where}: {settings.ray_replicas} replica(s), proxy on {settings.host}:{settings.port}",
        serve=functools.partial(run, settings),
    )
