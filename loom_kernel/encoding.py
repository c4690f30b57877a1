"""Tensors to the wire: JSON lists, base64 (little-endian, in the wire dtype) or one safetensors body."""

from __future__ import annotations

import base64
import json
from typing import Any

from loom_kernel.errors import InvalidField

FORMATS = ("list", "base64", "safetensors")
DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_MEDIA_TYPE = "application/vnd.loom.safetensors"


def check_format(fmt: str, field: str = "hidden_state_format") -> str:
    if fmt not in FORMATS:
        raise InvalidField(f"{field}: unknown format {fmt!r}", field=field, allowed=list(FORMATS))
    return fmt


def check_dtype(dtype: str, field: str = "hidden_state_dtype") -> str:
    if dtype not in DTYPES:
        raise InvalidField(f"{field}: unknown dtype {dtype!r}", field=field, allowed=list(DTYPES))
    return dtype


def to_wire_dtype(tensor: Any, dtype: str) -> Any:
    import torch

    return tensor.detach().to("cpu", getattr(torch, dtype)).contiguous()


def _le_bytes(tensor: Any) -> bytes:
    import sys

    import torch

    if tensor.dtype == torch.bfloat16:
        arr = tensor.view(torch.int16).numpy()
    else:
        arr = tensor.numpy()
    if sys.byteorder != "little":
        arr = arr.byteswap()
    return arr.tobytes()


def encode_tensor(tensor: Any, dtype: str, fmt: str) -> dict[str, Any]:
    """One tensor as ``{data, shape, dtype}`` (``encoding: base64`` added for base64)."""
    t = to_wire_dtype(tensor, dtype)
    entry: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype}
    if fmt == "base64":
        entry["encoding"] = "base64"
        entry["data"] = base64.b64encode(_le_bytes(t)).decode("ascii")
    else:
        entry["data"] = t.float().tolist()
    return entry


def encode_states(states: dict[str, Any], dtype: str, fmt: str) -> dict[str, dict[str, Any]]:
    return {key: encode_tensor(t, dtype, fmt) for key, t in states.items()}


def safetensors_body(payload: dict[str, Any], groups: dict[str, Any], dtype: str) -> bytes:
    """A safetensors file holding ``groups[group][key]`` as tensor ``"group.key"`` (a group that is one tensor, such
    as ``logits``, as tensor ``"group"``).

    The JSON part of the response travels in ``__metadata__["loom"]``; each group in it maps key to
    ``{tensor, shape, dtype}`` so a reader knows which tensor is which.
    """
    from safetensors.torch import save

    tensors: dict[str, Any] = {}
    meta = dict(payload)
    for group, states in groups.items():
        if not isinstance(states, dict):
            tensors[group] = to_wire_dtype(states, dtype)
            meta[group] = {"tensor": group, "shape": list(states.shape), "dtype": dtype}
            continue
        described = {}
        for key, t in states.items():
            name = f"{group}.{key}"
            tensors[name] = to_wire_dtype(t, dtype)
            described[key] = {"tensor": name, "shape": list(t.shape), "dtype": dtype}
        meta[group] = described
    return save(tensors, metadata={"loom": json.dumps(meta)})
