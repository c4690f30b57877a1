"""The ray transport against one process on the same machine: what Ray's proxy, the router and the replicas'
hand-offs cost (two replicas on 2 cores cannot be faster than one process)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import corpus, run_clients


@contextlib.contextmanager
def ray_app(models: list[str], replicas: int = 2) -> Iterator[str]:
    """``loom serve --transport ray`` with ``replicas`` replicas on a free port, after one request for each model
    has loaded it where the router sends it; yields the base URL."""
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
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def bench_ray(batched: str, gpt: str, quick: bool, row: Any, prompts: Any) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    requests, repeats = (128, 1) if quick else (384, 2)
    embeds = [{"model": "minilm", "text": t} for t in corpus(requests, seed=4, words=(6, 14))]
    tok = AutoTokenizer.from_pretrained(gpt)
    gens = [{"model": gpt, "prompt": p, "max_tokens": 32, "temperature": 0} for p in prompts(tok, 16, 16)]
    with ray_app(["minilm", gpt]) as on_ray:
        for base in (batched, on_ray):  # warm-up
            run_clients(base, "/embed", embeds[:32], 16)
            run_clients(base, "/generate", gens[:8], 8)
        one, ray = {"embed": [], "generate": []}, {"embed": [], "generate": []}
        for _ in range(repeats):  # alternating, so that a slow spell falls on both sides
            for name, base in (("one", batched), ("ray", on_ray)):
                out = one if name == "one" else ray
                out["embed"].append(len(embeds) / run_clients(base, "/embed", embeds, 16)[0])
                out["generate"].append(len(gens) * 32 / run_clients(base, "/generate", gens, 8)[0])
    note = (
        f"loom serve --transport ray --replicas 2 (0.5 CPU reserved each) against one loom serve, both preloaded; "
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
            "ray: 8 /generate clients, 2 replicas vs one process",
            max(ray["generate"]),
            max(one["generate"]),
            "tok/s",
            ">= 0.75",
            lambda r: r >= 0.75,
        ),
    ]
