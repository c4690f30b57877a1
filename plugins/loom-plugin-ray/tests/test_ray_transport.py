"""`loom serve --transport ray` on a local Ray (this machine's CPUs): two replicas, routing by model, answers equal
to a single process's, streams, problem details, and a killed replica. One Ray application for the whole module:
it takes about half a minute to start on 2 cores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serverutil import RAY_ENV, REPO, free_port, server_env, until, wait_for
from test_batching import arrays
from test_models import app_with, concurrent_client

STARTUP_S = 240  # against a hang only: Ray and two replicas start in about 30 s on 2 idle cores


def health(base: str) -> dict[str, Any]:
    try:
        return httpx.get(f"{base}/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}


@contextlib.contextmanager
def ray_server(home: Path, replicas: int = 2) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    port = free_port()
    log = home / "ray-server.log"
    cmd = [sys.executable, "-m", "loom_kernel", "serve", "--transport", "ray", "--replicas", str(replicas)]
    env = {**server_env(home), **RAY_ENV}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(r"serving on Ray at", log, proc, timeout=STARTUP_S)
        until(lambda: len(health(base).get("replicas", [])) == replicas, "every replica reported", STARTUP_S, 0.2)
        yield base, log, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with ray_server(tmp_path_factory.mktemp("ray")) as (base, log, _):
        yield base, log


def replica_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-loom-replica"]


@pytest.mark.slow
async def test_each_models_requests_land_on_one_replica_and_answer_as_one_process(served, tiny_models):
    base, _ = served
    llama, gpt2 = str(tiny_models["llama"]), str(tiny_models["gpt2"])
    extract = {"text": "the cat sat on the mat", "hidden_state_layers": "all", "positions": "all"}
    generate = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0, "return_hidden_states": True}
    with httpx.Client(base_url=base, timeout=120) as c:
        seen = {
            m: {replica_of(c.post("/extract", json={"model": m, **extract})) for _ in range(4)} for m in (llama, gpt2)
        }
        assert all(len(replicas) == 1 for replicas in seen.values()), seen
        assert [r["torch_threads"] for r in c.get("/health").json()["replicas"]] == [2, 2]
        want = sorted((m, *s) for m, s in seen.items())  # the replicas report what they hold within seconds
        until(
            lambda: sorted((r["model_id"], r["replica"]) for r in c.get("/models").json()["loaded_models"]) == want,
            "/models shows each model on its replica",
            STARTUP_S,
            0.2,
        )
        via_ray = {
            m: (
                c.post("/extract", json={"model": m, **extract}).json(),
                c.post("/generate", json={"model": m, **generate}).json(),
            )
            for m in (llama, gpt2)
        }
        events = []
        with c.stream("POST", "/generate/stream", json={"model": llama, **generate}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = [line for line in s.iter_lines() if line.startswith("event:")]
        assert events.count("event: token") == 8 and events[-1] == "event: done"
    async with concurrent_client(app_with()) as one:
        for m, (got_extract, got_generate) in via_ray.items():
            want_extract = (await one.post("/extract", json={"model": m, **extract})).json()
            want_generate = (await one.post("/generate", json={"model": m, **generate})).json()
            for key, state in arrays(want_extract, "sequence_hidden_states").items():
                np.testing.assert_allclose(arrays(got_extract, "sequence_hidden_states")[key], state, atol=1e-5)
            assert got_generate["token_ids"] == want_generate["token_ids"]
            np.testing.assert_allclose(
                arrays(got_generate, "hidden_states")["-1"], arrays(want_generate, "hidden_states")["-1"], atol=1e-5
            )


@pytest.mark.slow
async def test_bad_input_is_the_same_problem_as_without_ray(served, tiny_models):
    base, _ = served
    llama = str(tiny_models["llama"])
    bodies = [
        ("/extract", {"model": llama, "text": "hi", "hidden_state_layers": [99]}),
        ("/generate", {"model": llama, "prompt": "hi", "max_tokens": "5"}),
        ("/extract", {"model": "/no/such/model", "text": "hi"}),
        ("/generate", {"model": llama, "prompt": "hi", "interventions": [{"site": 1, "op": "steer"}]}),
    ]
    async with concurrent_client(app_with()) as one:
        with httpx.Client(base_url=base, timeout=120) as c:
            for path, body in bodies:
                got, want = c.post(path, json=body), await one.post(path, json=body)
                assert got.status_code == want.status_code, (path, got.text)
                assert got.headers["content-type"] == want.headers["content-type"]
                strip = lambda b: {k: v for k, v in b.items() if k != "request_id"}  # noqa: E731
                assert strip(got.json()) == strip(want.json())
            r = c.post("/extract", content=b"text", headers={"content-type": "text/plain"})
            assert r.status_code == 415 and r.json()["field"] == "content-type"
            metrics = c.get("/metrics").text
            assert 'replica="' in metrics and "loom_http_requests_total" in metrics


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_no_request_hangs(served, tiny_models):
    base, _ = served
    body = {"model": str(tiny_models["llama"]), "text": "the cat sat"}
    with httpx.Client(base_url=base, timeout=60) as c:  # a request past this timeout fails the test: no hang
        assert c.post("/extract", json=body).status_code == 200
        before = {s["replica"] for s in health(base)["replicas"]}
        pids = subprocess.run(["pgrep", "-f", "ServeReplica:loom:LoomReplica"], capture_output=True, text=True)
        victims = pids.stdout.split()
        assert len(victims) == 2, pids
        os.kill(int(victims[0]), signal.SIGKILL)
        for _ in range(6):
            r = c.post("/extract", json=body)
            assert r.status_code == 200 or (r.status_code == 503 and r.headers["retry-after"] == "1"), r.text
        until(
            lambda: (now := {s["replica"] for s in health(base).get("replicas", [])}) != before and len(now) == 2,
            "Ray replaced the killed replica",
            STARTUP_S,
            0.2,
        )
        assert all(c.post("/extract", json=body).status_code == 200 for _ in range(4))


@pytest.mark.parametrize("names", [["ray", "http"], ["unix", "ray"]])
def test_the_ray_transport_serves_alone(names: list[str]) -> None:
    from loom_kernel.config import ConfigError, Settings
    from loom_kernel.serve import serve

    with pytest.raises(ConfigError, match="ray runs the app on its own") as err:
        serve(Settings(transports=names))
    assert err.value.field == "transports" and err.value.allowed == ["ray"]
