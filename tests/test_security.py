"""Safe defaults and their switches: the API key, CORS, the body size limit, and GET /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
from litestar.testing import AsyncTestClient
from test_models import app_with

from loom_kernel.api.security import authorized


async def test_without_a_key_configured_nothing_is_asked(tiny_models):
    async with AsyncTestClient(app=app_with()) as c:
        assert (await c.get("/models")).status_code == 200


async def test_api_key_guards_every_endpoint_but_health(tiny_models):
    key = "s3cret-key"
    async with AsyncTestClient(app=app_with(api_key=key)) as c:
        assert (await c.get("/health")).status_code == 200
        for method, path in [
            ("GET", "/models"),
            ("GET", "/metrics"),
            ("GET", "/schema/openapi.json"),
            ("GET", "/v1/models"),
        ]:
            r = await c.request(method, path)
            assert r.status_code == 401, path
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["field"] == "authorization" and r.json()["request_id"]
        wrong = await c.get("/models", headers={"Authorization": "Bearer s3cret-kez"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["detail"]
        assert (await c.get("/models", headers={"Authorization": f"Basic {key}"})).status_code == 401
        assert (await c.get("/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        body = {"model": str(tiny_models["llama"]), "text": "hello"}
        assert (await c.post("/extract", json=body)).status_code == 401
        assert (await c.post("/extract", json=body, headers={"Authorization": f"bearer {key}"})).status_code == 200


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (b"Bearer k", True),
        (b"bearer k", True),
        (b"Bearer  k ", True),
        (b"Bearer kk", False),
        (b"k", False),
        (b"", False),
    ],
)
def test_authorization_header_parsing(header, ok):
    assert authorized(header, b"k") is ok


def test_the_openai_client_sends_the_key(tiny_models, tmp_path):
    """The official client's api_key is the server's key: a real server, a real socket."""
    import openai
    from serverutil import loom_server

    model = str(tiny_models["llama"])
    with loom_server([], tmp_path, LOOM_API_KEY="k-123") as (base, _, _):
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123")
        out = good.completions.create(model=model, prompt="hello", max_tokens=3, temperature=0)
        assert out.choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
        assert httpx.get(f"{base}/health").status_code == 200


async def test_oversized_body_is_a_413(tiny_models):
    async with AsyncTestClient(app=app_with(max_body_mb=0.01)) as c:
        r = await c.post("/extract", json={"model": str(tiny_models["llama"]), "text": "x" * 20_000})
        assert r.status_code == 413
        assert r.headers["content-type"].startswith("application/problem+json")
        ok = await c.post("/extract", json={"model": str(tiny_models["llama"]), "text": "short"})
        assert ok.status_code == 200


async def test_cors_is_off_unless_configured():
    origin = {"Origin": "http://notebook.example", "Access-Control-Request-Method": "POST"}
    async with AsyncTestClient(app=app_with()) as c:
        r = await c.get("/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    async with AsyncTestClient(app=app_with(cors_origins=["http://notebook.example"])) as c:
        r = await c.get("/health", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://notebook.example"
        other = await c.get("/health", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def parse(text: str) -> dict[str, float]:
    """Prometheus text to {series: value}; every line must be a comment or a well-formed sample."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) loom_\w+ ", line), line
            continue
        m = re.fullmatch(r'(loom_\w+(?:\{(?:\w+="[^"]*",?)*\})?) (-?[0-9.e+]+|\+Inf)', line)
        assert m, line
        out[m.group(1)] = float(m.group(2))
    return out


