"""`loom serve --transport ray` on a local Ray (this machine's CPUs): two replicas, routing by model, answers equal
to a single process's, streams, problem details, a killed replica, and the red team's findings: the router's checks
before any work, bodies read no further than their limit, Ray on loopback only, stores shared by the replicas. One
Ray application for the whole module (with an API key, and vectors and probes in a shared directory): it takes about
half a minute to start on 2 cores."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from serverutil import RAY_ENV, REPO, free_port, server_env, until, wait_for
from test_batching import arrays
from test_models import app_with, concurrent_client

STARTUP_S = 240  # against a hang only: Ray and two replicas start in about 30 s on 2 idle cores
KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# A plugin the replicas load (LOOM_PLUGINS_DIR, in the module's server): the first generation whose prompt says "hold
# the line" stops at its third decoding step and stays there, saying so with a file, until its replica is killed (the
# bound is only against a hang); the same request retried on a new replica, and any other, runs as it would, so
# nothing stays in flight for the tests after it.
HOLD = """
import os
import threading

from loom_kernel import hookimpl


class Holding:
    def __init__(self, real, tokenizer):
        self.real, self.tokenizer, self.held, self.steps = real, tokenizer, set(), 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def prefill(self, rows):
        self.held |= {r.id for r in rows if "hold the line" in self.tokenizer.decode(list(r.prompt))}
        return self.real.prefill(rows)

    def step(self, feed):
        if self.held & set(feed):
            self.steps += 1
            held = os.path.join(os.environ["HOLD_DIR"], "held")
            if self.steps == 3 and not os.path.exists(held):  # once: Ray may retry it on a new replica
                open(held, "a").close()
                threading.Event().wait(120)  # never set: the test kills this replica here
        return self.real.step(feed)


@hookimpl(wrapper=True)
def load(model, loader, options):
    loaded = yield
    if loaded is not None and loaded.decoder is not None:
        make = loaded.decoder
        loaded.decoder = lambda attention: Holding(make(attention), loaded.tokenizer)
    return loaded
"""


def health(base: str) -> dict[str, Any]:
    try:
        return httpx.get(f"{base}/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}


def descendants(root: int) -> set[int]:
    """``root`` and every process below it, and every process of its session (Ray starts some on their own)."""
    table = [
        line.split()
        for line in subprocess.run(["ps", "-eo", "pid=,ppid=,sid="], capture_output=True, text=True).stdout.splitlines()
    ]
    found, grew = {root}, True
    while grew:
        more = {int(pid) for pid, ppid, _ in table if int(ppid) in found} - found
        found |= more
        grew = bool(more)
    return found | {int(pid) for pid, _, sid in table if int(sid) == root}


@contextlib.contextmanager
def ray_server(
    home: Path, replicas: int = 2, config: dict[str, Any] | None = None, **more_env: str
) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    port = free_port()
    log = home / "ray-server.log"
    cmd = [sys.executable, "-m", "loom_kernel", "serve", "--transport", "ray", "--replicas", str(replicas)]
    if config is not None:
        (home / "config.yaml").write_text(json.dumps(config))
        cmd += ["--config", str(home / "config.yaml")]
    env = {**server_env(home), **RAY_ENV, **more_env}
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
        end_session(proc)


def end_session(proc: subprocess.Popen, started: set[int] | None = None) -> None:
    """SIGTERM ``loom serve`` (SIGKILL to its session if it hangs), then kill what Ray left of it: its processes, and
    ``started`` (those seen before it ended). Not `ray stop`, which ends every Ray on the machine."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pid in ((started or set()) | descendants(proc.pid)) - {proc.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("ray")
    shared = {"directory": str(home / "shared-vectors")}
    config = {"server": {"api_key": KEY}, "vectors": shared, "probes": {"directory": str(home / "shared-probes")}}
    # Every replica preloads qwen2, which only the last test asks for (Ray has not seen it on them until then).
    config["models"] = {"preload": [str(tiny_models["qwen2"])]}
    (home / "plugins").mkdir()
    (home / "plugins" / "hold.py").write_text(HOLD)
    hold = {"LOOM_PLUGINS_DIR": str(home / "plugins"), "HOLD_DIR": str(home)}
    with ray_server(home, config=config, **hold) as (base, log, proc):
        yield base, log, proc, home


