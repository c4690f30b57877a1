"""Memory-aware loading: estimates from the files on disk, eviction under memory_fraction, refusals with 507."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from loom_transformers.testing import build_tiny_model, tiny_config, train_tokenizer

from loom_kernel.api import create_app
from loom_kernel.config import Settings
from loom_kernel.memory import device_total_bytes, estimate_bytes
from loom_kernel.resolve import resolve_model
from loom_kernel.types import LoadOptions, ModelRef


def param_bytes(path: Path) -> int:
    """What transformers itself allocates for the model's parameters and buffers (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_estimate_is_close_to_what_transformers_allocates(tiny_models, arch):
    ref = resolve_model(str(tiny_models[arch]))
    actual = param_bytes(tiny_models[arch])
    fp32 = estimate_bytes(ref, LoadOptions(dtype="float32"), "cpu")
    assert fp32 is not None and 0.7 < fp32 / actual < 1.3
    half = estimate_bytes(ref, LoadOptions(dtype="bfloat16"), "cpu")
    assert half is not None and abs(half / fp32 - 0.5) < 0.01
    assert estimate_bytes(ref, LoadOptions(dtype="auto"), "cuda:0") == half  # auto is 16-bit on a GPU
    q4 = estimate_bytes(ref, LoadOptions(quantization="4bit"), "cpu")
    assert q4 is not None and q4 < half


