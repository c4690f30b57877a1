"""The Loom's GPTQ / AWQ loader: probe by quantization_config, load through the transformers loader (asked through the
kernel's ``load`` hook) with gptqmodel + optimum installed; the model keeps that loader's runner, which captures
states with hooks on its blocks, QuantLinear modules and all.

No ``quantize`` hook: quantizing a model to GPTQ or AWQ at load time needs calibration data and minutes to hours of
compute, which a request cannot supply; this plugin serves checkpoints that are already quantized (see README).
"""

from __future__ import annotations

from loom_kernel import Kernel, LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

NAME = "gptq"


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    from loom_gptq.loading import probe_quantization

    try:
        return probe_quantization(model)
    except Exception:  # a probe never raises: a config we cannot read is simply not ours
        return None


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions, kernel: Kernel | None) -> LoadedModel | None:
    if loader != NAME:
        return None
    from loom_gptq.loading import load_quantized

    return load_quantized(model, options, kernel)