@contextlib.contextmanager
def ray_command(home: Path, *args: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``loom serve --transport ray ARGS`` in its own session; whatever it started is ended afterwards."""
    log = home / "ray-command.log"
    cmd = [sys.executable, "-m", "loom_kernel", "serve", "--transport", "ray", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**server_env(home), **RAY_ENV},
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )
    try:
        yield proc, log
    finally:
        end_session(proc, descendants(proc.pid))


def exited_or_serving(proc: subprocess.Popen, log: Path) -> bool:
    return proc.poll() is not None or "serving on Ray at" in log.read_text()


def assert_one_line_error(proc: subprocess.Popen, log: Path, *fragments: str) -> None:
    text = log.read_text()
    assert proc.returncode == 2, text
    assert "Traceback" not in text and text.startswith("loom: error: ") and text.count("\n") == 1, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.slow
def test_a_bad_ray_address_is_a_one_line_error_and_starts_no_ray(tmp_path: Path) -> None:
    """An address Ray cannot parse stops the server with one line naming the setting, and no Ray is started on the
    way out (shutting down Ray Serve without Ray would start a local cluster, on the machine's outward address)."""
    with ray_command(tmp_path, "--ray-address", "not-an-address") as (proc, log):
        until(lambda: proc.poll() is not None, "the server exited", STARTUP_S, 0.05)
        assert "Started a local Ray instance" not in log.read_text()
        assert_one_line_error(proc, log, "ray.address", "not-an-address")


@pytest.mark.slow
def test_a_port_in_use_is_a_one_line_error_before_ray_starts(tmp_path: Path) -> None:
    """Ray's proxy cannot listen on a port another process holds: the server says so and exits 2, as the http
    transport does, rather than claim to serve while the other process answers its clients."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ray_command(tmp_path, "--port", str(port)) as (proc, log):
            until(lambda: exited_or_serving(proc, log), "the server exited or said it serves", STARTUP_S, 0.05)
            assert_one_line_error(proc, log, f"ray: cannot listen on http://127.0.0.1:{port}")


def replica_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-loom-replica"]


@pytest.mark.slow
async def test_each_models_requests_land_on_one_replica_and_answer_as_one_process(served, tiny_models):
    base, *_ = served
    llama, gpt2 = str(tiny_models["llama"]), str(tiny_models["gpt2"])
    extract = {"text": "the cat sat on the mat", "hidden_state_layers": "all", "positions": "all"}
    generate = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0, "return_hidden_states": True}
    with httpx.Client(base_url=base, timeout=120, headers=AUTH) as c:
        seen = {
            m: {replica_of(c.post("/extract", json={"model": m, **extract})) for _ in range(4)} for m in (llama, gpt2)
        }
        assert all(len(replicas) == 1 for replicas in seen.values()), seen
        assert [r["torch_threads"] for r in c.get("/health").json()["replicas"]] == [2, 2]
        want = sorted((m, *s) for m, s in seen.items())  # the replicas report what they hold within seconds
        until(
            lambda: (
                sorted(
                    (r["model_id"], r["replica"])
                    for r in c.get("/models").json()["loaded_models"]
                    if r["model_id"] in seen
                )
                == want
            ),
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
    base, *_ = served
    llama = str(tiny_models["llama"])
    bodies = [
        ("/extract", {"model": llama, "text": "hi", "hidden_state_layers": [99]}),
        ("/generate", {"model": llama, "prompt": "hi", "max_tokens": "5"}),
        ("/extract", {"model": "/no/such/model", "text": "hi"}),
        ("/generate", {"model": llama, "prompt": "hi", "interventions": [{"site": 1, "op": "steer"}]}),
    ]
    async with concurrent_client(app_with()) as one:
        with httpx.Client(base_url=base, timeout=120, headers=AUTH) as c:
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


def router(base: str) -> dict[str, int]:
    """What the router did: body bytes read, requests refused before forwarding, requests forwarded."""
    return httpx.get(f"{base}/ray/router", headers=AUTH, timeout=60).json()


def send(base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    """One request exactly as written (http.client adds no Host or Content-Type of its own beyond these)."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


@pytest.mark.slow
def test_a_request_the_app_would_refuse_loads_nothing_on_any_replica(served, tiny_models):
    """The router runs the app's checks before forwarding: without the key, cross-site, or under a foreign Host, a
    request names a model and nothing loads it (the replicas' /models stay empty of it)."""
    base, *_ = served
    target = tiny_models["mistral"]  # loaded by no other test of this module
    port = urlparse(base).port
    own = f"127.0.0.1:{port}"
    body = json.dumps({"model": str(target), "text": "hi"}).encode()
    before = router(base)
    tries = [
        ("GET", f"/models/{target}", None, {"Host": own}, 401),
        ("POST", "/models/load", body, {"Host": own, "Content-Type": "application/json"}, 401),
        ("POST", "/extract", body, {"Host": own, "Content-Type": "text/plain", **AUTH}, 415),
        (
            "POST",
            "/extract",
            body,
            {"Host": own, "Origin": "http://evil.example", "Content-Type": "application/json", **AUTH},
            403,
        ),
        ("POST", "/extract", body, {"Host": f"evil.example:{port}", "Content-Type": "application/json", **AUTH}, 403),
        ("GET", f"/models/{target}", None, {"Host": f"evil.example:{port}", **AUTH}, 403),
    ]
    for method, path, data, headers, status in tries:
        assert send(base, method, path, data, headers) == status, (method, path, headers)
    refused_at = time.time()
    after = router(base)
    assert after["refused"] - before["refused"] == len(tries) and after["forwarded"] == before["forwarded"]
    assert after["body_bytes"] == before["body_bytes"]  # refused from the headers alone
    # Every replica reports what it holds after the refusals (its report's time, not a guess at how long to wait).
    until(
        lambda: all(r["reported"] > refused_at for r in health(base).get("replicas", [{"reported": 0}])),
        "fresh reports",
    )
    loaded = {row["model_id"] for row in httpx.get(f"{base}/models", headers=AUTH, timeout=60).json()["loaded_models"]}
    assert str(target) not in loaded, loaded


@pytest.mark.slow
def test_a_body_is_read_no_further_than_its_limit(served):
    """A chunked body past max_body_mb (10 MiB) is answered 413 once the router has read just past the limit, while
    the rest is never sent; a Content-Length over it is answered before any of the body is read. So 256 MiB costs
    what 16 MiB does."""
    base, *_ = served
    url = urlparse(base)
    chunk = b"x" * 2**20
    for declared in (16, 256):  # MiB
        before = router(base)["body_bytes"]
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.putrequest("POST", "/extract", skip_host=True)
        for name, value in {"Host": f"127.0.0.1:{url.port}", "Content-Type": "application/json", **AUTH}.items():
            conn.putheader(name, value)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        status = None
        for _ in range(declared):  # the whole body, unless the answer comes first
            try:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server answered and closed
                break
            if router(base)["body_bytes"] - before > 10 * 2**20:
                break  # past the limit: the answer must come without the rest
        response = conn.getresponse()
        status = response.status
        conn.close()
        read = router(base)["body_bytes"] - before
        assert status == 413, status
        assert 10 * 2**20 < read <= 12 * 2**20, read
    before = router(base)["body_bytes"]
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.putrequest("POST", "/extract", skip_host=True)
    for name, value in {"Host": f"127.0.0.1:{url.port}", "Content-Type": "application/json", **AUTH}.items():
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(256 * 2**20))
    conn.endheaders()
    conn.send(chunk)  # one MiB of the 256 declared, then nothing
    assert conn.getresponse().status == 413
    conn.close()
    assert router(base)["body_bytes"] == before


@pytest.mark.slow
def test_no_ray_socket_of_the_application_listens_beyond_loopback(served):
    _base, _log, proc, home = served
    mine = descendants(proc.pid)
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ours = [line for line in listening if any(int(p) in mine for p in re.findall(r"pid=(\d+)", line))]
    assert len(ours) >= 8, listening  # the GCS, the raylet, its workers, the agents, the proxy
    hosts = {line.split()[3].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:") for line in ours}
    assert hosts == {"127.0.0.1"}, "\n".join(ours)
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) >= 32
    raylet = next(
        p for p in mine if Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip() == "raylet"
    )
    assert b"RAY_AUTH_MODE=token" in Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")


@pytest.mark.slow
def test_a_log_that_is_a_file_has_no_terminal_codes(served, tiny_models):
    """The server's log here is a file: the replicas' lines Ray forwards carry their prefix, and no colour codes."""
    base, log, _proc, _home = served
    r = httpx.post(
        f"{base}/extract", json={"model": str(tiny_models["gpt2"]), "text": "a log"}, headers=AUTH, timeout=120
    )
    assert r.status_code == 200, r.text
    until(lambda: "pid=" in log.read_text(), "a replica's line forwarded", STARTUP_S, 0.2)
    text = log.read_text()
    assert "\x1b[" not in text, [line for line in text.splitlines() if "\x1b[" in line][:5]


@pytest.mark.slow
def test_two_replicas_share_their_stores(served, tiny_models):
    """A vector stored through one replica steers a request another replica serves, as the same numbers sent."""
    base, *_ = served
    llama = str(tiny_models["llama"])
    vector = (np.arange(64, dtype=np.float32) / 64 - 0.5).tolist()
    ask = {"model": llama, "prompt": "the cat sat", "max_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=base, timeout=120, headers=AUTH) as c:
        serving = replica_of(c.post("/generate", json=ask))

        def stored_elsewhere() -> str | None:
            r = c.post("/vectors", json={"name": "shared", "vector": vector, "replace": True})
            assert r.status_code in (201, 200), r.text  # 200: the same vector is stored under that name already
            return r.headers["x-loom-replica"] if r.headers["x-loom-replica"] != serving else None

        until(stored_elsewhere, "a store landed on the other replica", STARTUP_S, 0.0)
        edit = {"site": 2, "op": "add", "scale": 4.0}
        by_name = c.post("/generate", json={**ask, "interventions": [{**edit, "vector": "shared"}]})
        by_value = c.post("/generate", json={**ask, "interventions": [{**edit, "vector": vector}]})
        assert replica_of(by_name) == serving, by_name.text
        assert by_name.json()["token_ids"] == by_value.json()["token_ids"]
        assert by_name.json()["token_ids"] != c.post("/generate", json=ask).json()["token_ids"]
        listed = {r.headers["x-loom-replica"]: r.json() for r in (c.get("/vectors") for _ in range(8))}
        assert all([v["name"] for v in listing["vectors"]] == ["shared"] for listing in listed.values())


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_no_request_hangs(served, tiny_models):
    base, _log, proc, _home = served
    body = {"model": str(tiny_models["llama"]), "text": "the cat sat"}
    with httpx.Client(
        base_url=base, timeout=60, headers=AUTH
    ) as c:  # a request past this timeout fails the test: no hang
        assert c.post("/extract", json=body).status_code == 200
        before = {s["replica"] for s in health(base)["replicas"]}
        pids = subprocess.run(["pgrep", "-f", "ServeReplica:loom:LoomReplica"], capture_output=True, text=True)
        victims = [pid for pid in pids.stdout.split() if int(pid) in descendants(proc.pid)]  # ours, not another Ray's
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


def our_processes(root: int, title: str) -> list[int]:
    """This server's processes whose command line has ``title`` (Ray names a worker after its actor)."""
    found = subprocess.run(["pgrep", "-f", title], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if int(pid) in descendants(root)]


@pytest.mark.slow
def test_replicas_killed_mid_stream_end_it_with_an_error_event(served, tiny_models):
    """A stream whose replica dies after its first events ends, at once, with an ``error`` event (a 503 problem), as
    a stream the app itself cannot finish does: never a hang, and never an end a client could take for a whole
    answer. The replica holds the generation at its third step (``HOLD``), so it cannot end before the kill."""
    base, _log, proc, home = served
    ask = {"model": str(tiny_models["llama"]), "prompt": "hold the line", "max_tokens": 480, "temperature": 0}
    before = {s["replica"] for s in health(base)["replicas"]}
    events: list[str] = []
    data: list[str] = []
    with (
        httpx.Client(base_url=base, timeout=120, headers=AUTH) as c,
        c.stream("POST", "/generate/stream", json=ask) as s,
    ):
        assert s.status_code == 200, s.read()
        lines = s.iter_lines()
        for line in lines:  # the replica is streaming
            if line.startswith("event:"):
                events.append(line)
                break
        until(lambda: (home / "held").exists(), "a replica holds the generation", STARTUP_S)
        for pid in our_processes(proc.pid, "ServeReplica:loom:LoomReplica"):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(httpx.TransportError):  # a connection cut short is recorded as no final event
            for line in lines:
                if line.startswith("event:"):
                    events.append(line)
                elif line.startswith("data:"):
                    data.append(line)
    assert "event: done" not in events, "the stream finished before the replicas were killed"
    assert events[-1] == "event: error", events[-3:]
    problem = json.loads(data[-1].removeprefix("data:"))
    assert problem["status"] == 503 and "replica" in problem["detail"], problem
    until(
        lambda: (now := {s["replica"] for s in health(base).get("replicas", [])}).isdisjoint(before) and len(now) == 2,
        "Ray replaced the killed replicas",
        STARTUP_S,
        0.2,
    )


@pytest.mark.slow
def test_a_killed_registry_comes_back_and_health_is_never_a_500(served):
    """The registry the replicas report to is one actor: killed, Ray restarts it and the replicas fill it again;
    meanwhile /health, /models and /metrics are a 503 problem, never a 500."""
    base, _log, proc, _home = served
    (registry,) = our_processes(proc.pid, "ray::Registry")
    os.kill(registry, signal.SIGKILL)

    def whole_again() -> bool:
        for path in ("/health", "/models", "/metrics"):
            r = httpx.get(f"{base}{path}", headers=AUTH, timeout=120)
            assert r.status_code in (200, 503), (path, r.status_code, r.text)
            if r.status_code == 503:
                assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"], r.text
                return False
        return len(health(base).get("replicas", [])) == 2

    until(whole_again, "the registry restarted and refilled", STARTUP_S, 0.2)
    assert our_processes(proc.pid, "ray::Registry") != [registry]


@pytest.mark.slow
def test_a_request_may_reload_a_model_its_replica_had_before_ray_knew(served, tiny_models):
    """The replica registers a request's model with Ray's multiplexing on a task of its own, whose ``get`` ran in a
    copy of the request's context and so held the model it found for the request: a preloaded model, which Ray had
    not yet seen there. A request for it with other load options then found it in flight under its own hold, and
    its reload was refused (409, "serving requests with other load options")."""
    base, *_ = served
    preloaded = str(tiny_models["qwen2"])
    with httpx.Client(base_url=base, timeout=120, headers=AUTH) as c:
        until(
            lambda: preloaded in [m["model_id"] for m in c.get("/models").json()["loaded_models"]],
            "a replica reported its preloaded model",
            STARTUP_S,
            0.2,
        )
        r = c.post("/extract", json={"model": preloaded, "text": "the cat", "dtype": "bfloat16"})
        assert r.status_code == 200, r.text


def hub_snapshot(home: Path, repo: str, commit: str, model: Path) -> None:
    """``model`` as the snapshot ``commit`` of the hub model ``repo`` in the servers' Hugging Face cache (their HOME's),
    read offline; the first snapshot made is the repo's ``main``."""
    import shutil

    cache = home / ".cache" / "huggingface" / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, cache / "snapshots" / commit)
    (cache / "refs").mkdir(exist_ok=True)
    if not (cache / "refs" / "main").exists():
        (cache / "refs" / "main").write_text(commit)


def rows_of(base: str, model_id: str, since: float) -> list[dict[str, Any]]:
    """``/models``' rows for ``model_id`` once every replica has reported after ``since``."""
    until(
        lambda: all(r["reported"] > since for r in health(base).get("replicas", [{"reported": 0}])),
        "fresh reports",
        STARTUP_S,
        0.2,
    )
    rows = httpx.get(f"{base}/models", headers=AUTH, timeout=60).json()["loaded_models"]
    return [row for row in rows if row["model_id"] == model_id]


@pytest.mark.slow
def test_a_first_request_with_load_options_loads_only_what_it_asked_for(served, tiny_models):
    """The replica registers a request's model with Ray's multiplexing as the request's own load starts. The
    registration loaded the model itself, with no options of its own: for a first request naming a revision it
    loaded the repo's ``main`` beside the revision asked for (two copies, one nobody asked for), and for a first
    request naming a dtype it raced the request's own load (a 409, "is being loaded with other options", whenever it
    won). It now waits for the request's own load: one copy, the one asked for, and Ray routes the model's next
    requests to it."""
    base, _log, _proc, home = served
    repo, main, other = "loom-test/tiny-gpt2", "1" * 40, "2" * 40
    hub_snapshot(home, repo, main, tiny_models["gpt2"])
    hub_snapshot(home, repo, other, tiny_models["gpt2"])
    with httpx.Client(base_url=base, timeout=120, headers=AUTH) as c:
        r = c.post("/extract", json={"model": repo, "revision": other, "text": "the cat"})
        serving = replica_of(r)
        rows = rows_of(base, repo, time.time())
        assert [(row["replica"], row["path"]) for row in rows] == [
            (
                serving,
                str(
                    home / ".cache" / "huggingface" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / other
                ),
            )
        ], rows
        assert {
            replica_of(c.post("/extract", json={"model": repo, "revision": other, "text": "hi"})) for _ in range(3)
        } == {serving}
        fresh = home / "fresh-llama"  # a model no replica has seen, first asked for in bfloat16
        import shutil

        shutil.copytree(tiny_models["llama"], fresh)
        r = c.post("/extract", json={"model": str(fresh), "dtype": "bfloat16", "text": "the cat"})
        serving = replica_of(r)
        rows = rows_of(base, str(fresh), time.time())
        assert [(row["replica"], row["dtype"]) for row in rows] == [(serving, "bfloat16")], rows
        again = {c.post("/extract", json={"model": str(fresh), "dtype": "bfloat16", "text": "hi"}) for _ in range(3)}
        assert {replica_of(r) for r in again} == {serving}


@pytest.mark.slow
def test_a_websocket_is_refused_and_the_router_serves_on(served):
    """The app serves no WebSocket: the router refuses one at the handshake (403, the ASGI close before accept),
    forwards nothing to a replica, logs no error, and goes on serving."""
    import websockets.exceptions
    import websockets.sync.client

    base, log, _proc, _home = served
    before = router(base)
    for path in ("/health", "/extract", "/v1/chat/completions"):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(
                base.replace("http://", "ws://") + path, additional_headers=AUTH, open_timeout=60
            )
        assert refused.value.response.status_code == 403, refused.value.response
    after = router(base)
    assert after["forwarded"] == before["forwarded"] and after["refused"] - before["refused"] == 3, (before, after)
    assert health(base)["status"] == "ok"
    text = log.read_text()
    assert "KeyError" not in text and "websocket" not in text.lower(), text[-4000:]


async def test_a_replicas_stream_ends_with_its_last_body():
    """An app that answers in parts and then listens for the client leaving (as a stream does) is told the client
    left once its answer is whole, as a server tells it: its request ends. It waited forever, holding the request,
    its model (never idle, so never unloaded) and Ray's count of the replica's ongoing requests."""
    import asyncio

    from loom_ray.replica import run_asgi

    heard: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        heard.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"event: token\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"event: done\n\n", "more_body": False})
        heard.append(await receive())

    request = {"method": "POST", "path": "/generate/stream", "raw_path": b"/generate/stream", "query_string": b""}
    request |= {"headers": [], "client": None, "server": None, "body": b"{}"}
    async with asyncio.timeout(60):  # against a hang only
        sent = [message async for message in run_asgi(app, request, "r1")]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert (b"x-loom-replica", b"r1") in sent[0]["headers"]
    assert heard == [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]


@pytest.mark.slow
def test_a_stream_through_ray_ends_at_the_router_once_sent(served, tiny_models):
    """A stream whose last event has been sent ends at the router (its count of requests in flight falls back to the
    one asking it) and so on the replica. The replica's app listened for the client leaving until Ray told it, which
    it never did: the request stayed in flight at the router and on the replica (Ray's count of its ongoing
    requests), and a stopping server waited for it."""
    base, *_ = served
    ask = {"model": str(tiny_models["gpt2"]), "prompt": "the cat", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=base, timeout=120, headers=AUTH) as c:
        with c.stream("POST", "/generate/stream", json=ask) as s:
            assert s.status_code == 200
            assert [line for line in s.iter_lines() if line.startswith("event:")][-1] == "event: done"
        until(lambda: router(base)["in_flight"] == 1, "the stream's request ended at the router", 60, 0.1)


# Last in the module: it stops the module's server.
@pytest.mark.slow
def test_a_stopping_server_answers_its_requests_in_flight_then_stops(served, tiny_models):
    """SIGTERM: the router answers new requests 503 (Retry-After) while a request in flight (its body still coming
    in) goes on to its whole answer; then the server stops, with no replica left waiting on requests. Ray Serve's own
    shutdown ended Ray's proxy at once, cutting every connection, and waited for its deployments' requests (a
    stream's never ended) until it gave up after 30 s."""
    base, log, proc, _home = served
    url = urlparse(base)
    body = json.dumps({"model": str(tiny_models["llama"]), "prompt": "the cat", "max_tokens": 8}).encode()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.putrequest("POST", "/generate/stream", skip_host=True)
    headers = {"Host": f"127.0.0.1:{url.port}", "Content-Type": "application/json", **AUTH}
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(body[:-1])  # the gate: in flight at the router until its last byte comes
    until(lambda: router(base)["in_flight"] >= 2, "the request in flight at the router", STARTUP_S, 0.05)  # and this

    def refused() -> httpx.Response | None:
        r = httpx.get(f"{base}/health", timeout=60)
        return r if r.status_code == 503 else None

    proc.send_signal(signal.SIGTERM)
    r = until(refused, "the router draining", STARTUP_S, 0.05)
    assert r.headers["retry-after"] == "1" and r.json()["status"] == 503, r.text
    conn.send(body[-1:])
    response = conn.getresponse()
    assert response.status == 200
    events = [line for line in response.read().decode().splitlines() if line.startswith("event:")]
    conn.close()
    assert events.count("event: token") == 8 and events[-1] == "event: done", events
    assert proc.wait(timeout=120) == 0  # against a hang only
    text = log.read_text()
    assert "waiting for 1 request(s) in flight" in text, text[-4000:]
    for stuck in ("ongoing requests", "did not shut down after grace period", "failed to shut down"):
        assert stuck not in text, text[-4000:]
