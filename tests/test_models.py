"""The model manager: LRU, idle unload, failed loads, in-flight guards, reloads on new options."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import httpx
import pytest
from litestar.testing import AsyncTestClient

from loom_kernel import LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl
from loom_kernel.api import create_app
from loom_kernel.config import Settings
from loom_kernel.errors import LoadFailed
from loom_kernel.plugins import create_plugin_manager


class BrokenLoader:
    """A third-party loader that claims models marked ``{"broken": true}`` in loom.json, then fails to load them."""

    @hookimpl
    def probe(self, model: ModelRef) -> ProbeResult | None:
        if (model.manifest or {}).get("broken"):
            return ProbeResult(loader="broken", score=1.0, reason="loom.json marks it broken")
        return None

    @hookimpl
    def load(self, model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
        if loader != "broken":
            return None
        raise LoadFailed("model: the broken loader always fails", field="model")


def app_with(pm=None, **settings):
    return create_app(pm=pm, settings=Settings(default_device="cpu", **settings))


@contextlib.asynccontextmanager
async def concurrent_client(app):
    """Requests that really overlap: Litestar's test client runs each request to completion on a portal thread,
    so concurrency tests talk to the ASGI app directly."""
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://loom") as c:
            yield c
    finally:
        await app.state.manager.stop()


async def test_lru_evicts_least_recently_used(tiny_models):
    app = app_with(max_models=2)
    async with AsyncTestClient(app=app) as c:
        a, b, d = (str(tiny_models[k]) for k in ("llama", "gpt2", "qwen2"))
        for path in (a, b):
            assert (await c.post("/extract", json={"model": path, "text": "x"})).status_code == 200
        await c.post("/extract", json={"model": a, "text": "touch a"})  # b is now least recently used
        assert (await c.post("/models/load", json={"model": d})).status_code == 200
        loaded = (await c.get("/health")).json()["loaded_models"]
        assert sorted(loaded) == sorted([a, d])


async def test_idle_models_unload_on_a_short_timer(tiny_models):
    app = app_with(auto_unload_minutes=0.5 / 60)  # half a second
    async with AsyncTestClient(app=app) as c:
        path = str(tiny_models["gpt2"])
        await c.post("/models/load", json={"model": path})
        row = (await c.get("/models")).json()["loaded_models"][0]
        assert 0 <= row["auto_unload_in"] <= 0.5
        for _ in range(50):
            await asyncio.sleep(0.1)
            if not (await c.get("/health")).json()["loaded_models"]:
                break
        assert (await c.get("/health")).json()["loaded_models"] == []


async def test_failed_load_evicts_nothing(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "loom.json").write_text(json.dumps({"broken": True}))
    pm = create_plugin_manager()
    pm.register(BrokenLoader(), name="broken")
    app = app_with(pm=pm, max_models=1)
    async with AsyncTestClient(app=app) as c:
        path = str(tiny_models["gpt2"])
        await c.post("/models/load", json={"model": path})
        r = await c.post("/models/load", json={"model": str(broken)})
        assert r.status_code == 500 and r.json()["title"] == "Model failed to load"
        assert (await c.get("/health")).json()["loaded_models"] == [path]
        probe = (await c.get(f"/loaders/probe/{broken}")).json()
        assert probe["selected"] == "broken"


async def test_unload_refused_while_a_request_is_in_flight(tiny_models):
    app = app_with()
    async with concurrent_client(app) as c:
        path = str(tiny_models["llama"])
        await c.post("/models/load", json={"model": path})
        manager = app.state.manager
        entry = manager.find(path)
        held = threading.Event()
        entry.worker.submit(held.wait)  # the model's thread is busy: the next request stays in flight
        request = asyncio.ensure_future(c.post("/extract", json={"model": path, "text": "hi"}))
        try:
            while entry.in_flight < 1:
                await asyncio.sleep(0.01)
            r = await c.delete(f"/models/{path}")
            assert r.status_code == 409 and r.json()["field"] == "model_id"
            app.state.settings.max_models = 0  # LRU must skip it too
            manager._evict_lru(keep=None)
            assert path in manager.loaded_ids()
        finally:
            held.set()
        assert (await request).status_code == 200
        while entry.in_flight:
            await asyncio.sleep(0.01)
        assert (await c.delete(f"/models/{path}")).status_code == 200


async def test_other_load_options_reload_instead_of_reusing(tiny_models):
    app = app_with()
    async with AsyncTestClient(app=app) as c:
        path = str(tiny_models["llama"])
        first = (await c.post("/models/load", json={"model": path})).json()["model"]
        assert first["dtype"] == "float32"
        again = (await c.post("/models/load", json={"model": path, "dtype": "float32"})).json()["model"]
        assert again["load_seconds"] == first["load_seconds"]  # same options: the cached model
        half = (await c.post("/models/load", json={"model": path, "dtype": "bfloat16"})).json()["model"]
        assert half["dtype"] == "bfloat16"
        rows = (await c.get("/models")).json()["loaded_models"]
        assert [r["dtype"] for r in rows] == ["bfloat16"]


class CountLoads:
    """Counts calls of the real load hook without changing them."""

    calls = 0

    @hookimpl(wrapper=True)
    def load(self, model: ModelRef, loader: str, options: LoadOptions):
        CountLoads.calls += 1
        return (yield)


async def test_concurrent_requests_load_a_model_once(tiny_models):
    pm = create_plugin_manager()
    pm.register(CountLoads(), name="count")
    app = app_with(pm=pm)
    async with concurrent_client(app) as c:
        path = str(tiny_models["mistral"])
        results = await asyncio.gather(*(c.post("/extract", json={"model": path, "text": f"t{i}"}) for i in range(4)))
        assert all(r.status_code == 200 for r in results)
        assert len((await c.get("/models")).json()["loaded_models"]) == 1
        assert CountLoads.calls == 1


@pytest.mark.parametrize("bad", [{"model": ""}, {"model": "x", "dtype": 3}, {}])
async def test_load_request_validation(tiny_models, bad):
    async with AsyncTestClient(app=app_with()) as c:
        r = await c.post("/models/load", json=bad)
        assert r.status_code == 422
        assert r.json()["field"] in ("model", "dtype")


class GatedLoader:
    """Waits at a gate, then loads through the transformers plugin: a load the test can watch in progress."""

    def __init__(self, pm) -> None:
        self.pm = pm
        self.entered = threading.Event()
        self.gate = threading.Event()

    @hookimpl
    def load(self, model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
        if loader != "gated":
            return None
        self.entered.set()
        assert self.gate.wait(120), "the test never opened the gate"
        loaded = self.pm.hook.load(model=model, loader="transformers", options=options, kernel=None)
        loaded.loader = "transformers"
        return loaded


async def test_a_loading_model_is_listed_as_loading(tiny_models):
    pm = create_plugin_manager()
    gated = GatedLoader(pm)
    pm.register(gated, name="gated")
    app = app_with(pm=pm)
    async with concurrent_client(app) as c:
        path = str(tiny_models["gpt2"])
        load = asyncio.ensure_future(c.post("/models/load", json={"model": path, "loader": "gated"}))
        assert await asyncio.to_thread(gated.entered.wait, 120)
        rows = (await c.get("/models")).json()["loaded_models"]
        assert [(r["model_id"], r["state"]) for r in rows] == [(path, "loading")]
        assert (await c.get("/health")).json()["loading_models"] == [path]
        gated.gate.set()
        assert (await load).status_code == 200
        rows = (await c.get("/models")).json()["loaded_models"]
        assert [(r["model_id"], r["state"]) for r in rows] == [(path, "ready")]


async def test_the_shipped_causal_model_answers_by_name_on_an_empty_cache(tmp_path, monkeypatch):
    """``pydoc-gpt2`` ships with the installation (the model_sources hook): a server whose model caches are empty
    generates with it at once, the tokens transformers' own ``generate`` gives on the shipped directory."""
    import torch
    from loom_pydoc_gpt2 import get_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    async with AsyncTestClient(app=app_with()) as c:
        r = await c.post("/generate", json={"model": "pydoc-gpt2", "prompt": "The function returns", "max_tokens": 8})
        assert r.status_code == 200, r.text
        listed = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
    assert {"pydoc-gpt2", "minilm"} <= listed
    tok = AutoTokenizer.from_pretrained(get_model_path())
    net = AutoModelForCausalLM.from_pretrained(get_model_path(), dtype=torch.float32).eval()
    ids = tok("The function returns", return_tensors="pt")["input_ids"]
    want = net.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    assert r.json()["token_ids"] == want and r.json()["metadata"]["dtype"] == "float32"