# Every mixture-of-experts family the survey builds, and some released models' sizes, whose parameter counts on the
# meta device are their published ones (Mixtral 8x7B's 46.7B, Qwen3-30B-A3B's 30.5B, DeepSeek-V3's 671B, gpt-oss-20b's
# 20.9B; Llama 4 Scout's language model's 107.8B).
MOE_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "ernie4_5_moe",
    "gpt_oss",
    "llama4_text",
)
RELEASED_MOE: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x7b": (
        "MixtralConfig",
        {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
        | {"num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8},
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48}
        | {"num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128}
        | {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    ),
    "deepseek-v3": (
        "DeepseekV3Config",
        {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61}
        | {"num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512}
        | {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
        | {"n_routed_experts": 256, "n_shared_experts": 1, "moe_intermediate_size": 2048, "first_k_dense_replace": 3}
        | {"num_experts_per_tok": 8, "n_group": 8, "topk_group": 4},
    ),
    "gpt-oss-20b": (
        "GptOssConfig",
        {"vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24}
        | {"num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32},
    ),
    "llama-4-scout": (
        "Llama4TextConfig",
        {"vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384}
        | {"num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128}
        | {"num_local_experts": 16, "interleave_moe_layer_step": 1},
    ),
}


def meta_param_bytes(config: Any) -> int:
    """The float32 bytes of the parameters of the model transformers builds from ``config``, built on the meta device
    (shapes only, nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


def estimate_from_config(config: Any) -> int | None:
    """The estimate before download: from config.json alone, as save_pretrained writes it (what differs from the
    defaults)."""
    written = json.loads(config.to_json_string(use_diff=True))
    return estimate_bytes(ModelRef(id="hub/model", config=written), LoadOptions(dtype="float32"), "cpu")


# The estimate counts attention as 4 H^2 a block and leaves out norms and biases. At the tiny sizes attention is a
# large share, which 2 key-value heads of 4 make the count up to 10% over (DeepSeek's latent attention); at the
# released sizes the experts are nearly all of it: within 2%, and never under. Before the experts were counted, the tiny
# ones were 0.39 to 0.82 of the count, the released ones 0.06 to 0.17; before Llama 4's shared expert was, Scout's was
# 0.96 and the tiny one's 0.93.
@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_the_estimate_before_download_counts_every_expert(arch):
    config = tiny_config(arch, train_tokenizer("llama"))
    assert 1.0 < estimate_from_config(config) / meta_param_bytes(config) < 1.15


@pytest.mark.parametrize("name", RELEASED_MOE)
def test_the_estimate_before_download_is_close_for_released_moe_sizes(name):
    import transformers

    class_name, sizes = RELEASED_MOE[name]
    config = getattr(transformers, class_name)(tie_word_embeddings=False, **sizes)
    assert 0.99 < estimate_from_config(config) / meta_param_bytes(config) < 1.03


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, Path]:
    """Two models of the same size, one four times larger, and one whose weights are corrupt."""
    root = tmp_path_factory.mktemp("memory")
    a = build_tiny_model("llama", root, name="a")
    b = build_tiny_model("llama", root, name="b")
    big = build_tiny_model("llama", root, name="big", hidden_size=128, intermediate_size=512, num_hidden_layers=6)
    broken = root / "broken"
    shutil.copytree(a, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)
    return {"a": a, "b": b, "big": big, "broken": broken}


def fraction_for(models: int, path: Path) -> float:
    """A memory_fraction whose budget holds ``models`` copies of the model at ``path`` and a half."""
    need = estimate_bytes(resolve_model(str(path)), LoadOptions(dtype="float32"), "cpu")
    total = device_total_bytes("cpu")
    assert need and total
    return (models + 0.5) * need / total


@pytest.fixture
async def client(twins):
    settings = Settings(default_device="cpu", default_dtype="float32", memory_fraction=fraction_for(1, twins["a"]))
    async with AsyncTestClient(app=create_app(settings=settings)) as c:
        yield c


async def loaded(client) -> list[str]:
    return [m["model_id"] for m in (await client.get("/models")).json()["loaded_models"] if m["state"] == "ready"]


async def test_the_older_model_is_evicted_to_make_room(client, twins):
    a, b = str(twins["a"]), str(twins["b"])
    assert (await client.post("/models/load", json={"model": a})).status_code in (200, 201)
    assert await loaded(client) == [a]
    r = await client.post("/extract", json={"model": b, "text": "Hello"})
    assert r.status_code == 200
    assert await loaded(client) == [b]  # max_models (3) alone would have kept both
    health = (await client.get("/health")).json()
    cpu = health["memory"]["devices"]["cpu"]
    assert cpu["used_by_models_bytes"] <= cpu["budget_bytes"] and cpu["used_by_models_bytes"] > 0


async def test_a_model_that_can_never_fit_is_refused_with_507_and_evicts_nothing(client, twins):
    a = str(twins["a"])
    await client.post("/models/load", json={"model": a})
    r = await client.post("/models/load", json={"model": str(twins["big"])})
    assert r.status_code == 507
    problem = r.json()
    assert problem["field"] == "model" and "memory_fraction" in problem["detail"]
    assert problem["needed_bytes"] > problem["budget_bytes"]
    assert await loaded(client) == [a]


async def test_a_load_that_fails_evicts_nothing(client, twins):
    a = str(twins["a"])
    await client.post("/models/load", json={"model": a})
    r = await client.post("/models/load", json={"model": str(twins["broken"])})
    # Corrupt weights are the model directory's fault, not the server's: a 422 that says so.
    assert r.status_code == 422 and r.json()["field"] == "model" and "cannot be read" in r.json()["detail"]
    assert await loaded(client) == [a]
    assert (await client.post("/extract", json={"model": a, "text": "still here"})).status_code == 200


async def test_health_notes_auto_device_falling_back_to_cpu():
    import torch

    async with AsyncTestClient(app=create_app(settings=Settings(default_device="auto"))) as c:
        health = (await c.get("/health")).json()
    if torch.cuda.is_available():
        assert health["default_device"].startswith("cuda") and health["notes"] == []
    else:
        assert health["default_device"] == "cpu" and any("auto" in n and "cpu" in n for n in health["notes"])


@pytest.mark.parametrize(
    ("body", "field"), [({"device_map": "everywhere"}, "device_map"), ({"device": "tpu"}, "device")]
)
async def test_bad_placement_is_a_422_naming_the_field(client, twins, body, field):
    r = await client.post("/models/load", json={"model": str(twins["a"]), **body})
    assert r.status_code == 422 and r.json()["field"] == field and r.json()["allowed"]


async def test_device_map_auto_places_the_model(client, twins):
    """accelerate's "auto" placement on a machine without CUDA puts every weight in CPU RAM, and serves states."""
    a = str(twins["a"])
    r = await client.post("/models/load", json={"model": a, "device_map": "auto"})
    assert r.status_code in (200, 201), r.text
    (entry,) = [m for m in (await client.get("/models")).json()["loaded_models"] if m["model_id"] == a]
    assert entry["device_map"] == "auto"
    r = await client.post("/extract", json={"model": a, "text": "Hello", "device_map": "auto"})
    assert r.status_code == 200 and r.json()["hidden_states"]["-1"]["shape"] == [1, 64]
