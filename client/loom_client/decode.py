"""Wire to numpy: every tensor of a response becomes an array, whichever format carried it.

A tensor is ``{"shape", "dtype", "data"}`` in JSON (``data`` nested lists, or base64 of the little-endian values
with ``"encoding": "base64"``), or a named tensor of a safetensors body whose ``__metadata__["loom"]`` holds the JSON
part with ``{"tensor", "shape", "dtype"}`` in each tensor's place. numpy has no bfloat16, so bfloat16 arrives as
float32 (exactly: a bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

SAFETENSORS_MEDIA_TYPE = "application/vnd.loom.safetensors"
WIRE_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def from_bytes(raw: bytes | memoryview, numpy_dtype: str, shape: list[int], bfloat16: bool) -> np.ndarray:
    # A copy in the machine's byte order: an array over the response's bytes would be read-only, where the list
    # format's array (and a torch tensor from TransformerLens) can be edited in place.
    arr = np.frombuffer(raw, dtype=numpy_dtype).astype(np.dtype(numpy_dtype).newbyteorder("="))
    if bfloat16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.reshape(shape)


def tensor(entry: dict[str, Any]) -> np.ndarray:
    """One JSON tensor entry as an array in its wire dtype (bfloat16 as float32)."""
    dtype, shape = entry["dtype"], entry["shape"]
    if entry.get("encoding") == "base64":
        return from_bytes(base64.b64decode(entry["data"]), WIRE_DTYPES[dtype], shape, dtype == "bfloat16")
    # None (JSON null) is NaN or an infinity on the wire; numpy reads None as NaN in a float array.
    out_dtype = np.float16 if dtype == "float16" else np.float32
    return np.asarray(entry["data"], dtype=np.float64).astype(out_dtype).reshape(shape)


def is_tensor(value: Any) -> bool:
    return isinstance(value, dict) and "data" in value and "shape" in value and value.get("dtype") in WIRE_DTYPES


def arrays(value: Any) -> Any:
    """``value`` (decoded JSON) with every tensor entry replaced by its array, at any depth; the original project's
    ``hidden_state`` (``final``: the last token's state) gets ``final`` as an array of its ``shape[-1]`` values."""
    if is_tensor(value):
        return tensor(value)
    if isinstance(value, dict) and {"final", "shape", "layer"} <= value.keys() and value.get("dtype") in WIRE_DTYPES:
        entry = {"shape": value["shape"], "dtype": value["dtype"], "data": value["final"]}
        if value.get("encoding") == "base64":
            entry["encoding"] = "base64"
        else:
            entry["shape"] = value["shape"][-1:]
        return {**value, "final": tensor(entry).reshape(-1)}
    if isinstance(value, dict):
        return {k: arrays(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        return [arrays(v) for v in value]
    return value


def safetensors(body: bytes) -> dict[str, Any]:
    """A Loom safetensors body as the JSON it stands for, with arrays in the tensors' places."""
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + size])
    meta = json.loads(header.pop("__metadata__")["loom"])
    data = memoryview(body)[8 + size :]
    named = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        named[name] = from_bytes(
            data[start:end], SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["dtype"] == "BF16"
        )

    def place(value: Any) -> Any:
        if isinstance(value, dict):
            if "tensor" in value and "shape" in value and value["tensor"] in named:
                return named[value["tensor"]]
            return {k: place(v) for k, v in value.items()}
        return value

    return place(meta)


def embedding(value: Any) -> np.ndarray:
    """An embedding as float32: a list of floats, or OpenAI's base64 of little-endian float32."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """/embed, /embed/batch and /v1/embeddings bodies with their vectors as arrays."""
    out = dict(body)
    if "embedding" in out:
        out["embedding"] = embedding(out["embedding"])
    if "embeddings" in out:
        rows = out["embeddings"]
        # pooling "none" gives rows of different lengths: a list of [T_i, D] arrays rather than one array
        out["embeddings"] = np.asarray(rows, dtype=np.float32) if out.get("shape") else [embedding(r) for r in rows]
    if isinstance(out.get("data"), list):
        out["data"] = [{**d, "embedding": embedding(d["embedding"])} if "embedding" in d else d for d in out["data"]]
    return out
