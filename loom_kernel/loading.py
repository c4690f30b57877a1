"""What every loader repeats: the layer count a config names, and the bytes a module holds."""

from __future__ import annotations

from typing import Any

from loom_kernel.errors import BadModel


def count_layers(config: Any) -> int:
    """The number of transformer blocks a transformers config names."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise BadModel(f"model: config of type {type(config).__name__} names no layer count", field="model")


def module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
