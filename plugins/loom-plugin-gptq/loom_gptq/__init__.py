"""The Loom's GPTQ / AWQ loader: probe by quantization_config, load through transformers + gptqmodel + optimum.

No ``quantize`` hook: quantizing a model to GPTQ or AWQ at load time needs calibration data and minutes to hours of
compute, which a request cannot supply; this plugin serves checkpoints that are already quantized (see README).
"""

from __future__ import annotations

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

NAME = "gptq"


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    from loom_gptq.loading import probe_quantization

    try:
        return probe_quantization(model)
    except Exception:  # a probe never raises: a config we cannot read is simply not ours
        return None


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    if loader != NAME:
        return None
    from loom_gptq.loading import load_quantized

    return load_quantized(model, options)


@hookimpl
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    if model.loader != NAME:
        return None
    # A quantized checkpoint is the same transformers model with QuantLinear modules in its blocks: the
    # transformers plugin's hook-based capture finds the blocks and runs it unchanged.
    from loom_transformers import run

    return run(model, batch, capture)
