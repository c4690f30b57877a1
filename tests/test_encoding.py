"""Wire formats decode to the tensors that went in."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load

from loom_kernel.encoding import check_format, encode_tensor, safetensors_body
from loom_kernel.errors import InvalidField


def safetensors_metadata(body: bytes) -> dict:
    """The format's own header: 8 bytes little-endian length, then JSON holding ``__metadata__``."""
    size = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + size])["__metadata__"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_base64_is_little_endian_in_the_wire_dtype(dtype):
    t = torch.randn(3, 5)
    entry = encode_tensor(t, dtype, "base64")
    raw = base64.b64decode(entry["data"])
    want = t.to(getattr(torch, dtype))
    if dtype == "bfloat16":
        got = torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy()).view(torch.bfloat16)
    else:
        got = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).copy())
    assert entry["shape"] == [3, 5] and entry["dtype"] == dtype and entry["encoding"] == "base64"
    assert torch.equal(got.reshape(3, 5), want)


def test_list_format_rounds_through_the_wire_dtype():
    t = torch.randn(2, 4)
    entry = encode_tensor(t, "float16", "list")
    assert torch.equal(torch.tensor(entry["data"]), t.half().float())


def test_safetensors_body_carries_json_in_metadata():
    a, b = torch.randn(1, 8), torch.randn(5, 8)
    body = safetensors_body(
        {"text": "hi"}, {"hidden_states": {"-1": a}, "sequence_hidden_states": {"-1": b}}, "float32"
    )
    tensors = load(body)
    assert torch.equal(tensors["hidden_states.-1"], a) and torch.equal(tensors["sequence_hidden_states.-1"], b)
    meta = json.loads(safetensors_metadata(body)["loom"])
    assert meta["text"] == "hi" and meta["hidden_states"]["-1"] == {
        "tensor": "hidden_states.-1",
        "shape": [1, 8],
        "dtype": "float32",
    }


def test_unknown_format_names_the_allowed_ones():
    with pytest.raises(InvalidField) as err:
        check_format("numpy")
    assert err.value.allowed == ["list", "base64", "safetensors"]
