"""The gptq plugin's hooks through the real plugin manager, without quantizing anything (fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loom_kernel import Batch, Capture, LoadedModel, LoadOptions, ModelRef, QuantizationPlan
from loom_kernel.errors import MissingBackend, Unsupported
from loom_kernel.installed import describe_plugins
from loom_kernel.plugins import create_plugin_manager
from loom_kernel.resolve import resolve_model

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def ref(config: Any) -> ModelRef:
    return ModelRef(id="some/model", config=config)


@pytest.fixture(scope="module")
def hooks() -> Any:
    pm = create_plugin_manager()  # the installed entry points, this plugin among them
    pm.check_pending()
    return pm.hook


def test_entry_point_and_hooks() -> None:
    rows = {r["name"]: r for r in describe_plugins(create_plugin_manager())}
    assert rows["gptq"]["package"] == "loom-plugin-gptq"
    # No quantize hook: GPTQ/AWQ quantization needs calibration data a load request does not carry.
    assert rows["gptq"]["hooks"] == ["load", "probe"]  # it runs on the transformers runner it loads through


@pytest.mark.parametrize("method", ["gptq", "awq", "GPTQ"])
def test_probe(hooks: Any, method: str) -> None:
    qc = {"quant_method": method, "bits": 4, "group_size": 128, "desc_act": False, "meta": {"x": 1}}
    results = [r for r in hooks.probe(model=ref({**LLAMA, "quantization_config": qc})) if r is not None]
    ranked = sorted(results, key=lambda r: (-r.score, r.loader))
    assert ranked[0].loader == "gptq" and ranked[0].score == 1.0
    assert f"quant_method is {method.lower()!r}" in ranked[0].reason
    assert "bits 4" in ranked[0].reason and "group_size 128" in ranked[0].reason
    assert {r.loader for r in ranked[1:]} >= {"transformers"}  # the generic loader still has its 0.5


@pytest.mark.parametrize(
    "config",
    [
        None,
        {},
        "not a dict",
        LLAMA,
        {**LLAMA, "quantization_config": None},
        {**LLAMA, "quantization_config": "gptq"},
        {**LLAMA, "quantization_config": {"quant_method": None}},
        {**LLAMA, "quantization_config": {"quant_method": 4}},
        {**LLAMA, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
        {**LLAMA, "quantization_config": {"quant_method": "fp8"}},
    ],
)
def test_probe_has_no_opinion_on_other_models(hooks: Any, config: Any) -> None:
    assert not [r for r in hooks.probe(model=ref(config)) if r is not None and r.loader == "gptq"]


def test_probe_names_a_missing_backend(hooks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import loom_gptq.loading

    monkeypatch.setattr(loom_gptq.loading, "installed", lambda name: name != "optimum")
    gptq = ref({**LLAMA, "quantization_config": {"quant_method": "gptq"}})
    (result,) = [r for r in hooks.probe(model=gptq) if r is not None and r.loader == "gptq"]
    assert result.score == 1.0 and "pip install optimum" in result.reason
    awq = ref({**LLAMA, "quantization_config": {"quant_method": "awq"}})
    (result,) = [r for r in hooks.probe(model=awq) if r is not None and r.loader == "gptq"]
    assert "not installed" not in result.reason  # AWQ needs gptqmodel only


def test_load(hooks: Any, tiny_models: dict[str, Path]) -> None:
    plain = resolve_model(str(tiny_models["llama"]))
    assert hooks.load(model=plain, loader="transformers", options=LoadOptions(), kernel=None).loader == "transformers"
    with pytest.raises(Unsupported) as err:  # not quantized: says which loader to use instead
        hooks.load(model=plain, loader="gptq", options=LoadOptions(), kernel=None)
    assert err.value.field == "loader" and "transformers loader" in err.value.detail


def test_load_refuses_a_second_quantization(hooks: Any) -> None:
    gptq = ref({**LLAMA, "quantization_config": {"quant_method": "gptq"}})
    plan = QuantizationPlan(method="4bit", load_kwargs={"quantization_config": object()}, provider="bitsandbytes")
    with pytest.raises(Unsupported) as err:
        hooks.load(
            model=gptq, loader="gptq", options=LoadOptions(quantization="4bit", quantization_plan=plan), kernel=None
        )
    assert err.value.field == "quantization" and "already quantized (gptq)" in err.value.detail


@pytest.mark.parametrize(
    ("method", "absent", "pip"), [("gptq", "optimum", "optimum"), ("awq", "gptqmodel", "gptqmodel")]
)
def test_load_without_backend_is_424(
    hooks: Any, monkeypatch: pytest.MonkeyPatch, method: str, absent: str, pip: str
) -> None:
    import loom_gptq.loading

    monkeypatch.setattr(loom_gptq.loading, "installed", lambda name: name != absent)
    model = ref({**LLAMA, "quantization_config": {"quant_method": method}})
    with pytest.raises(MissingBackend) as err:
        hooks.load(model=model, loader="gptq", options=LoadOptions(), kernel=None)
    assert err.value.status == 424 and f"pip install {pip}" in err.value.detail


def test_forward_with_states_only_for_its_own_models(hooks: Any) -> None:
    other = LoadedModel(
        ref=ref(LLAMA), loader="toy", model=None, tokenizer=None, options=LoadOptions(), num_layers=1, hidden_size=1
    )
    results = hooks.forward_with_states(model=other, batch=Batch(texts=("hi",)), capture=Capture())
    assert results is None  # firstresult: nobody, this plugin included, claimed the toy loader's model
