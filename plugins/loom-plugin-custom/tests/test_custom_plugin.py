"""The custom loader through the real API, on a toy architecture that is not a transformers model.

The toy (byte embeddings + learned positions, pre-norm residual blocks with hand-written causal attention and an
MLP, a final norm, an LM head) is written into each model directory as ``toy_arch.py`` next to its weights and a
loom.json, or installed (put on ``sys.path``) for the routes that name an installed factory. The reference is the
same source executed by the test itself, with the same weights, its blocks run one by one by hand.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
import yaml
from litestar.testing import AsyncTestClient
from safetensors.torch import save_file

from loom_kernel.api import create_app
from loom_kernel.config import ConfigError, Settings, load_settings, read_config_file
from loom_kernel.errors import Forbidden, ModelNotFound
from loom_kernel.plugins import create_plugin_manager
from loom_kernel.resolve import resolve_model

TOY_ARCH = '''"""A toy architecture transformers does not know."""

import math

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm residual block: causal self-attention written out by hand, then an MLP."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        x = x + self.out(att.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.norm2(x))


class ToyNet(nn.Module):
    def __init__(self, vocab=256, hidden=32, layers=3, heads=4, context=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(context, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))


class CharTokenizer:
    """Bytes as ids; the tokens an answer shows are each id's own decode."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def build(**kwargs):
    return ToyNet(**kwargs)


def build_with_tokenizer(**kwargs):
    return ToyNet(**kwargs), CharTokenizer()


def build_nothing(**kwargs):
    return "not a module"
