"""The ``4bit`` and ``8bit`` quantization methods: bitsandbytes load arguments for transformers' loaders."""

from __future__ import annotations

import importlib.util
from typing import Any

from loom_kernel import LoadOptions, MissingBackend, QuantizationPlan, hookimpl, resolve_device, resolve_dtype

METHODS = ("4bit", "8bit")


@hookimpl
def quantize(method: str, options: LoadOptions) -> QuantizationPlan | None:
    if method not in METHODS:
        return None  # another plugin's method (gptq, awq, ...): let the next implementation answer
    # find_spec, not import: importing bitsandbytes takes seconds (it probes its GPU and CPU backends) and this
    # hook runs on the server's event loop; transformers imports it in the load thread.
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingBackend(
            f"quantization: {method!r} needs the bitsandbytes library; pip install bitsandbytes",
            field="quantization",
        )
    return QuantizationPlan(
        method=method, load_kwargs={"quantization_config": bnb_config(method, options)}, provider="bitsandbytes"
    )


def bnb_config(method: str, options: LoadOptions) -> Any:
    """transformers' BitsAndBytesConfig for ``method`` ("4bit" or "8bit")."""
    from transformers import BitsAndBytesConfig

    if method == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # The 4-bit matmuls dequantize to the compute dtype: the dtype the rest of the model is loaded in, so that
    # activations do not change dtype at every quantized layer (float32 on CPU, bfloat16/float16 on CUDA).
    compute_dtype = resolve_dtype(options.dtype, resolve_device(options.device))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # NormalFloat4: the data type QLoRA found best for normally distributed weights
        bnb_4bit_use_double_quant=True,  # also quantize the per-block scales: about 0.4 bit per weight saved
        bnb_4bit_compute_dtype=compute_dtype,
    )
