"""Scoring a model directory from its sentence-transformers files alone (never its weights)."""

from __future__ import annotations

from loom_kernel import ModelRef, ProbeResult

MODULES_SCORE = 0.9  # modules.json: the model's own pipeline is known, above the generic transformers loader (0.5)
CONFIG_ONLY_SCORE = 0.85  # config_sentence_transformers.json only: SentenceTransformer builds Transformer + mean


def probe_files(model: ModelRef) -> ProbeResult | None:
    modules = model.modules
    if isinstance(modules, list) and modules:
        kinds = [str(m.get("type", "?")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
        return ProbeResult(
            loader="sentence_transformers",
            score=MODULES_SCORE,
            reason=f"modules.json lists a sentence-transformers pipeline: {', '.join(kinds)}",
        )
    if "config_sentence_transformers.json" in model.files:
        return ProbeResult(
            loader="sentence_transformers",
            score=CONFIG_ONLY_SCORE,
            reason="config_sentence_transformers.json without modules.json (a Transformer with mean pooling)",
        )
    return None
