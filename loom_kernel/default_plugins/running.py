"""The default ``forward_with_states``: the model's own runner (``LoadedModel.runner``), when its loader set one, or
the kernel's own for a model whose loader declared its parts (``ModelParts``)."""

from __future__ import annotations

from loom_kernel.generic import declared
from loom_kernel.hookspecs import hookimpl
from loom_kernel.types import Batch, Capture, ForwardOutput, LoadedModel


@hookimpl(trylast=True)
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    declared(model)
    return model.runner.forward(batch, capture) if model.runner is not None else None
