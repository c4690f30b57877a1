"""The quantize hook: bitsandbytes plans for "4bit" and "8bit", None for other methods, 424 without the library."""

from __future__ import annotations

import sys

import loom_bitsandbytes
import pytest
import torch
from transformers import BitsAndBytesConfig

from loom_kernel import LoadOptions, QuantizationPlan
from loom_kernel.config import Settings
from loom_kernel.errors import MissingBackend
from loom_kernel.models import ModelManager


def test_quantize(pm) -> None:
    assert pm.get_plugin("bitsandbytes") is loom_bitsandbytes  # found through the entry point
    plan = pm.hook.quantize(method="4bit", options=LoadOptions())
    assert isinstance(plan, QuantizationPlan)
    assert (plan.method, plan.provider, list(plan.load_kwargs)) == ("4bit", "bitsandbytes", ["quantization_config"])
    cfg = plan.load_kwargs["quantization_config"]
    assert isinstance(cfg, BitsAndBytesConfig)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float32  # dtype "auto" on CPU loads float32

    plan = pm.hook.quantize(method="8bit", options=LoadOptions())
    cfg = plan.load_kwargs["quantization_config"]
    assert (plan.method, plan.provider) == ("8bit", "bitsandbytes")
    assert cfg.load_in_8bit and not cfg.load_in_4bit

    assert pm.hook.quantize(method="gptq", options=LoadOptions()) is None
    assert pm.hook.quantize(method="3bit", options=LoadOptions()) is None
    pm.check_pending()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_4bit_computes_in_the_model_dtype(dtype: str) -> None:
    plan = loom_bitsandbytes.quantize(method="4bit", options=LoadOptions(device="cpu", dtype=dtype))
    assert plan.load_kwargs["quantization_config"].bnb_4bit_compute_dtype == getattr(torch, dtype)


def test_manager_options_carry_the_plan(pm) -> None:
    opts = ModelManager(pm, Settings(default_device="cpu")).options(quantization="8bit")
    assert opts.quantization == "8bit"
    assert opts.quantization_plan is not None and opts.quantization_plan.provider == "bitsandbytes"


@pytest.mark.parametrize("method", ["4bit", "8bit"])
def test_missing_library_is_424(pm, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    # A None entry in sys.modules is how Python marks a module as not importable: find_spec answers None.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingBackend) as err:
        ModelManager(pm, Settings(default_device="cpu")).options(quantization=method)
    assert err.value.status == 424
    assert err.value.field == "quantization"
    assert "pip install bitsandbytes" in err.value.detail
    assert pm.hook.quantize(method="awq", options=LoadOptions()) is None  # other methods are not ours to refuse
