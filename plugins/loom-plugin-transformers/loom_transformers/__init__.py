"""The Loom's transformers loader: probe from config.json, load with the Auto classes, capture with hooks."""

from __future__ import annotations

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl
from loom_kernel.errors import Unsupported

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


@hookimpl
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    if model.loader != NAME:
        return None
    return run(model, batch, capture)


def run(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    """A forward pass, or a whole generation (the kernel's scheduler steps generations through
    ``LoadedModel.decoder`` instead, so that requests join a running batch)."""
    if batch.generation is None:
        from loom_transformers.running import run_batch

        return run_batch(model, batch, capture)
    if not model.can_generate:
        raise Unsupported(f"model: {model.ref.id!r} is not a causal model and cannot generate", field="model")
    from loom_transformers.generation import generate_whole

    return ForwardOutput(rows=generate_whole(model, batch, capture))
