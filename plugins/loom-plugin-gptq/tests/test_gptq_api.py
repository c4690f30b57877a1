"""Real GPTQ and AWQ checkpoints, quantized here on CPU, served through The Loom's API.

The module quantizes one tiny Llama twice (once per module, about 15 s together): to GPTQ with transformers'
``GPTQConfig`` (optimum + gptqmodel), and to AWQ (GEMM format, with zero points) with gptqmodel's own AWQ
quantizer. Both directories are ordinary ``save_pretrained`` checkpoints whose config.json carries the
quantization_config, as downloaded ones do.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from litestar.testing import AsyncTestClient
from loom_transformers.testing import CORPUS, build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

from loom_kernel.api import create_app
from loom_kernel.config import Settings

pytest.importorskip("gptqmodel", reason="loom-plugin-gptq's backend: pip install gptqmodel==7.6.0 optimum")
pytest.importorskip("optimum", reason="loom-plugin-gptq's backend: pip install optimum")

TEXT = "The quick brown fox jumps over the lazy dog. Hidden states"
METHODS = ["gptq", "awq"]
GROUP_SIZE = 32
# Dimensions the 4-bit kernels accept: in-features multiples of the group size, and out-features multiples of 64
# (gptqmodel's AWQ clip search takes output channels 64 at a time). head_dim is explicit because the tiny config
# derives it from its default hidden size (64 / 4 heads = 16) before the overrides are applied.
OVERRIDES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
# Worst position's cosine to the float32 model, any layer; measured >= 0.99 (README), required > 0.9.
MIN_COSINE = 0.9


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Calibration runs thousands of tiny matmuls: on a small, shared CPU, thread hand-offs cost more than they
    save (GPTQ on the tiny model: about 5 s on one thread, 20 s on two busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_gptq(src: Path, out: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(str(src))
    config = GPTQConfig(bits=4, group_size=GROUP_SIZE, dataset=list(CORPUS), tokenizer=tok)
    with one_torch_thread():
        model = AutoModelForCausalLM.from_pretrained(
            str(src), quantization_config=config, dtype=torch.float32, device_map="cpu"
        )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def quantize_awq(src: Path, out: Path) -> Path:
    # gptqmodel 7.6.0 sizes its CPU thread pool as (cores + 1) // 2 but asks 2 workers of it for loading: on a
    # 2-core machine that is 1 < 2 and quantize() fails ("Virtual pool 'model_loader:cpu' requests 2 workers but
    # parent 'cpu' only has 1"). The variable is read when the pool is first built, i.e. in quantize().
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.utils.backend import BACKEND

    # sym=False: asymmetric groups, saved as "zero_point": true (the AutoAWQ GEMM layout). No disk offload: the
    # tiny model fits in memory and offloading leaves a temporary directory behind.
    qc = QuantizeConfig(bits=4, group_size=GROUP_SIZE, method="awq", format="gemm", sym=False, offload_to_disk=False)
    # The quantizer writes a logs/ directory into the working directory: keep it out of the checkout.
    with contextlib.chdir(out.parent), one_torch_thread():
        model = GPTQModel.load(str(src), qc, device="cpu")
        # The AUTO backend looks for the CUDA GEMM kernel and refuses without CUDA; AWQ_TORCH packs the same
        # GEMM layout with plain torch.
        model.quantize(list(CORPUS), batch_size=1, backend=BACKEND.AWQ_TORCH)
    model.save(str(out))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gptq")
    src = build_tiny_model("llama", root, name="tiny-llama-128", **OVERRIDES)
    return {
        "fp32": src,
        "gptq": quantize_gptq(src, root / "tiny-llama-128-gptq"),
        "awq": quantize_awq(src, root / "tiny-llama-128-awq"),
    }


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, Any]:
    """transformers' own models, loaded directly: the float32 original and each quantized checkpoint."""
    return {
        name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map="cpu").eval()
        for name, path in checkpoints.items()
    }


@pytest.fixture
async def client() -> AsyncIterator[AsyncTestClient]:
    app = create_app(settings=Settings(default_device="cpu", max_models=4))
    async with AsyncTestClient(app=app) as c:
        yield c


