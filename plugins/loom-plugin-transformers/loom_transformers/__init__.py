"""The Loom's transformers loader: probe from config.json, load with the Auto classes, capture with hooks; the
loaded model's runner (``runner.TransformersRunner``) runs its passes and generations."""

from __future__ import annotations

from loom_kernel import LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

NAME = "transformers"
# The Loom's loaders and quantization plugins: what to install when a request or a checkpoint needs one that is not
# (this loader would otherwise take a quantized checkpoint's config.json and fail deep inside transformers).
INSTALL_HINTS = {
    "loader": {
        "transformers": "loom-plugin-transformers",
        "sentence_transformers": "loom-plugin-sentence-transformers",
        "custom": "loom-plugin-custom",
        "gptq": "loom-plugin-gptq",
    },
    "quantization": {
        "4bit": "loom-plugin-bitsandbytes",
        "8bit": "loom-plugin-bitsandbytes",
        "gptq": "loom-plugin-gptq",
        "awq": "loom-plugin-gptq",
    },
}


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    from loom_transformers.loading import probe_config

    try:
        return probe_config(model.config)
    except Exception:  # a probe never raises: an unreadable config is simply not ours
        return None


@hookimpl
def install_hints() -> dict[str, dict[str, str]]:
    return INSTALL_HINTS


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    if loader != NAME:
        return None
    from loom_transformers.loading import load_model

    return load_model(model, options)
