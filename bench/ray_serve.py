"""The ray transport against one process on the same machine: what Ray's proxy, the router and the replicas'
hand-offs cost (two replicas on 2 cores cannot be faster than one process)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import corpus, run_clients, stopping


@contextlib.contextmanager
def ray_app(models: list[str], replicas: int = 2) -> Iterator[tuple[str, Path]]:
    """``loom serve --transport ray`` with ``replicas`` replicas on a free port, after one request for each model
    has loaded it where the router sends it; yields the base URL and the server's home (Ray's token is there)."""
    import httpx
    from serverutil import RAY_ENV, REPO, free_port, server_env

    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        env = {**server_env(Path(home)), **RAY_ENV}
        cmd = [sys.executable, "-m", "loom_kernel", "serve", "--transport", "ray", "--replicas", str(replicas)]
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    if len(httpx.get(f"{base}/health", timeout=5).json().get("replicas", [])) == replicas:
                        break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the Ray application did not start")
                time.sleep(0.5)
            for m in models:
                httpx.post(f"{base}/models/load", json={"model": m}, timeout=600).raise_for_status()
            yield base, Path(home)
        finally:
            with stopping(proc.pid):
                session = session_of(proc.pid)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                for pid in session:  # what Ray left of this server; never `ray stop`, which ends every Ray here
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def session_of(leader: int) -> set[int]:
    """The processes of ``leader``'s session (the server was started in a session of its own), but it."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid, sid in zip(out[::2], out[1::2], strict=True) if int(sid) == leader} - {leader}


FLOOR = "/ray-floor"


def deploy_floor(home: Path) -> None:
    """Beside The Loom's application, on the same Ray and proxy: a deployment that reads each request's body and
    answers ``{}``, doing none of The Loom's work. Its throughput is what Ray Serve's proxy and one hand-off to a
    replica allow here, whatever the replicas run. Deployed from a driver of this process that leaves at once
    (Serve keeps the application), so that no Ray connection of this process runs while anything is measured."""
    # The local cluster The Loom starts is on loopback and wants its token: a driver joins it on the same terms.
    os.environ.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(home / ".ray" / "auth_token"),
    )
    import ray
    from ray import serve

    @serve.deployment(name="Floor", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    class Floor:
        async def __call__(self, request: Any) -> dict[str, Any]:
            await request.body()
            return {}

    ray.init(address="auto", namespace="loom", include_dashboard=False, log_to_driver=False)
    try:
        serve.run(Floor.bind(), name="floor", route_prefix=FLOOR)
    finally:
        ray.shutdown()


def bench_ray(batched: str, gpt: str, quick: bool, row: Any, prompts: Any) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    requests, repeats = (128, 1) if quick else (384, 2)
    embeds = [{"model": "minilm", "text": t} for t in corpus(requests, seed=4, words=(6, 14))]
    tok = AutoTokenizer.from_pretrained(gpt)
    gens = [{"model": gpt, "prompt": p, "max_tokens": 32, "temperature": 0} for p in prompts(tok, 16, 16)]
    with ray_app(["minilm", gpt]) as (on_ray, home):
        deploy_floor(home)
        for base, path in ((batched, "/embed"), (on_ray, "/embed"), (on_ray, FLOOR)):  # warm-up
            run_clients(base, path, embeds[:32], 16)
        for base in (batched, on_ray):
            run_clients(base, "/generate", gens[:8], 8)
        one, ray = {"embed": [], "generate": []}, {"embed": [], "generate": []}
        alone = []
        for _ in range(repeats):  # alternating, so that a slow spell falls on every side
            for name, base in (("one", batched), ("ray", on_ray)):
                out = one if name == "one" else ray
                out["embed"].append(len(embeds) / run_clients(base, "/embed", embeds, 16)[0])
                out["generate"].append(len(gens) * 32 / run_clients(base, "/generate", gens, 8)[0])
            alone.append(len(embeds) / run_clients(on_ray, FLOOR, embeds, 16)[0])
    # Ray's hand-off and The Loom's own work share the same 2 cores: at best their costs per text add up.
    ceiling = 1 / (1 / max(alone) + 1 / max(one["embed"]))
    note = (
        "loom serve --transport ray --replicas 2 (0.5 CPU reserved, 2 torch threads each) against one loom serve, "
        "both preloaded; "
        f"{requests} /embed from 16 clients and 16 /generate of 32 tokens from 8 clients, best of {repeats}"
    )
    return [
        row(
            "ray: 16 /embed clients, 2 replicas vs one process",
            max(ray["embed"]),
            max(one["embed"]),
            "texts/s",
            ">= 0.75",
            lambda r: r >= 0.75,
            note,
        ),
        row(
            "ray: Ray Serve alone (reads each /embed body, answers {}) vs one process's /embed",
            max(alone),
            max(one["embed"]),
            "texts/s",
            "-",
            None,
        ),
        row(
            "ray: /embed through Ray vs Ray Serve's floor (the same proxy, a deployment that only reads the body)",
            max(ray["embed"]),
            max(alone),
            "texts/s",
            ">= 0.9",
            lambda r: r >= 0.9,
        ),
        row(
            "ray: the most /embed through Ray can reach here vs one process",
            ceiling,
            max(one["embed"]),
            "texts/s",
            "-",
            None,
            "Ray Serve's own cost per request plus one process's cost per text, on the same 2 cores",
        ),
        row(
            "ray: 8 /generate clients, 2 replicas vs one process",
            max(ray["generate"]),
            max(one["generate"]),
            "tok/s",
            ">= 0.75",
            lambda r: r >= 0.75,
        ),
    ]
