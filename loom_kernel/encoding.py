"""Tensors to the wire: JSON lists, base64 (little-endian, in the wire dtype) or one safetensors body.

Each is written straight from the tensor's memory: large JSON lists as text built by numpy (``json_floats``), base64
and safetensors from the contiguous buffer, so no Python object is made per element (bench/encoding.py measures).
"""

from __future__ import annotations

import binascii
import json
import math
import sys
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any

import msgspec
import numpy as np

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


def _le_array(tensor: Any) -> np.ndarray:
    """The contiguous tensor's own memory as a little-endian numpy array (no copy on a little-endian host)."""
    import torch

    arr = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    if sys.byteorder != "little":
        arr = arr.byteswap()
    return arr


def b64_raw(arr: np.ndarray) -> msgspec.Raw:
    """A JSON string of the array's bytes in base64, read straight from its memory: base64 never needs escaping,
    so the quoted text goes into the body as is instead of through msgspec's string encoder."""
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return msgspec.Raw(b'"' + binascii.b2a_base64(data, newline=False) + b'"')


# Correctly rounded powers of ten, 10**-64 .. 10**64: np.power(10.0, k) is off by an ulp for some k.
_POW10 = np.array([float(Fraction(10) ** k) for k in range(-64, 65)])
_E0 = 64  # index of 10**0 in _POW10 and of exponent 0 in _EXPONENT
_MAX_NDIM = 7  # a row's brackets, ']' * k + ',' + '[' * k, must fit its 16-byte slot


def _word(text: bytes, at: int = 0) -> int:
    """``text`` placed at byte ``at`` of a little-endian uint64."""
    return int.from_bytes(text, "little") << (8 * at)


# The second word's tail, by exponent: "e-dd" (nothing for e == 0) at bytes 3..6 and the comma at byte 7.
_EXPONENT = np.array(
    [_word(b"" if k == 0 else b"e%d" % k, 3) | _word(b",", 7) for k in range(-64, 65)], dtype=np.uint64
)
# The first word's head, by sign * 10 + leading digit: "-d." or "d.".
_HEAD = np.array([_word(b"-" * s + b"%d." % d) for s in (0, 1) for d in range(10)], np.uint64)
_NULL = _word(b"null")
_ZERO = (_word(b"0.0"), _word(b"-0.0"))


def _four_digits(at: int, strip: bool = False, keep_one: bool = False) -> np.ndarray:
    """0000..9999 as ASCII at bytes ``at``..``at+3`` of a uint64, ``strip``: without trailing zeros (``keep_one``:
    but never the first digit)."""
    texts = (b"%04d" % i for i in range(10000))
    if strip:
        texts = (t.rstrip(b"0") or (b"0" if keep_one else b"") for t in texts)
    return np.array([_word(t, at) for t in texts], dtype=np.uint64)


# The eight digits after the point come from two table look-ups of four. The first four, by hi + 10000 when the
# last four are all zero (then its own trailing zeros go too, but never its first digit); the last four, by lo.
_HI = np.concatenate([_four_digits(0), _four_digits(0, strip=True, keep_one=True)])
_LO = _four_digits(4, strip=True)


def json_floats(values: np.ndarray) -> bytearray | None:
    """The JSON text of a float array as nested lists, built by numpy without a Python float per element; None for
    shapes it does not handle (0-d, empty), which the caller encodes the old way.

    Each finite number is written with nine significant digits in exponent form, trailing zeros dropped
    (``-1.7511493e-1``, ``1.0e2``): nine digits always parse back to the same float32, the text is about a third
    shorter than the float64 repr that ``tolist()`` gives, and there is no shortest-repr search to vectorize.
    Zeros are ``0.0``/``-0.0`` and nan/inf are ``null``, as msgspec writes them for Python floats.
    """
    if values.ndim == 0 or values.ndim > _MAX_NDIM or values.size == 0:
        return None
    a = np.ascontiguousarray(values, dtype=np.float32)
    cols = a.shape[-1]
    v = a.reshape(-1)
    n = v.size
    with np.errstate(invalid="ignore"):
        x = np.abs(v).astype(np.float64)
    finite = np.isfinite(x)
    zero = x == 0
    special = ~finite | zero
    any_special = bool(special.any())
    if any_special:
        x[special] = 1.0
    e = np.floor(np.log10(x)).astype(np.intp)
    m = np.rint(x * _POW10[_E0 + 8 - e])
    # log10 can miss by one next to a power of ten, and rounding can carry to ten digits: both move the exponent.
    over, under = m >= 1e9, m < 1e8
    if over.any() or under.any():
        e += over
        e -= under
        m = np.rint(x * _POW10[_E0 + 8 - e])
        if ((m >= 1e9) | (m < 1e8)).any():
            return None
    m = m.astype(np.intp)
    lead, rest = np.divmod(m, 100000000)
    hi, lo = np.divmod(rest, 10000)
    digits = _HI[hi + (lo == 0) * 10000] | _LO[lo]

    rows = n // cols
    # 16-byte slots, zero bytes where nothing goes, dropped at the end.
    # The first slot opens the lists; then one per number, and one after each row for its brackets.
    whole = np.empty(2 + rows * (cols + 1) * 2, dtype=np.uint64)
    whole[:2] = _slot(b"[" * a.ndim)
    out = whole[2:].reshape(rows, cols + 1, 2)
    first = _HEAD[np.signbit(v) * 10 + lead] | (digits << np.uint64(24))
    second = (digits >> np.uint64(40)) | _EXPONENT[_E0 + e]
    if any_special:
        zeros = np.flatnonzero(zero)
        first[zeros] = np.where(np.signbit(v[zeros]), _ZERO[1], _ZERO[0]).astype(np.uint64)
        second[zeros] = _word(b",", 7)
        bad = np.flatnonzero(~finite)
        first[bad] = _NULL
        second[bad] = _word(b",", 7)
    out[:, :cols, 0] = first.reshape(rows, cols)
    out[:, :cols, 1] = second.reshape(rows, cols)
    out[:, cols - 1, 1] &= np.uint64(_word(b"\xff" * 7))  # a row's last number has no comma after it
    _row_brackets(out[:, cols], a.shape)
    if sys.byteorder != "little":
        whole.byteswap(inplace=True)
    # bytearray.translate drops the zero bytes in one C loop, twice as fast as numpy's boolean indexing here.
    return bytearray(whole.view(np.uint8)).translate(None, b"\0")


