"""The Loom's transformers loader: probe from config.json, load with the Auto classes, capture with hooks; the
loaded model's runner (``runner.TransformersRunner``) runs its passes and generations."""

from __future__ import annotations

from loom_kernel import LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

NAME = "transformers"


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    from loom_transformers.loading import probe_config

    try:
        return probe_config(model.config)
    except Exception:  # a probe never raises: an unreadable config is simply not ours
        return None


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    if loader != NAME:
        return None
    from loom_transformers.loading import load_model

    return load_model(model, options)
