"""4-bit and 8-bit loads through the real API on CPU: the states stay close to the float32 model's."""

from __future__ import annotations

import base64
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from litestar.testing import AsyncTestClient
from loom_bitsandbytes import bnb_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from loom_kernel import LoadOptions
from loom_kernel.api import create_app
from loom_kernel.config import Settings
from loom_kernel.plugins import create_plugin_manager

TEXT = "The quick brown fox jumps over the lazy dog"
# Worst position's cosine to float32 allowed per method (measured on the tiny models: 8bit >= 0.9998, 4bit >= 0.98).
MIN_COSINE = {"8bit": 0.99, "4bit": 0.95}


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient]:
    app = create_app(settings=Settings(default_device="cpu", max_models=4))
    async with AsyncTestClient(app=app) as c:
        yield c


def decode(entry: dict) -> np.ndarray:
    arr = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4")
    return arr.reshape(entry["shape"])


def fp32_last_layer(path: Path, ids: list[int]) -> np.ndarray:
    """transformers' own last hidden states [T, H] of the unquantized float32 model."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return states[-1][0].numpy()


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity of each position's state [T, H] with the reference's."""
    return (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))


@pytest.mark.parametrize("method", ["8bit", "4bit"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
async def test_quantized_states_close_to_float32(client, tiny_models, arch: str, method: str) -> None:
    path = tiny_models[arch]
    r = await client.post(
        "/extract",
        json={
            "model": str(path),
            "text": TEXT,
            "quantization": method,
            "hidden_state_layers": [-1],
            "return_full_sequence": True,
            "hidden_state_format": "base64",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    got = decode(body["sequence_hidden_states"]["-1"])
    assert got.shape[0] == len(body["token_ids"]) == len(AutoTokenizer.from_pretrained(str(path))(TEXT)["input_ids"])
    want = fp32_last_layer(path, body["token_ids"])
    cos = cosines(got, want)
    assert cos.min() > MIN_COSINE[method], cos
    assert np.abs(got - want).max() > 1e-6  # not the float32 model under another name: the weights were quantized


async def test_load_4bit_is_listed_as_4bit(client, tiny_models) -> None:
    path = str(tiny_models["llama"])
    r = await client.post("/models/load", json={"model": path})
    assert r.status_code == 200, r.text
    fp32_bytes = r.json()["model"]["size_bytes"]
    r = await client.post("/models/load", json={"model": path, "quantization": "4bit"})  # differs: reloads
    assert r.status_code == 200, r.text
    assert r.json()["model"]["quantization"] == "4bit"
    (row,) = (await client.get("/models")).json()["loaded_models"]
    assert row["model_id"] == path and row["state"] == "ready"
    assert row["quantization"] == "4bit"
    assert row["dtype"] == "float32"  # the compute dtype: embeddings, norms and the LM head stay float32
    assert 0 < row["size_bytes"] < fp32_bytes  # the packed 4-bit weights take less memory


async def test_lazy_generate_8bit_serves_states(client, tiny_models) -> None:
    path = tiny_models["qwen2"]
    r = await client.post(
        "/generate",
        json={
            "model": str(path),
            "prompt": TEXT,
            "quantization": "8bit",
            "max_tokens": 4,
            "return_hidden_states": True,
            "hidden_state_layers": [-1],
            "return_full_sequence": True,
            "hidden_state_format": "base64",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_count"] == len(body["token_ids"]) == 4
    final = AutoTokenizer.from_pretrained(str(path))(TEXT)["input_ids"] + body["token_ids"]
    got = decode(body["sequence_hidden_states"]["-1"])
    assert got.shape[0] == len(final)
    assert cosines(got, fp32_last_layer(path, final)).min() > MIN_COSINE["8bit"]
    (row,) = (await client.get("/models")).json()["loaded_models"]
    assert row["quantization"] == "8bit"


async def test_a_checkpoint_saved_quantized_refuses_another_quantization(client, tiny_models, tmp_path) -> None:
    """A checkpoint whose config.json has a quantization_config loads as that says: under an 8bit request
    transformers keeps a saved 4-bit checkpoint 4-bit, so serving it as "8bit" would report what it is not."""
    saved = tmp_path / "llama-4bit"
    options = LoadOptions(device="cpu", dtype="float32")
    quantized = AutoModelForCausalLM.from_pretrained(
        str(tiny_models["llama"]), quantization_config=bnb_config("4bit", options), device_map="cpu"
    )
    quantized.save_pretrained(saved)
    AutoTokenizer.from_pretrained(str(tiny_models["llama"])).save_pretrained(saved)
    again = AutoModelForCausalLM.from_pretrained(
        str(saved), quantization_config=bnb_config("8bit", options), device_map="cpu"
    )
    assert type(again.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # transformers' own answer
    r = await client.post("/models/load", json={"model": str(saved), "quantization": "8bit"})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["field"] == "quantization" and "already quantized" in problem["detail"], problem
    assert (await client.get("/models")).json()["loaded_models"] == []
    r = await client.post("/extract", json={"model": str(saved), "text": TEXT})  # as saved, it serves
    assert r.status_code == 200, r.text


async def test_without_the_plugin_4bit_is_424(tiny_models) -> None:
    pm = create_plugin_manager()
    pm.unregister(name="bitsandbytes")
    pm.check_pending()
    app = create_app(pm=pm, settings=Settings(default_device="cpu"))
    async with AsyncTestClient(app=app) as c:
        r = await c.post("/models/load", json={"model": str(tiny_models["llama"]), "quantization": "4bit"})
        assert r.status_code == 424, r.text
        problem = r.json()
        assert problem["field"] == "quantization"
        assert "pip install loom-plugin-bitsandbytes" in problem["detail"]
        assert (await c.get("/models")).json()["loaded_models"] == []


async def test_without_the_library_4bit_is_424(client, tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    r = await client.post("/models/load", json={"model": str(tiny_models["gpt2"]), "quantization": "4bit"})
    assert r.status_code == 424, r.text
    assert r.json()["field"] == "quantization" and "pip install bitsandbytes" in r.json()["detail"]


@pytest.mark.slow
async def test_minilm_embeddings_through_sentence_transformers(client) -> None:
    """A trained model through the sentence-transformers loader: its quantization_config goes to model_kwargs."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Interpretability research needs the internals of models."]

    async def embed(**load: str) -> np.ndarray:
        r = await client.post("/embed/batch", json={"model": "minilm", "texts": texts, **load})
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["embeddings"])

    want = await embed()
    # Measured: 8bit >= 0.997, 4bit >= 0.955.
    for method, floor in (("8bit", 0.99), ("4bit", 0.93)):
        got = await embed(quantization=method)
        assert cosines(got, want).min() > floor, (method, cosines(got, want))
        (row,) = (await client.get("/models")).json()["loaded_models"]
        assert (row["loader"], row["quantization"]) == ("sentence_transformers", method)


async def test_a_multimodal_checkpoint_saved_quantized_serves_its_language_model_quantized(client, tmp_path) -> None:
    """A Gemma 3 4B-style checkpoint saved 4-bit says so in the wrapper's config.json, not in its text_config: the
    language model The Loom loads alone is quantized as the wrapper is, its states those of transformers' own load
    of the quantized wrapper (the vision tower's weights left unread)."""
    from loom_transformers.testing import build_tiny_wrapper
    from transformers import AutoModelForImageTextToText

    source = build_tiny_wrapper("gemma3", tmp_path)
    saved = tmp_path / "gemma3-4bit"
    options = LoadOptions(device="cpu", dtype="float32")
    AutoModelForImageTextToText.from_pretrained(
        str(source), quantization_config=bnb_config("4bit", options), device_map="cpu"
    ).save_pretrained(saved)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(saved)
    wrapper = AutoModelForImageTextToText.from_pretrained(str(saved), device_map="cpu").eval()
    assert type(wrapper.model.language_model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    enc = AutoTokenizer.from_pretrained(str(saved))(TEXT, return_tensors="pt")
    with torch.inference_mode():
        want = wrapper(**enc, output_hidden_states=True).hidden_states[-1][0].numpy()
    r = await client.post(
        "/extract", json={"model": str(saved), "text": TEXT, "positions": "all", "hidden_state_layers": [-1]}
    )
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["sequence_hidden_states"]["-1"]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