'''
INSTALLED = "loom_toy_arch_installed"  # the toy's module name when it is "installed" (on sys.path)
KWARGS = {"vocab": 256, "hidden": 32, "layers": 3, "heads": 4, "context": 128}
N = KWARGS["layers"]
TEXT = "Hidden states of a toy net."
MANIFEST = {
    "factory": "toy_arch:build",
    "kwargs": KWARGS,
    "blocks": "layers",
    "final_norm": "norm",
    "tokenizer": "bytes",
    "max_context": 128,
}


def toy_source_module() -> types.ModuleType:
    """The toy's source run by the test itself: the reference never goes through the plugin's import."""
    module = types.ModuleType("toy_reference")
    exec(compile(TOY_ARCH, "toy_reference.py", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    return toy_source_module().build(**KWARGS).eval()


def by_hand(net: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Index space 0..N: the embedding output, each block's output, the last one after the final norm; [T, H]."""
    with torch.no_grad():
        t = torch.tensor([ids])
        x = net.embed(t) + net.pos(torch.arange(len(ids)))
        states = [x]
        for block in net.layers:
            x = block(x)
            states.append(x)
        states[-1] = net.norm(states[-1])
    return [s[0] for s in states]


def write_model(
    root: Path, reference: torch.nn.Module, manifest: dict[str, Any] | None = MANIFEST, code: bool = True
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(reference.state_dict(), str(root / "model.safetensors"))
    if code:
        (root / "toy_arch.py").write_text(TOY_ARCH)
    if manifest is not None:
        (root / "loom.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def checkpoint(tmp_path: Path, reference: torch.nn.Module) -> Path:
    """A model directory: loom.json + toy_arch.py + model.safetensors (+ a config.json transformers would read)."""
    path = write_model(tmp_path / "toy", reference)
    (path / "config.json").write_text(json.dumps({"architectures": ["ToyNet"], "model_type": "toy"}))
    return path


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The toy as an installed module: importable from sys.path, in no model directory."""
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{INSTALLED}.py").write_text(TOY_ARCH)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, INSTALLED, raising=False)
    return INSTALLED


@contextlib.asynccontextmanager
async def client_for(**settings: Any) -> AsyncIterator[AsyncTestClient]:
    app = create_app(settings=Settings(default_device="cpu", **settings))
    async with AsyncTestClient(app=app) as client:
        yield client


def decode(entry: dict[str, Any]) -> np.ndarray:
    return np.asarray(entry["data"], dtype=np.float32).reshape(entry["shape"])


def assert_every_layer_matches(body: dict[str, Any], reference: torch.nn.Module, ids: list[int]) -> None:
    want = by_hand(reference, ids)
    seq = body["sequence_hidden_states"]
    assert sorted(seq, key=int) == [str(k) for k in range(-N, 0)]
    for key, entry in seq.items():
        index = N + 1 + int(key)
        assert body["layer_indices"][key] == index
        assert entry["shape"] == [len(ids), KWARGS["hidden"]]
        np.testing.assert_allclose(decode(entry), want[index].numpy(), rtol=0, atol=1e-6, err_msg=f"layer {key}")
        np.testing.assert_allclose(decode(body["hidden_states"][key])[0], want[index][-1].numpy(), rtol=0, atol=1e-6)


async def extract(client: AsyncTestClient, model: str, **fields: Any) -> Any:
    body = {"model": model, "text": TEXT, "hidden_state_layers": "all", "positions": "all", **fields}
    return await client.post("/extract", json=body)


# -- hooks and packaging ---------------------------------------------------------------------------------


def test_entry_point_registers_probe_load_forward_with_states() -> None:
    (ep,) = [ep for ep in metadata.entry_points(group="loom") if ep.name == "custom"]
    assert ep.value == "loom_custom" and ep.dist is not None and ep.dist.name == "loom-plugin-custom"
    pm = create_plugin_manager()
    pm.check_pending()
    hooks = {h.name for h in pm.get_hookcallers(pm.get_plugin("custom")) or []}
    assert hooks == {"probe", "load", "forward_with_states"}


async def test_probe_ranks_custom_first_for_a_loom_json(checkpoint: Path) -> None:
    async with client_for() as client:
        r = await client.get(f"/loaders/probe/{checkpoint}")  # an absolute path: its slash doubled after the prefix
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["selected"] == "custom"
    first, second = body["ranking"][:2]
    assert (first["loader"], first["score"], first["selected"]) == ("custom", 1.0, True)
    assert "loom.json" in first["reason"] and "toy_arch:build" in first["reason"]
    assert (second["loader"], second["score"]) == ("transformers", 0.5)  # its config.json alone would pick it


def test_probe_never_imports_the_factory(checkpoint: Path) -> None:
    pm = create_plugin_manager()
    before = set(sys.modules)
    results = [r for r in pm.hook.probe(model=resolve_model(str(checkpoint))) if r is not None]
    assert any(r.loader == "custom" and r.score == 1.0 for r in results)
    assert not [m for m in set(sys.modules) - before if "toy" in m or m.startswith("_loom_custom")]


# -- /extract against the blocks run by hand -------------------------------------------------------------


async def test_forward_with_states_every_layer_equals_the_blocks_run_by_hand(checkpoint: Path, reference) -> None:
    ids = list(TEXT.encode())
    async with client_for(allow_remote_code_requests=True) as client:
        r = await extract(client, str(checkpoint), trust_remote_code=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_ids"] == ids
        assert body["tokens"][:6] == list("Hidden")
        meta = body["metadata"]
        assert (meta["loader"], meta["num_layers"], meta["hidden_size"], meta["dtype"]) == ("custom", N, 32, "float32")
        assert_every_layer_matches(body, reference, ids)

        # The embedding output (index 0, asked for explicitly) and "last", on the model already loaded.
        r = await client.post("/extract", json={"model": str(checkpoint), "text": TEXT, "hidden_state_layers": [0, -1]})
        assert r.status_code == 200, r.text
        want = by_hand(reference, ids)
        states = r.json()["hidden_states"]
        np.testing.assert_allclose(decode(states["0"])[0], want[0][-1].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(decode(states["-1"])[0], want[N][-1].numpy(), rtol=0, atol=1e-6)

        r = await client.post("/extract", json={"model": str(checkpoint), "text": TEXT, "hidden_state_layers": [N + 1]})
        assert r.status_code == 422 and r.json()["field"] == "hidden_state_layers"


async def test_forward_with_states_without_final_norm_ends_at_the_last_block(tmp_path: Path, reference) -> None:
    """No final_norm and no blocks: layer N is the last block's raw output; the only ModuleList is the block list."""
    manifest = {k: v for k, v in MANIFEST.items() if k not in ("final_norm", "blocks")}
    path = write_model(tmp_path / "plain", reference, manifest)
    ids = list(TEXT.encode())
    async with client_for(trust_remote_code=True) as client:
        r = await client.post("/extract", json={"model": str(path), "text": TEXT, "hidden_state_layers": [-1]})
        assert r.status_code == 200, r.text
    with torch.no_grad():
        x = reference.embed(torch.tensor([ids])) + reference.pos(torch.arange(len(ids)))
        for block in reference.layers:
            x = block(x)
    np.testing.assert_allclose(decode(r.json()["hidden_states"]["-1"])[0], x[0, -1].numpy(), rtol=0, atol=1e-6)


async def test_embed_pools_each_text_alone(checkpoint: Path, reference) -> None:
    texts = ["short", "a longer text than the first"]
    async with client_for(trust_remote_code=True) as client:
        r = await client.post("/embed/batch", json={"model": str(checkpoint), "texts": texts, "normalize": False})
        assert r.status_code == 200, r.text
        default = r.json()
        r = await client.post(
            "/embed/batch", json={"model": str(checkpoint), "texts": texts, "pooling": "mean", "normalize": False}
        )
        mean = r.json()
    assert default["pooling"] == "last_token"  # the manifest's kind "causal"
    for i, text in enumerate(texts):
        last = by_hand(reference, list(text.encode()))[N]
        np.testing.assert_allclose(default["embeddings"][i], last[-1].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(mean["embeddings"][i], last.mean(0).numpy(), rtol=0, atol=1e-5)


# -- trust_remote_code -----------------------------------------------------------------------------------


async def test_load_refuses_checkpoint_code_without_trust_remote_code(checkpoint: Path, reference) -> None:
    async with client_for(allow_remote_code_requests=True) as client:
        r = await extract(client, str(checkpoint))
        assert r.status_code == 403, r.text
        problem = r.json()
        assert problem["title"] == "Forbidden" and problem["field"] == "trust_remote_code"
        assert "trust_remote_code" in problem["detail"] and "toy_arch:build" in problem["detail"]
        assert (await client.get("/models")).json()["loaded_models"] == []  # nothing half-loaded stays behind
        r = await extract(client, str(checkpoint), trust_remote_code=True)  # the request's own trust
        assert r.status_code == 200, r.text
    async with client_for(trust_remote_code=True) as client:  # the server config's trust
        r = await extract(client, str(checkpoint))
        assert r.status_code == 200, r.text
        assert_every_layer_matches(r.json(), reference, list(TEXT.encode()))


async def test_loom_json_naming_an_installed_factory_needs_trust_too(tmp_path: Path, reference, installed) -> None:
    path = write_model(tmp_path / "named", reference, {**MANIFEST, "factory": f"{installed}:build"}, code=False)
    async with client_for(allow_remote_code_requests=True) as client:
        r = await extract(client, str(path))
        assert r.status_code == 403 and r.json()["field"] == "trust_remote_code"
        assert "custom_models" in r.json()["detail"]  # says how the operator can vouch for it instead
        assert installed not in sys.modules  # refused before importing anything
        r = await extract(client, str(path), trust_remote_code=True)
        assert r.status_code == 200, r.text


# -- custom_models in the server config ------------------------------------------------------------------


async def test_config_custom_models_trusts_an_installed_factory(tmp_path: Path, reference, installed) -> None:
    weights = write_model(tmp_path / "weights-only", reference, manifest=None, code=False)
    entry = {**MANIFEST, "factory": f"{installed}:build", "path": str(weights)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": {"max_loaded": 2}, "custom_models": {"toy-config": entry}}))
    settings = attrs.evolve(load_settings(config=str(config), env={}), default_device="cpu")
    assert settings.custom_models == {"toy-config": entry}
    async with AsyncTestClient(app=create_app(settings=settings)) as client:
        probe = (await client.get("/loaders/probe/toy-config")).json()
        assert (probe["source"], probe["path"], probe["selected"]) == ("config", str(weights), "custom")
        assert probe["ranking"][0]["score"] == 1.0 and "custom_models" in probe["ranking"][0]["reason"]
        assert "toy-config" in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        r = await extract(client, "toy-config")  # no trust_remote_code anywhere
        assert r.status_code == 200, r.text
        assert_every_layer_matches(r.json(), reference, list(TEXT.encode()))


async def test_config_custom_models_factory_from_the_model_directory_needs_trust(tmp_path: Path, reference) -> None:
    path = write_model(tmp_path / "with-code", reference, manifest=None, code=True)
    async with client_for(
        allow_remote_code_requests=True, custom_models={"toy-dir": {**MANIFEST, "path": str(path)}}
    ) as client:
        r = await extract(client, "toy-dir")
        assert r.status_code == 403 and r.json()["field"] == "trust_remote_code"
        assert "model directory" in r.json()["detail"]
        r = await extract(client, "toy-dir", trust_remote_code=True)
        assert r.status_code == 200, r.text
        assert_every_layer_matches(r.json(), reference, list(TEXT.encode()))


async def test_config_custom_models_without_a_directory(reference, installed) -> None:
    """An installed factory and no path: the module keeps the factory's own parameters (none are loaded)."""
    entry = {"factory": f"{installed}:build_with_tokenizer", "kwargs": KWARGS, "final_norm": "norm"}
    async with client_for(custom_models={"toy-bare": entry}) as client:
        r = await client.post("/extract", json={"model": "toy-bare", "text": "ab", "hidden_state_layers": "all"})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["token_ids"] == [97, 98] and body["tokens"] == ["a", "b"]  # tokens from the tokenizer's decode
    assert sorted(body["hidden_states"], key=int) == ["-3", "-2", "-1"]


def test_custom_models_resolve_to_their_manifest(tmp_path: Path) -> None:
    entry = {"factory": "pkg:build", "path": str(tmp_path)}
    settings = Settings(aliases={"short": "/data/x"}, custom_models={"toy": entry})
    ref = resolve_model("toy", aliases=settings.aliases, custom_models=settings.custom_models)
    assert (ref.source, ref.path, ref.manifest) == ("config", tmp_path, entry)
    with pytest.raises(ConfigError) as err:
        Settings(aliases={"toy": "/data/x"}, custom_models={"toy": entry})
    assert err.value.field == "custom_models"
    with pytest.raises(ModelNotFound):
        resolve_model("toy", custom_models={"toy": {"factory": "pkg:build", "path": str(tmp_path / "missing")}})
    with pytest.raises(Forbidden):
        resolve_model("toy", custom_models=settings.custom_models, allowed_paths=[str(tmp_path / "elsewhere")])


def test_config_file_custom_models_section_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"custom_models": {"toy": "not a mapping"}}))
    with pytest.raises(ConfigError) as err:
        read_config_file(config)
    assert err.value.field == "custom_models.toy"
    config.write_text("custom_models:\n")
    assert read_config_file(config) == {"custom_models": {}}


# -- manifests that are wrong say which field ------------------------------------------------------------

BAD_MANIFESTS = [
    ({"factory": None}, "factory", "missing"),
    ({"factory": "toy_arch"}, "factory", "module:function"),
    ({"factory": "toy_arch:"}, "factory", "module:function"),
    ({"factory": "toy_arch:nope"}, "factory", "no attribute"),
    ({"factory": "toy_arch:build_nothing"}, "factory", "not a torch.nn.Module"),
    ({"factory": "loom_no_such_module_xyz:build"}, "factory", "cannot import"),
    ({"kwargs": {"bogus": 1}}, "factory", "bogus"),
    ({"blokcs": "layers"}, "blokcs", "unknown field"),
    ({"path": "/data"}, "path", "unknown field"),  # only the server config may name a directory
    ({"blocks": "nope"}, "blocks", "no attribute"),
    ({"blocks": "norm"}, "blocks", "ModuleList"),
    ({"num_layers": 5}, "num_layers", "holds 3"),
    ({"kind": "decoder"}, "kind", "unknown"),
    ({"weights": "../elsewhere.safetensors"}, "weights", "inside the model directory"),
    ({"weights": "missing.safetensors"}, "weights", "no such file"),
    ({"kwargs": {**KWARGS, "hidden": 16}}, "weights", "does not match"),
    ({"tokenizer": "no-such-tokenizer.json"}, "tokenizer", "no such file"),
]


@pytest.mark.parametrize(("change", "field", "says"), BAD_MANIFESTS, ids=[f"{c}" for c, _, _ in BAD_MANIFESTS])
async def test_load_names_the_bad_manifest_field(tmp_path: Path, reference, change, field, says) -> None:
    manifest = {k: v for k, v in {**MANIFEST, **change}.items() if v is not None}
    path = write_model(tmp_path / "bad", reference, manifest)
    async with client_for(trust_remote_code=True) as client:
        r = await extract(client, str(path))
    assert r.status_code == 422, r.text  # the model directory's fault, not the server's
    problem = r.json()
    assert (problem["title"], problem["field"]) == ("Model cannot be loaded", field), problem
    assert says in problem["detail"] and problem["manifest"] == f"{path}/loom.json", problem


async def test_loom_json_that_is_not_json_is_still_ours_and_named(tmp_path: Path, reference) -> None:
    path = write_model(tmp_path / "broken", reference, manifest=None)
    (path / "loom.json").write_text("{not json")
    async with client_for(trust_remote_code=True) as client:
        assert (await client.get(f"/loaders/probe/{path}")).json()["selected"] == "custom"
        r = await extract(client, str(path))
    assert r.status_code == 422 and r.json()["field"] == "manifest"


async def test_custom_loader_on_a_model_without_manifest_is_refused(tiny_models: dict[str, Path]) -> None:
    async with client_for() as client:
        r = await extract(client, str(tiny_models["gpt2"]), loader="custom")
    assert r.status_code == 422 and r.json()["field"] == "loader"


# -- what a custom model does not do ---------------------------------------------------------------------


async def test_generation_attention_and_quantization_are_refused_by_name(checkpoint: Path) -> None:
    async with client_for(trust_remote_code=True) as client:
        r = await client.post("/generate", json={"model": str(checkpoint), "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 422 and r.json()["field"] == "model", r.text
        r = await extract(client, str(checkpoint), return_attention=True)
        assert r.status_code == 422 and r.json()["field"] == "return_attention", r.text


# -- tokenizers ------------------------------------------------------------------------------------------

# Factories whose tokenizer misses the interface the loader documents (__call__(text, add_special_tokens=...) with
# input_ids, and decode(ids)): the model loads, but no text could ever be tokenized.
OFF_INTERFACE = f"""
from {INSTALLED} import ToyNet


class NoSpecialTokens:
    def __call__(self, text):
        return {{"input_ids": list(text.encode("utf-8"))}}

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class BareList:
    def __call__(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def without_add_special_tokens(**kwargs):
    return ToyNet(**kwargs), NoSpecialTokens()


def returning_a_list(**kwargs):
    return ToyNet(**kwargs), BareList()
"""


@pytest.mark.parametrize("factory", ["without_add_special_tokens", "returning_a_list"])
async def test_a_tokenizer_off_the_interface_is_a_422_at_load(tmp_path: Path, installed: str, factory: str) -> None:
    """Refused when the model loads, naming the tokenizer; not a 500 on every request to a model that did load."""
    (tmp_path / "site" / "loom_toy_off_interface.py").write_text(OFF_INTERFACE)
    entry = {"factory": f"loom_toy_off_interface:{factory}", "kwargs": KWARGS, "final_norm": "norm"}
    try:
        async with client_for(custom_models={"toy-off": entry}) as client:
            r = await client.post("/extract", json={"model": "toy-off", "text": TEXT})
            assert r.status_code == 422, r.text
            problem = r.json()
            assert (problem["field"], problem["manifest"]) == ("tokenizer", "custom_models.toy-off"), problem
            assert "add_special_tokens" in problem["detail"] and "input_ids" in problem["detail"], problem
            assert (await client.get("/models")).json()["loaded_models"] == []
    finally:
        sys.modules.pop("loom_toy_off_interface", None)


async def test_tokenizer_json_from_the_model_directory(tmp_path: Path, reference) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", *sorted(set(TEXT.replace(".", " .").split()))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = write_model(tmp_path / "wordlevel", reference, {**MANIFEST, "tokenizer": "vocab/tokenizer.json"})
    (path / "vocab").mkdir()
    tok.save(str(path / "vocab" / "tokenizer.json"))
    ids = tok.encode(TEXT).ids
    async with client_for(trust_remote_code=True) as client:
        r = await extract(client, str(path))
        assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == ids and body["tokens"] == [tok.decode([i]) for i in ids]
    assert_every_layer_matches(body, reference, ids)


async def test_past_its_tables_or_its_vocabulary_is_a_422_naming_the_row(tmp_path: Path, reference) -> None:
    """A manifest without max_context: a text longer than the factory's position table is a 422, not the
    IndexError of its lookup; a token id past the vocabulary names its own row of the input."""
    manifest = {k: v for k, v in MANIFEST.items() if k != "max_context"}
    path = str(write_model(tmp_path / "no_context", reference, manifest))
    async with client_for(trust_remote_code=True) as client:
        r = await client.post("/extract", json={"model": path, "text": "x" * (KWARGS["context"] + 5)})
        assert r.status_code == 422 and r.json()["field"] == "text", r.text
        r = await client.post("/v1/embeddings", json={"model": path, "input": [[1, 2], [5, KWARGS["vocab"] + 44]]})
        assert r.status_code == 400 and r.json()["row"] == 1 and r.json()["error"]["message"].startswith("input[1]")
        assert (await client.post("/extract", json={"model": path, "text": TEXT})).status_code == 200
