"""The runner the kernel calls for a transformers model (``LoadedModel.runner``)."""

from __future__ import annotations

import attrs

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, Unsupported, generate_whole


@attrs.define(eq=False)
class TransformersRunner:
    model: LoadedModel

    def forward(self, batch: Batch, capture: Capture) -> ForwardOutput:
        """A forward pass, or a whole generation through the kernel's engine and this loader's decoder (the
        server's scheduler steps generations itself, so that requests join a running batch)."""
        model = self.model
        if batch.generation is None:
            from loom_transformers.running import run_batch

            return run_batch(model, batch, capture)
        if not model.can_generate:
            raise Unsupported(f"model: {model.ref.id!r} is not a causal model and cannot generate", field="model")
        return generate_whole(model, batch, capture)
