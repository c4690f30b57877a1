"""The fast encoders (JSON text by numpy, base64 and safetensors from the tensor's memory) give exactly the values
of the reference path: a Python float per element through msgspec, ``tobytes`` and ``safetensors.torch.save``."""

from __future__ import annotations

import base64
import json

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import load

from loom_kernel.encoding import (
    NUMPY_TEXT_MIN,
    encode_states,
    encode_tensor,
    json_floats,
    safetensors_body,
    safetensors_bytes,
)

DTYPES = ["float32", "float16", "bfloat16"]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 0.1, 1.0, 100.0, 1e-8]


def wire(obj: object) -> object:
    """What a client reads: the body msgspec writes, parsed back as JSON."""
    return json.loads(msgspec.json.encode(obj))


def as_float32(data: object) -> np.ndarray:
    """The client's view: JSON numbers (null for nan/inf) read as float32."""
    return np.array(data, dtype=np.float64).astype(np.float32) if data is not None else np.float32(np.nan)


def reference(t: torch.Tensor, dtype: str) -> object:
    """The old list format: ``tolist()`` through msgspec, which writes null for nan and inf."""
    return wire(t.to(getattr(torch, dtype)).float().tolist())


def with_nulls(data: object) -> object:
    if isinstance(data, list):
        return [with_nulls(x) for x in data]
    return np.nan if data is None else data


def same_floats(got: object, want: object) -> bool:
    g, w = np.asarray(with_nulls(got), dtype=np.float32), np.asarray(with_nulls(want), dtype=np.float32)
    return g.shape == w.shape and np.array_equal(g.view(np.uint32), w.view(np.uint32))


def big(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random values over many magnitudes, with nan, inf and signed zeros among them."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen) * torch.exp(torch.randn(*shape, generator=gen) * 8)
    flat = t.view(-1)
    flat[: len(SPECIAL)] = torch.tensor(SPECIAL)
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5000,), (8, 768), (3, 5, 400), (2, 3, 4, 200), (1, 1, 1, 4096)])
def test_list_text_reads_back_as_the_reference(shape, dtype):
    t = big(*shape)
    entry = encode_tensor(t, dtype, "list")
    got = wire(entry)
    assert got["shape"] == list(shape) and got["dtype"] == dtype and "encoding" not in got
    want = reference(t, dtype)
    assert same_floats(got["data"], want)
    # nan and inf are null where the reference has null, and nowhere else.
    assert json.dumps(got["data"]).count("null") == json.dumps(want).count("null") > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tensors_keep_the_reference_text(dtype):
    t = torch.tensor([[float("nan"), float("inf"), -0.0, 0.1]]).repeat(1, 8)
    assert t.numel() < NUMPY_TEXT_MIN
    want = msgspec.json.encode(t.to(getattr(torch, dtype)).float().tolist())
    assert msgspec.json.encode(encode_tensor(t, dtype, "list")).endswith(b'"data":' + want + b"}")


def test_every_float32_bit_pattern_sample_round_trips():
    bits = np.random.default_rng(0).integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    got = np.array(with_nulls(json.loads(bytes(json_floats(values)))), dtype=np.float32)
    finite = np.isfinite(values)
    assert np.array_equal(got[finite].view(np.uint32), bits[finite])
    assert np.isnan(got[~finite]).all()


def test_numbers_always_read_as_floats():
    """A JSON number without '.' or 'e' is an int to Python's json: an all-integer tensor must not turn into ints."""
    values = np.array([1.0, 2.0, 100.0, -3.0, 0.0, 1e10] * 1000, dtype=np.float32)
    assert all(isinstance(x, float) for x in json.loads(bytes(json_floats(values))))


def test_text_is_nine_digits_without_trailing_zeros():
    values = np.array([0.1, -0.0, 0.5, 100.0, -123.5, float("nan")], dtype=np.float32)
    assert bytes(json_floats(values)) == b"[1.00000001e-1,-0.0,5.0e-1,1.0e2,-1.235e2,null]"


def test_entry_still_reads_like_the_dict_it_replaced():
    t = big(2, 3000)
    entry = encode_tensor(t, "float32", "list")
    assert entry["shape"] == [2, 3000] and entry.get("encoding") is None and "data" in entry
    assert same_floats(entry["data"][0], reference(t, "float32")[0])
    assert dict(entry).keys() == {"shape", "dtype", "data"}
    b64 = encode_tensor(t, "float16", "base64")
    assert b64["encoding"] == "base64" and isinstance(b64["data"], str)
    assert list(b64) == ["shape", "dtype", "encoding", "data"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_base64_from_memory_is_the_reference_bytes(dtype):
    t = big(13, 768)
    entry = wire(encode_states({"-1": t}, dtype, "base64"))["-1"]
    raw = base64.b64decode(entry["data"])
    wt = t.to(getattr(torch, dtype))
    bits = wt.view(torch.int16) if dtype == "bfloat16" else wt
    assert raw == bits.numpy().astype(bits.numpy().dtype.newbyteorder("<")).tobytes()  # the old _le_bytes
    read = np.frombuffer(raw, dtype="<i2" if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<"))
    got = torch.from_numpy(read.copy()).reshape(13, 768)
    got = got.view(torch.bfloat16) if dtype == "bfloat16" else got
    assert torch.equal(got.view(torch.uint8), wt.view(torch.uint8))  # bit for bit, nan and inf included


@pytest.mark.parametrize("dtype", DTYPES)
def test_safetensors_body_loads_as_save_wrote_it(dtype):
    from safetensors.torch import save

    groups = {"hidden_states": {"-1": big(1, 768), "0": big(1, 768, seed=1)}, "logits": big(3, 50), "empty": {}}
    body = safetensors_body({"text": "hi"}, groups, dtype)
    tensors = load(body)
    wd = getattr(torch, dtype)
    want = {
        "hidden_states.-1": groups["hidden_states"]["-1"].to(wd),
        "hidden_states.0": groups["hidden_states"]["0"].to(wd),
        "logits": groups["logits"].to(wd),
    }
    assert tensors.keys() == want.keys()
    for name, t in want.items():
        assert tensors[name].dtype == wd and torch.equal(tensors[name].view(torch.uint8), t.view(torch.uint8)), name
    assert load(save(want)).keys() == tensors.keys()


def test_safetensors_bytes_handles_empty_and_scalar_tensors():
    tensors = {"a": torch.zeros(0, 4), "b": torch.tensor(2.5), "c": torch.ones(3)}
    got = load(safetensors_bytes(tensors, "float32", {"k": "v"}))
    assert all(torch.equal(got[k], t) for k, t in tensors.items())
