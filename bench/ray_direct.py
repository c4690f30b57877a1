"""Issue 30's item 5 as a measurement: could Ray Serve's own routing drop the router's hop?

``python -m bench.ray_direct`` starts ``loom serve --transport ray --replicas 2`` with MiniLM, and beside it, on
the same Ray and proxy, Ray Serve's floor (a deployment that only reads each body) and two Loom replicas that are
Ray Serve's ASGI ingress themselves (``/direct``: proxy to replica, no router; Ray's multiplexing would route them
by the ``serve_multiplexed_model_id`` header, which clients do not send). It sends the same /embed requests from 16
clients to all three, alternating, and prints texts/s and each path's ratio to the floor.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import corpus, run_clients
from bench.ray_serve import FLOOR, deploy_floor, ray_app

DIRECT = "/direct"


def deploy_direct() -> None:
    """Two Loom replicas as Ray Serve's ASGI ingress at ``/direct`` (a driver that leaves at once, as the floor's)."""
    import attrs
    import ray
    from loom_ray import THREADS
    from loom_ray.replica import replica_class
    from loom_ray.router import Registry
    from ray import serve

    from loom_kernel.config import Settings

    def build(self: Any) -> Any:
        app = self.loom_app

        async def unprefixed(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                scope = {**scope, "path": scope["path"].removeprefix(DIRECT) or "/", "root_path": ""}
            await app(scope, receive, send)

        return unprefixed

    # The replica's class without its __call__ (an ingress may not have one), answering through its own app.
    body = {k: v for k, v in replica_class(3).__dict__.items() if k not in ("__call__", "__dict__", "__weakref__")}
    direct = serve.ingress()(type("Direct", (), {**body, "__serve_build_asgi_app__": build}))
    settings = attrs.asdict(Settings(default_device="cpu", options={THREADS.name: 2}))
    ray.init(address="auto", namespace="loom", include_dashboard=False, log_to_driver=False)
    try:
        registry = ray.remote(Registry).options(name="direct-registry", get_if_exists=True, num_cpus=0).remote()
        deployment = serve.deployment(
            direct, name="Direct", num_replicas=2, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64
        )
        serve.run(deployment.bind(settings, registry), name="direct", route_prefix=DIRECT)
    finally:
        ray.shutdown()


def main() -> None:
    import httpx

    requests, repeats = 384, 4
    embeds = [{"model": "minilm", "text": t} for t in corpus(requests, seed=4, words=(6, 14))]
    with ray_app(["minilm"]) as (on_ray, home):
        deploy_floor(home)
        deploy_direct()
        for _ in range(2):  # each direct replica loads it on its first request
            httpx.post(f"{on_ray}{DIRECT}/models/load", json={"model": "minilm"}, timeout=600).raise_for_status()
        paths = {"router": "/embed", "direct": f"{DIRECT}/embed", "floor": FLOOR}
        for path in paths.values():
            run_clients(on_ray, path, embeds[:32], 16)
        got: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, path in paths.items():
                got[name].append(len(embeds) / run_clients(on_ray, path, embeds, 16)[0])
    best = {name: max(values) for name, values in got.items()}
    print("texts/s:", {name: [round(v, 1) for v in values] for name, values in got.items()})
    print(
        f"through the router {best['router'] / best['floor']:.2f} of the floor, straight to the replicas "
        f"{best['direct'] / best['floor']:.2f}"
    )


if __name__ == "__main__":
    main()
