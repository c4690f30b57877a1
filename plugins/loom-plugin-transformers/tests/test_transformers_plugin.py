"""The transformers plugin through the real plugin manager (its entry point), against transformers itself."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from loom_kernel import Batch, Capture, GenerationParams, LoadOptions, ModelRef
from loom_kernel.capture import make_capture
from loom_kernel.errors import InvalidField, LoadFailed
from loom_kernel.resolve import resolve_model

PROMPT = "Hidden states are the activations"


@pytest.fixture(scope="module")
def loaded(tiny_models):
    from loom_kernel.plugins import create_plugin_manager

    pm = create_plugin_manager()
    cache = {}

    def get(arch):
        if arch not in cache:
            ref = resolve_model(str(tiny_models[arch]))
            cache[arch] = pm.hook.load(model=ref, loader="transformers", options=LoadOptions())
        return pm, cache[arch]

    return get


def run(pm, model, text=PROMPT, capture=None, **gen):
    batch = Batch(texts=(text,), generation=GenerationParams(**gen) if gen else None)
    return pm.hook.forward_with_states(model=model, batch=batch, capture=capture or Capture()).rows[0]


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="loom")}
    assert eps["transformers"] == "loom_transformers"


def test_probe_scores_from_config_only(pm, tiny_models):
    ref = resolve_model(str(tiny_models["llama"]))
    (hit,) = [r for r in pm.hook.probe(model=ref) if r and r.loader == "transformers"]
    assert hit.score == 0.5 and "LlamaForCausalLM" in hit.reason
    bare = ModelRef(id="x", config={"model_type": "llama"})
    assert [r.score for r in pm.hook.probe(model=bare) if r and r.loader == "transformers"] == [0.1]
    assert [r for r in pm.hook.probe(model=ModelRef(id="y")) if r and r.loader == "transformers"] == []


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_greedy_tokens_equal_generate(loaded, arch):
    pm, model = loaded(arch)
    ids = model.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        want = model.model.generate(**ids, do_sample=False, max_new_tokens=16)[0, ids["input_ids"].shape[1] :]
    row = run(pm, model, max_tokens=16, temperature=0.0)
    assert row.generated_ids == want.tolist()
    assert row.finish_reason in ("length", "stop")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_every_layer_equals_output_hidden_states(loaded, arch):
    pm, model = loaded(arch)
    capture = make_capture([0, *range(1, model.num_layers + 1)], "all", model.num_layers)
    row = run(pm, model, capture=capture)
    with torch.inference_mode():
        ref = model.model(input_ids=torch.tensor([row.token_ids]), output_hidden_states=True).hidden_states
    assert len(ref) == model.num_layers + 1
    for sel in capture.layers:
        torch.testing.assert_close(row.states[sel.key], ref[sel.index][0], rtol=1e-5, atol=1e-5)


def test_states_after_generation_equal_one_forward_pass(loaded):
    pm, model = loaded("mistral")
    for positions in ("all", "last"):
        capture = make_capture([0, 2, -1], positions, model.num_layers)
        row = run(pm, model, capture=capture, max_tokens=9, temperature=0.0)
        with torch.inference_mode():
            ref = model.model(input_ids=torch.tensor([row.token_ids]), output_hidden_states=True).hidden_states
        total = len(row.token_ids)
        assert row.positions == (list(range(total)) if positions == "all" else [total - 1])
        for sel in capture.layers:
            torch.testing.assert_close(row.states[sel.key], ref[sel.index][0, row.positions], rtol=1e-4, atol=1e-4)


def test_max_tokens_zero_returns_the_prompt_states(loaded):
    pm, model = loaded("llama")
    row = run(pm, model, capture=make_capture([-1], "last", model.num_layers), max_tokens=0)
    assert row.generated_ids == [] and row.finish_reason == "length"
    assert row.states["-1"].shape == (1, model.hidden_size)


def test_seeded_sampling_is_reproducible(loaded):
    pm, model = loaded("qwen2")
    a = run(pm, model, max_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=1)
    b = run(pm, model, max_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=1)
    c = run(pm, model, max_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=2)
    assert a.generated_ids == b.generated_ids
    assert a.generated_ids != c.generated_ids


def test_stop_strings_cut_the_text(loaded):
    pm, model = loaded("gpt2")
    full = run(pm, model, max_tokens=20, temperature=0.0)
    assert len(full.text) > 3
    stop = full.text[2:4]
    row = run(pm, model, max_tokens=20, temperature=0.0, stop=(stop,))
    assert row.finish_reason == "stop"
    assert row.text == full.text[: full.text.find(stop)]
    assert full.generated_ids[: len(row.generated_ids)] == row.generated_ids


def test_on_token_sees_each_token_and_can_stop(loaded):
    pm, model = loaded("llama")
    seen = []

    def on_token(row, token, piece):
        seen.append((row, token, piece))
        return len(seen) < 3

    batch = Batch(texts=(PROMPT,), generation=GenerationParams(max_tokens=10, temperature=0.0), on_token=on_token)
    row = pm.hook.forward_with_states(model=model, batch=batch, capture=Capture()).rows[0]
    assert [t for _, t, _ in seen] == row.generated_ids and len(seen) == 3
    assert row.finish_reason == "stop" and "".join(p for _, _, p in seen) == row.text


def test_load_errors_name_the_field(pm, tiny_models, tmp_path):
    ref = resolve_model(str(tiny_models["llama"]))
    with pytest.raises(InvalidField) as err:
        pm.hook.load(model=ref, loader="transformers", options=LoadOptions(dtype="float8"))
    assert err.value.field == "dtype" and "bfloat16" in err.value.allowed
    if not torch.cuda.is_available():
        with pytest.raises(InvalidField) as err:
            pm.hook.load(model=ref, loader="transformers", options=LoadOptions(device="cuda:0"))
        assert err.value.field == "device"
    (tmp_path / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    with pytest.raises(LoadFailed):  # a config without weights
        pm.hook.load(model=resolve_model(str(tmp_path)), loader="transformers", options=LoadOptions())


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_when_asked(pm, tiny_models):
    ref = resolve_model(str(tiny_models["qwen2"]))
    auto = pm.hook.load(model=ref, loader="transformers", options=LoadOptions(device="cpu"))
    half = pm.hook.load(model=ref, loader="transformers", options=LoadOptions(device="cpu", dtype="bfloat16"))
    assert (auto.dtype, half.dtype) == ("float32", "bfloat16")
    assert half.model.dtype == torch.bfloat16 and half.size_bytes * 2 == pytest.approx(auto.size_bytes, rel=0.01)
