"""A running batch's KV cache: transformers' ``DynamicLayer`` with room to grow.

``DynamicLayer.update`` concatenates every step, copying the whole cache of every layer to append one column; with
8 rows of 300 tokens that copy is a third of a GPT-2-small step on a CPU (docs/performance.md). ``RoomyLayer``
keeps its keys and values as views of larger buffers and writes each step's column into the room after them,
copying only when the room runs out (or when the decoder replaced the tensors: a row joined or left).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

# Columns of room a new buffer gets: a quarter of the columns it holds, at least 16 (short prompts grow fast) and at
# most 256 (a long context's room would otherwise hold gigabytes on a GPU; 256 still copies 256x less than concat).
MIN_ROOM, MAX_ROOM = 16, 256


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room for the next columns."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None
        self._view: torch.Tensor | None = None  # the keys this layer last handed out: anything else is new

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        total = held + key_states.shape[-2]
        room = self._room
        if room is None or self.keys is not self._view or total > room[0].shape[-2]:
            columns = total + min(MAX_ROOM, max(MIN_ROOM, total // 4))
            # Keys and values may differ in width: DeepSeek's latent cache holds the compressed kv as "keys" and the
            # rotary key as "values".
            room = (
                key_states.new_empty((*key_states.shape[:-2], columns, key_states.shape[-1])),
                value_states.new_empty((*value_states.shape[:-2], columns, value_states.shape[-1])),
            )
            if held:
                room[0][..., :held, :] = self.keys
                room[1][..., :held, :] = self.values
            self._room = room
        room[0][..., held:total, :] = key_states
        room[1][..., held:total, :] = value_states
        self.keys, self.values = room[0][..., :total, :], room[1][..., :total, :]
        self._view = self.keys
        return self.keys, self.values


def roomy(cache: Any) -> Any:
    """``cache`` (a DynamicCache of plain layers) with RoomyLayers holding the same tensors."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            new = RoomyLayer()
            new.keys, new.values, new.is_initialized = layer.keys, layer.values, layer.is_initialized
            if layer.is_initialized:
                new.device = layer.device
            cache.layers[i] = new
    return cache


def plain(cache: Any) -> bool:
    """Whether ``cache`` is a DynamicCache of plain layers, whose tensors can be padded and joined."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, RoomyLayer) for layer in layers)
