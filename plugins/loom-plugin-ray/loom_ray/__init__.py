"""The ``ray`` transport: ``loom serve --transport ray`` runs The Loom as a Ray Serve application, its replicas
each with their own model manager, requests routed to a replica that has their model."""

from __future__ import annotations

import functools
from typing import Any

from loom_kernel import Option, Transport, hookimpl

# Config file section ``ray``, LOOM_RAY_*, and the flags named. Ray's HTTP proxy listens on the server's host:port.
ADDRESS = Option("ray", "address", None, "the Ray cluster to join (auto, ray://...; default local)", "ray-address")
REPLICAS = Option("ray", "replicas", 1, "replicas of The Loom (default 1)", "replicas", minimum=1)
MAX_REPLICAS = Option("ray", "max_replicas", 0, "above replicas: Ray Serve autoscales up to this many", minimum=0)
CPUS = Option("ray", "cpus_per_replica", 1.0, "CPUs each replica reserves from Ray's scheduler", minimum=0)
GPUS = Option("ray", "gpus_per_replica", 0.0, "GPUs each replica reserves (a fraction shares one)", minimum=0)
THREADS = Option(
    "ray", "threads_per_replica", 0, "torch's threads in each replica (0: Ray's rule, its CPUs, at least 1)", minimum=0
)


@hookimpl
def options() -> list[Option]:
    return [ADDRESS, REPLICAS, MAX_REPLICAS, CPUS, GPUS, THREADS]


@hookimpl
def transport(settings: Any) -> Transport:
    from loom_ray.deploy import run

    where = ADDRESS.of(settings) or "a local Ray"
    return Transport(
        name="ray",
        describe=f"Ray Serve on {where}: {REPLICAS.of(settings)} replica(s), proxy on {settings.host}:{settings.port}",
        serve=functools.partial(run, settings),
    )