async def test_metrics_count_requests_tokens_loads_and_batches(tiny_models):
    model = str(tiny_models["llama"])
    async with AsyncTestClient(app=app_with()) as c:
        await c.post("/models/load", json={"model": model})
        for _ in range(3):
            r = await c.post("/generate", json={"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200
        generated = 3 * r.json()["token_count"]
        assert (await c.post("/extract", json={"model": model, "text": ""})).status_code == 422
        await c.get("/no/such/path")
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        series = parse(r.text)
        label = f'model="{model}"'
        assert series['loom_http_requests_total{method="POST",route="/generate",status="200"}'] == 3
        assert series['loom_http_requests_total{method="POST",route="/extract",status="422"}'] == 1
        assert series['loom_http_requests_total{method="GET",route="unmatched",status="404"}'] == 1
        assert series['loom_http_request_duration_seconds_count{route="/generate"}'] == 3
        assert series['loom_http_request_duration_seconds_bucket{route="/generate",le="+Inf"}'] == 3
        assert series[f"loom_generated_tokens_total{{{label}}}"] == generated
        assert series[f"loom_model_loads_total{{{label}}}"] == 1
        assert series[f"loom_batches_total{{{label}}}"] == 3
        assert series[f"loom_queue_depth{{{label}}}"] == 0
        assert series["loom_models_loaded"] == 1


async def test_metrics_model_labels_are_bounded():
    from loom_kernel.metrics import MAX_MODELS, Metrics

    m = Metrics()
    for i in range(MAX_MODELS + 10):
        m.model(f"model-{i}").loads += 1
    text = m.exposition([])
    assert len(re.findall(r"^loom_model_loads_total\{", text, re.M)) == MAX_MODELS + 1
    assert 'loom_model_loads_total{model="other"} 10' in text


async def test_a_lab_shares_one_server_each_key_with_its_own_store_names(tiny_models):
    """Several keys: each key's vectors and probes are its own (stored, listed, used and deleted apart), the
    same content stored again under its name is a 200 (a notebook cell run twice), other content a 409."""
    model = str(tiny_models["gpt2"])
    keys = {"alice": "alice-key", "bob": "bob-key"}
    auth = {who: {"Authorization": f"Bearer {key}"} for who, key in keys.items()}
    async with AsyncTestClient(app=app_with(api_key=list(keys.values()))) as c:
        size = (await c.post("/extract", json={"model": model, "text": "hi"}, headers=auth["bob"])).json()
        width = size["metadata"]["hidden_size"]
        vectors = {"alice": [0.5] * width, "bob": [-2.0] * width}
        for who, vector in vectors.items():
            r = await c.post("/vectors", json={"name": "steer", "vector": vector}, headers=auth[who])
            assert r.status_code == 201, r.text
        again = await c.post("/vectors", json={"name": "steer", "vector": vectors["bob"]}, headers=auth["bob"])
        assert again.status_code == 200 and again.json()["name"] == "steer"
        other = await c.post("/vectors", json={"name": "steer", "vector": vectors["alice"]}, headers=auth["bob"])
        assert other.status_code == 409 and other.json()["field"] == "name"
        for who in keys:
            listed = (await c.get("/vectors", headers=auth[who])).json()["vectors"]
            assert [v["name"] for v in listed] == ["steer"]
            got = (await c.get("/vectors/steer", headers=auth[who])).json()
            assert got["vector"]["data"] == vectors[who]
        # A request naming the vector gets its own key's: the same answer as sending those numbers inline.
        edit = {"site": 1, "op": "add", "positions": "all"}
        body = {"model": model, "text": "the cat", "hidden_state_layers": [-1]}
        named = await c.post(
            "/extract", json={**body, "interventions": [{**edit, "vector": "steer"}]}, headers=auth["bob"]
        )
        inline = await c.post(
            "/extract", json={**body, "interventions": [{**edit, "vector": vectors["bob"]}]}, headers=auth["bob"]
        )
        assert named.json()["hidden_states"] == inline.json()["hidden_states"]
        assert (await c.delete("/vectors/steer", headers=auth["alice"])).status_code == 200
        assert (await c.get("/vectors/steer", headers=auth["alice"])).status_code == 404
        assert (await c.get("/vectors/steer", headers=auth["bob"])).status_code == 200
        probe = {"name": "p", "site": -1, "weight": [[0.1] * width, [0.2] * width], "bias": [0, 0]}
        r = await c.post("/probes", json={**probe, "labels": ["yes", "no"]}, headers=auth["alice"])
        assert r.status_code == 201 and r.json()["labels"] == ["yes", "no"]
        assert (await c.get("/probes/p", headers=auth["alice"])).json()["labels"] == ["yes", "no"]
        assert (await c.get("/probes/p", headers=auth["bob"])).status_code == 404


def test_several_keys_come_from_the_environment_and_the_config_file(tmp_path):
    from loom_kernel.config import load_settings

    assert load_settings(env={"LOOM_API_KEY": "k1, k2"}).api_key == ["k1", "k2"]
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  api_key: [a, b, c]\n")
    assert load_settings(str(config), env={}).api_key == ["a", "b", "c"]
    config.write_text("server:\n  api_key: only\n")
    assert load_settings(str(config), env={}).api_key == ["only"]