def _row_brackets(slots: np.ndarray, shape: tuple[int, ...]) -> None:
    """Each row's 16-byte slot: ``]`` for the row and for every outer list it ends, then ``,`` and as many ``[``
    when more follow."""
    closes = np.ones(len(slots), dtype=np.intp)
    for axis in range(1, len(shape) - 1):
        inner = math.prod(shape[axis:-1])
        closes[inner - 1 :: inner] += 1
    for k in np.unique(closes[:-1]):
        slots[:-1][closes[:-1] == k] = _slot(b"]" * k + b"," + b"[" * k)
    slots[-1] = _slot(b"]" * len(shape))


def _slot(text: bytes) -> np.ndarray:
    return np.frombuffer(text.ljust(16, b"\0"), dtype="<u8").astype(np.uint64)


# Below this many numbers numpy's fixed cost (some forty array operations) outweighs a Python float each:
# measured by bench/encoding.py, [1, 768] is twice as fast through tolist, [16, 384] already slower.
NUMPY_TEXT_MIN = 4096


def json_raw(tensor: Any) -> msgspec.Raw:
    """A float tensor's nested lists as JSON text, ready to sit in a body that msgspec encodes."""
    arr = tensor.detach().cpu().float().numpy()
    text = json_floats(arr) if arr.size >= NUMPY_TEXT_MIN else None
    return msgspec.Raw(text if text is not None else msgspec.json.encode(arr.tolist()))


class WireTensor(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One tensor on the wire: ``{shape, dtype, [encoding,] data}`` with ``data`` already JSON, so that msgspec
    copies it into the body instead of encoding a Python float per element.

    It reads like the dict it replaced (``entry["data"]`` decodes the JSON back to lists, or to the base64
    string), for the few Python callers, such as the OpenAI seed extras, that look inside it.
    """

    shape: list[int]
    dtype: str
    encoding: str | None = None
    data: msgspec.Raw

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        value = getattr(self, key)
        return msgspec.json.decode(value) if key == "data" else value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def keys(self) -> list[str]:
        return ["shape", "dtype", "data"] if self.encoding is None else ["shape", "dtype", "encoding", "data"]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def values(self) -> list[Any]:
        return [self[k] for k in self.keys()]


Mapping.register(WireTensor)


def encode_tensor(tensor: Any, dtype: str, fmt: str) -> WireTensor:
    """One tensor as ``{shape, dtype, data}`` (``encoding: base64`` added for base64)."""
    t = to_wire_dtype(tensor, dtype)
    if fmt == "base64":
        return WireTensor(shape=list(t.shape), dtype=dtype, encoding="base64", data=b64_raw(_le_array(t)))
    return WireTensor(shape=list(t.shape), dtype=dtype, data=json_raw(t))


def encode_states(states: dict[str, Any], dtype: str, fmt: str) -> dict[str, WireTensor]:
    return {key: encode_tensor(t, dtype, fmt) for key, t in states.items()}


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def safetensors_body(payload: dict[str, Any], groups: dict[str, Any], dtype: str) -> bytes:
    """A safetensors file holding ``groups[group][key]`` as tensor ``"group.key"`` (a group that is one tensor, such
    as ``logits``, as tensor ``"group"``).

    The JSON part of the response travels in ``__metadata__["loom"]``; each group in it maps key to
    ``{tensor, shape, dtype}`` so a reader knows which tensor is which.

    Written here rather than by ``safetensors.torch.save``, which copies every tensor to bytes and then again into
    its buffer: the header is small JSON and each tensor's memory is joined into the body once.
    """
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
    return safetensors_bytes(tensors, dtype, {"loom": json.dumps(meta)})


def safetensors_bytes(tensors: dict[str, Any], dtype: str, metadata: dict[str, str]) -> bytes:
    """The safetensors format of contiguous CPU tensors all in ``dtype``: 8-byte little-endian header length, the
    JSON header (padded with spaces to 8 bytes, as safetensors writes it), then the raw little-endian data."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks = []
    offset = 0
    for name, t in tensors.items():
        data = memoryview(_le_array(t).reshape(-1).view(np.uint8))
        end = offset + data.nbytes
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
        chunks.append(data)
    text = msgspec.json.encode(header)
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])
