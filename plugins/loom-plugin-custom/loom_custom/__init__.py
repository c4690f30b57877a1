"""The Loom's custom loader: models whose architecture transformers does not know, built by a factory
("module:function") that a loom.json manifest or a ``custom_models`` entry of the server config names.

torch and the factory's code are imported inside the hooks only: probing reads the manifest and never imports.
"""

from __future__ import annotations

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

NAME = "custom"


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    from loom_custom.manifest import probe_manifest

    try:
        return probe_manifest(model)
    except Exception:  # a probe never raises: an odd manifest is for load() to explain
        return None


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    if loader != NAME:
        return None
    from loom_custom.loading import load_model

    return load_model(model, options)


@hookimpl
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    if model.loader != NAME:
        return None
    from loom_custom.running import run_batch

    return run_batch(model, batch, capture)
