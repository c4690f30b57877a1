"""One test per hookspec, through a real plugin manager, plus pluggy's check_pending."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

from loom_kernel import LoadOptions, ModelRef, ProbeResult, QuantizationPlan, choosing, hookimpl
from loom_kernel.config import Settings
from loom_kernel.errors import InvalidField, MissingBackend
from loom_kernel.installed import ENTRY_POINT_GROUP, describe_plugins, loader_names
from loom_kernel.models import ModelManager
from loom_kernel.plugins import create_plugin_manager


class ToyPlugin:
    """A third-party plugin registered in-process, as a test would."""

    @hookimpl
    def probe(self, model: ModelRef) -> ProbeResult | None:
        if (model.manifest or {}).get("toy"):
            return ProbeResult(loader="toy", score=1.0, reason="loom.json says toy")
        return ProbeResult(loader="toy", score=0.05, reason="last resort")

    @hookimpl
    def load(self, model: ModelRef, loader: str, options: LoadOptions) -> None:
        return None  # never asked in these tests; implementing load makes "toy" a loader name

    @hookimpl
    def quantize(self, method: str, options: LoadOptions) -> QuantizationPlan | None:
        return (
            QuantizationPlan(method=method, load_kwargs={"toy_bits": 3}, provider="toy") if method == "3bit" else None
        )

    @hookimpl
    def pool(self, output, strategy: str, mask):
        return output.float().sum(1) if strategy == "toy_sum" else None


@pytest.fixture
def pm():
    pm = create_plugin_manager()
    toy = ToyPlugin()
    pm.register(toy, name="toy")
    pm.check_pending()
    yield pm
    pm.unregister(toy)


def test_entry_points_are_real_installed_distributions():
    names = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {"transformers", "http", "unix"} <= names
    pm = create_plugin_manager()
    pm.check_pending()
    rows = {r["name"]: r for r in describe_plugins(pm)}
    assert rows["transformers"]["package"] == "loom-plugin-transformers"
    assert "load" in rows["transformers"]["hooks"] and "probe" in rows["transformers"]["hooks"]
    assert rows["http"]["hooks"] == ["transport"]


def test_load_plugins_env_limits_entry_points(monkeypatch):
    monkeypatch.setenv("LOOM_LOAD_PLUGINS", "http")
    names = {r["name"] for r in describe_plugins(create_plugin_manager())}
    assert "http" in names and "transformers" not in names and "unix" not in names
    monkeypatch.setenv("LOOM_LOAD_PLUGINS", "")
    assert loader_names(create_plugin_manager()) == []


def test_probe(pm, tiny_models):
    manager = ModelManager(pm, Settings())
    ref = manager.resolve(str(tiny_models["llama"]))
    ranking = choosing.rank(pm, ref)
    assert [r.loader for r in ranking] == ["transformers", "toy"]
    assert ranking[0].score == 0.5 and ranking[1].score == 0.05
    assert choosing.rank(pm, ref) == ranking  # deterministic
    assert choosing.choose_loader(pm, ref, None) == "transformers"
    assert choosing.choose_loader(pm, ref, "toy") == "toy"


def test_load(pm, tiny_models):
    manager = ModelManager(pm, Settings())
    ref = manager.resolve(str(tiny_models["gpt2"]))
    loaded = pm.hook.load(model=ref, loader="transformers", options=LoadOptions(), kernel=None)
    assert loaded.loader == "transformers" and loaded.num_layers == loaded.model.config.n_layer
    assert pm.hook.load(model=ref, loader="nobody", options=LoadOptions(), kernel=None) is None


def test_forward_with_states(pm, tiny_models):
    from loom_kernel import Batch, Capture, resolve_layers

    manager = ModelManager(pm, Settings())
    loaded = pm.hook.load(
        model=manager.resolve(str(tiny_models["llama"])), loader="transformers", options=LoadOptions(), kernel=None
    )
    capture = Capture(layers=resolve_layers([0, -1], loaded.num_layers), positions="all")
    out = pm.hook.forward_with_states(model=loaded, batch=Batch(texts=("hello world",)), capture=capture)
    row = out.rows[0]
    ids = torch.tensor([row.token_ids])
    with torch.inference_mode():
        ref = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(row.states["0"], ref[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row.states["-1"], ref[-1][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pool(pm, side):
    rng = np.random.default_rng(0)
    states = rng.normal(size=(3, 5, 4)).astype(np.float32)
    lengths = [5, 3, 1]
    mask = np.zeros((3, 5), dtype=np.int64)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 5 - n :] = 1
    states[mask == 0] = 1e4  # padding that leaked into any strategy would dominate its result
    t, m = torch.from_numpy(states), torch.from_numpy(mask)
    for i in range(3):
        real = states[i][mask[i] == 1]
        expected = {
            "mean": real.mean(0),
            "max": real.max(0),
            "cls": real[0],
            "first_token": real[0],
            "last_token": real[-1],
        }
        for strategy, want in expected.items():
            got = pm.hook.pool(output=t, strategy=strategy, mask=m)[i].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=strategy)
    per_token = pm.hook.pool(output=t, strategy="none", mask=m)
    assert per_token.shape == (3, 5, 4)
    for i in range(3):  # "none" keeps every token's state; a row's own tokens are where its mask is set
        np.testing.assert_array_equal(per_token[i].numpy()[mask[i] == 1], states[i][mask[i] == 1])
    # A plugin adds a strategy by name; unknown names fall through to None.
    np.testing.assert_allclose(pm.hook.pool(output=t, strategy="toy_sum", mask=m).numpy(), states.sum(1), rtol=1e-6)
    assert pm.hook.pool(output=t, strategy="nope", mask=m) is None


def test_quantize(pm):
    manager = ModelManager(pm, Settings(default_device="cpu"))
    opts = manager.options(quantization="3bit")
    assert opts.quantization_plan == QuantizationPlan(method="3bit", load_kwargs={"toy_bits": 3}, provider="toy")
    gptq = pm.get_plugin("gptq")
    if gptq is not None:  # installed: it reads gptq checkpoints but does not quantize at load time
        with pytest.raises(InvalidField) as bad:
            manager.options(quantization="gptq")
        assert bad.value.field == "quantization" and "offline" in bad.value.detail
        pm.unregister(gptq)
    try:
        with pytest.raises(MissingBackend) as err:
            manager.options(quantization="gptq")
        assert "pip install loom-plugin-gptq" in err.value.detail and err.value.status == 424
    finally:
        if gptq is not None:
            pm.register(gptq, name="gptq")


def test_transport(pm, tmp_path):
    settings = Settings(port=0, unix_socket=str(tmp_path / "t.sock"))
    names = sorted(t.name for t in pm.hook.transport(settings=settings) if t is not None)
    assert names == ["http", "ray", "unix"]


async def test_missing_loaders_name_the_package_to_install(tmp_path, tiny_models):
    """A loader or a checkpoint format whose plugin is not installed is a 424 that says what to pip install."""
    import json
    import shutil

    from litestar.testing import AsyncTestClient

    from loom_kernel.api import create_app
    from loom_kernel.config import Settings
    from loom_kernel.plugins import create_plugin_manager

    pm = create_plugin_manager()
    for name in ("gptq", "custom"):
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
    gptq = tmp_path / "gptq-checkpoint"
    shutil.copytree(tiny_models["llama"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (gptq / "config.json").write_text(json.dumps(config))
    async with AsyncTestClient(app=create_app(settings=Settings(default_device="cpu"), pm=pm)) as client:
        r = await client.post("/extract", json={"model": str(tiny_models["llama"]), "text": "hi", "loader": "custom"})
        assert r.status_code == 424 and r.json()["field"] == "loader"
        assert "pip install loom-plugin-custom" in r.json()["detail"]
        r = await client.post("/extract", json={"model": str(gptq), "text": "hi"})
        assert r.status_code == 424 and r.json()["field"] == "model"
        assert "pip install loom-plugin-gptq" in r.json()["detail"]
        r = await client.post("/extract", json={"model": str(tiny_models["llama"]), "text": "hi", "loader": "nope"})
        assert r.status_code == 422 and r.json()["field"] == "loader"


def test_routes(monkeypatch):
    """A plugin's routes join the API beside the kernel's, behind the same guard, and a restricted plugin set
    leaves the OpenAI routes (a plugin of their own) out."""
    from litestar import get
    from litestar.params import FromQuery
    from litestar.testing import TestClient

    from loom_kernel.api import create_app
    from loom_kernel.errors import InvalidField as Invalid

    @get("/toy", sync_to_thread=False)
    def toy_route(n: FromQuery[int]) -> dict[str, int]:
        if n < 0:
            raise Invalid("n: must not be negative", field="n", allowed="0 or more")
        return {"twice": 2 * n}

    class Routes:
        @hookimpl
        def routes(self):
            return [toy_route]

    pm = create_plugin_manager()
    pm.register(Routes(), name="toy-routes")
    with TestClient(create_app(pm, Settings(default_device="cpu"))) as c:
        assert c.get("/toy?n=21").json() == {"twice": 42}
        bad = c.get("/toy?n=-1")
        assert bad.status_code == 422 and bad.json()["field"] == "n"
        assert c.get("/toy?n=1", headers={"Host": "evil.example"}).status_code == 403  # the guard sees plugin routes
        assert c.get("/v1/models").status_code == 200
    monkeypatch.setenv("LOOM_LOAD_PLUGINS", "transformers")
    with TestClient(create_app(create_plugin_manager(), Settings(default_device="cpu"))) as c:
        assert c.get("/v1/models").status_code == 404
        assert c.get("/health").status_code == 200


class NormReadout:
    """A third-party readout: a request field of its own, read from the states the kernel captures for it."""

    @hookimpl
    def request_fields(self):
        from typing import Annotated

        import msgspec

        from loom_kernel import RequestField

        return [RequestField("norm_at", Annotated[int, msgspec.Meta(ge=0)], reads=True)]

    @hookimpl
    def readouts(self, model, fields):
        from loom_kernel import LayerSel, Reading

        assert set(fields) == {"norm_at"}  # a plugin is asked about its own fields only
        key = str(fields["norm_at"])

        def read(states, positions):
            return {"norms": states[key].norm(dim=-1).tolist()}

        return Reading(layers=(LayerSel(key, fields["norm_at"]),), read=read, bytes_per_position=24)


async def test_request_fields_reach_their_plugins_readouts(tiny_models):
    """A plugin's field is a field of /extract (typed, misspellings hinted), its values reach its own readouts hook,
    and its answer merges with loom-plugin-interp's lens in one request."""
    from test_models import app_with, concurrent_client
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_models["gpt2"])
    pm = create_plugin_manager()
    pm.register(NormReadout(), name="norms")
    text = "the cat sat on the mat"
    async with concurrent_client(app_with(pm)) as c:
        body = {
            "model": path,
            "text": text,
            "hidden_state_layers": [-1],
            "norm_at": 2,
            "logit_lens": {"layers": [2], "top_k": 1},
        }
        r = await c.post("/extract", json=body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer["hidden_states"]) == {"-1"} and answer["logit_lens"]  # what the readouts read stays theirs
        r = await c.post("/extract", json={"model": path, "text": text, "norm_atx": 2})
        assert r.status_code == 422 and "did you mean `norm_at`" in r.json()["detail"], r.text
        r = await c.post("/extract", json={"model": path, "text": text, "norm_at": -1})
        assert r.status_code == 422 and "norm_at" in r.text, r.text
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        states = net(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[2][0]
    assert answer["norms"] == pytest.approx(states[-1:].norm(dim=-1).tolist(), abs=1e-4)
    async with concurrent_client(app_with()) as c:  # without the plugin the field is unknown
        r = await c.post("/extract", json={"model": path, "text": text, "norm_at": 2})
        assert r.status_code == 422 and "norm_at" in r.json()["detail"]


def test_two_plugins_may_not_declare_one_request_field():
    from loom_kernel import RequestField
    from loom_kernel.api import create_app
    from loom_kernel.config import ConfigError

    class Clash:
        @hookimpl
        def request_fields(self):
            return [RequestField("probes", list)]

    pm = create_plugin_manager()
    pm.register(Clash(), name="clash")
    with pytest.raises(ConfigError, match="probes"):
        create_app(pm=pm, settings=Settings(default_device="cpu"))


def test_install_hints(pm, tiny_models):
    """A plugin's install hints name what to pip install for a loader nobody provides; the kernel names none."""

    class Hints:
        @hookimpl
        def install_hints(self):
            return {"loader": {"toyx": "loom-plugin-toyx"}}

    pm.register(Hints(), name="hints")
    ref = ModelRef(id="m", path=tiny_models["llama"])
    with pytest.raises(MissingBackend, match="pip install loom-plugin-toyx"):
        choosing.choose_loader(pm, ref, "toyx")
    for name in ("transformers", "custom"):  # the bundled plugins' hints are the transformers plugin's
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
    with pytest.raises(InvalidField, match="unknown loader 'custom'"):
        choosing.choose_loader(pm, ref, "custom")