def decode(entry: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4").reshape(entry["shape"])


def states(model: Any, ids: list[int]) -> tuple[np.ndarray, ...]:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return tuple(t[0].float().numpy() for t in out)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_is_what_it_claims(checkpoints: dict[str, Path], references: dict[str, Any], method: str) -> None:
    qc = references[method].config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    assert qc["quant_method"] == method and qc["bits"] == 4 and qc["group_size"] == GROUP_SIZE
    if method == "awq":
        assert qc["version"] == "gemm" and qc["zero_point"] is True
    layer = references[method].model.layers[0].self_attn.q_proj
    assert layer.qweight.dtype == torch.int32 and not isinstance(layer, torch.nn.Linear)


@pytest.mark.parametrize("method", METHODS)
async def test_probe_ranks_gptq_first(client: AsyncTestClient, checkpoints: dict[str, Path], method: str) -> None:
    r = await client.get(f"/loaders/probe/{checkpoints[method]}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["selected"] == "gptq"
    first, second = body["ranking"][:2]
    assert first["loader"] == "gptq" and first["score"] == 1.0 and f"quant_method is {method!r}" in first["reason"]
    assert second["loader"] == "transformers" and second["score"] == 0.5
    plain = (await client.get(f"/loaders/probe/{checkpoints['fp32']}")).json()
    assert "gptq" not in [row["loader"] for row in plain["ranking"]]


@pytest.mark.parametrize("method", METHODS)
async def test_generate_serves_tokens_and_states(
    client: AsyncTestClient, checkpoints: dict[str, Path], references: dict[str, Any], method: str
) -> None:
    path = str(checkpoints[method])
    layers = [0, 1, 2, -1]
    r = await client.post(
        "/generate",
        json={
            "model": path,
            "prompt": TEXT,
            "max_tokens": 6,
            "temperature": 0,
            "return_hidden_states": True,
            "hidden_state_layers": layers,
            "return_full_sequence": True,
            "hidden_state_format": "base64",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["metadata"]["loader"] == "gptq"
    assert body["token_count"] == len(body["token_ids"]) > 0
    final = AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"] + body["token_ids"]
    own = states(references[method], final)  # the same quantized model, run by transformers
    fp32 = states(references["fp32"], final)
    for layer in layers:
        got = decode(body["sequence_hidden_states"][str(layer)])
        assert got.shape == (len(final), 128)
        # The Loom's hooks capture exactly what the quantized model computes (a KV-cached decode vs one pass) ...
        assert rel_err(got, own[layer]) < 1e-4, layer
        # ... and that stays close to the float32 model without being it.
        assert cosines(got, fp32[layer]).min() > MIN_COSINE, (layer, cosines(got, fp32[layer]))
        if layer != 0:  # index 0 is the embedding output: embeddings are not quantized
            assert np.abs(got - fp32[layer]).max() > 1e-4
    # Greedy tokens are the quantized model's own greedy tokens.
    with torch.inference_mode():
        ids = torch.tensor([final[: len(final) - len(body["token_ids"])]])
        want = references[method].generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
    assert body["token_ids"] == want[: len(body["token_ids"])]


@pytest.mark.parametrize("method", METHODS)
async def test_extract_every_layer(
    client: AsyncTestClient, checkpoints: dict[str, Path], references: dict[str, Any], method: str
) -> None:
    r = await client.post(
        "/extract",
        json={
            "model": str(checkpoints[method]),
            "text": TEXT,
            "hidden_state_layers": "all",
            "return_full_sequence": True,
            "hidden_state_format": "base64",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    own = states(references[method], body["token_ids"])
    assert sorted(body["sequence_hidden_states"], key=int) == ["-3", "-2", "-1"]
    for key, entry in body["sequence_hidden_states"].items():
        assert rel_err(decode(entry), own[int(key)]) < 1e-5, key


async def test_models_lists_the_quantized_load(client: AsyncTestClient, checkpoints: dict[str, Path]) -> None:
    r = await client.post("/models/load", json={"model": str(checkpoints["fp32"])})
    assert r.status_code == 200, r.text
    fp32_bytes = r.json()["model"]["size_bytes"]
    for method in METHODS:
        r = await client.post("/models/load", json={"model": str(checkpoints[method])})
        assert r.status_code == 200, r.text
        row = r.json()["model"]
        assert row["loader"] == "gptq" and row["state"] == "ready" and row["device"] == "cpu"
        assert 0 < row["size_bytes"] < fp32_bytes  # packed 4-bit weights, not the float32 model renamed


async def test_forcing_gptq_on_a_plain_model_is_422(client: AsyncTestClient, checkpoints: dict[str, Path]) -> None:
    r = await client.post("/extract", json={"model": str(checkpoints["fp32"]), "text": "hi", "loader": "gptq"})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "loader" and "transformers loader" in r.json()["detail"]


@pytest.mark.parametrize("method", METHODS)
async def test_quantizing_it_again_is_422_whichever_loader(
    client: AsyncTestClient, checkpoints: dict[str, Path], method: str
) -> None:
    """Its own quantization_config decides: bitsandbytes on top is refused by name through the gptq loader and
    through the transformers loader named explicitly (where transformers' own ValueError was a 500)."""
    path = str(checkpoints[method])
    for loader in ("gptq", "transformers"):
        r = await client.post("/extract", json={"model": path, "text": "hi", "loader": loader, "quantization": "4bit"})
        assert r.status_code == 422, (loader, r.text)
        assert r.json()["field"] == "quantization" and "already quantized" in r.json()["detail"], (loader, r.text)
    assert (await client.get("/models")).json()["loaded_models"] == []


async def test_missing_backend_is_424(
    client: AsyncTestClient, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import loom_gptq.loading

    monkeypatch.setattr(loom_gptq.loading, "installed", lambda name: name != "gptqmodel")
    r = await client.post("/models/load", json={"model": str(checkpoints["awq"])})
    assert r.status_code == 424, r.text
    assert "pip install gptqmodel==7.6.0" in r.json()["detail"]
