"""The ``interventions`` field: each item checked against the loaded model, before any work, and turned into an
``Intervention`` the loader applies at its site (``loom_kernel.capture.check_site``)."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from typing import Any

from loom_kernel import Intervention, InvalidField, LoadedModel, PositionSpec, check_site, echo, site_names_allowed

OPS = ("add", "set", "scale", "ablate", "zero")
NEEDS_VECTOR = ("add", "set", "ablate")
KEYS = -1  # the last dimension of a keyed site's shape (attn.hook_attn_scores, hook_pattern): its key positions
KEYED_OPS = ("scale", "zero")
EDIT_POSITIONS = ("all", "prompt", "generated")
WIRE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
SCALED_OPS = ("add", "scale")  # the ops that read ``scale``: add (h + scale * v), scale (scale * h)
FLOAT32_MAX = 3.4028234663852886e38  # an edit runs in float32: a larger scale is infinity there, as a vector's is


def resolve_interventions(
    specs: Sequence[Any],
    model: LoadedModel,
    lookup: Callable[[str], Any] | None = None,
    features: Callable[[str, int, str], tuple[int | str, Any]] | None = None,
    field: str = "interventions",
) -> tuple[Intervention, ...]:
    """Every item of the field checked (site, op, positions, heads, vector and its shape) and resolved; ``lookup``
    finds a stored vector by name, ``features`` an SAE feature's (site, decoder row)."""
    return tuple(_one(spec, model, lookup, features, f"{field}[{k}]") for k, spec in enumerate(specs))


def _one(spec: Any, model: LoadedModel, lookup: Any, features: Any, at: str) -> Intervention:
    site_spec, feature = spec.site, None
    if spec.feature is not None:
        if spec.op != "add" or spec.vector is not None or features is None:
            raise InvalidField(
                f"{at}.feature: a feature is added (op add, no vector)", field=f"{at}.feature", allowed=None
            )
        feature_site, feature = features(spec.feature.probe, spec.feature.index, f"{at}.feature")
        site_spec = feature_site if site_spec is None else site_spec
    if site_spec is None:
        raise InvalidField(f"{at}.site: required", field=f"{at}.site", allowed=site_names_allowed(model))
    site, shape = check_site(site_spec, model, f"{at}.site")
    if spec.op not in OPS:
        raise InvalidField(f"{at}.op: unknown op {echo(spec.op)}", field=f"{at}.op", allowed=list(OPS))
    scale = _scale(spec.op, spec.scale, f"{at}.scale")
    if shape and shape[-1] == KEYS and spec.op not in KEYED_OPS:
        raise InvalidField(
            f"{at}.op: {site} holds one value per key position, and a query's keys grow with the sequence: "
            f"edit it with {' or '.join(KEYED_OPS)} (zero is attention knock-out)",
            field=f"{at}.op",
            allowed=list(KEYED_OPS),
        )
    positions = _positions(spec.positions, model.max_context, f"{at}.positions")
    heads = _heads(spec.heads, site, shape, f"{at}.heads")
    vector = None
    if feature is not None:
        vector = _shaped(feature.float(), "add", positions, shape, f"{at}.feature")
    elif spec.op in NEEDS_VECTOR:
        if spec.vector is None:
            raise InvalidField(
                f"{at}.vector: op {echo(spec.op)} needs a vector", field=f"{at}.vector", allowed=_shapes(shape)
            )
        vector = _shaped(read_vector(spec.vector, lookup, f"{at}.vector"), spec.op, positions, shape, f"{at}.vector")
    elif spec.vector is not None:
        raise InvalidField(
            f"{at}.vector: op {echo(spec.op)} takes no vector",
            field=f"{at}.vector",
            allowed="no vector for scale and zero",
        )
    return Intervention(site=site, op=spec.op, vector=vector, scale=scale, positions=positions, heads=heads)


def _scale(op: str, scale: float | None, field: str) -> float:
    """The edit's scale: 1.0 for add unless given; required for scale (without it the edit would do nothing); refused
    for set, ablate and zero, which do not read it (it would be accepted and ignored); finite in float32."""
    if scale is None:
        if op == "scale":
            raise InvalidField(f"{field}: op 'scale' needs a scale", field=field, allowed="a finite number")
        return 1.0
    if op not in SCALED_OPS:
        raise InvalidField(
            f"{field}: op {echo(op)} takes no scale (only add and scale read it)", field=field, allowed=None
        )
    if not (math.isfinite(scale) and abs(scale) <= FLOAT32_MAX):
        raise InvalidField(
            f"{field}: {scale!r} is not a finite float32 number (edits run in float32)",
            field=field,
            allowed=f"a number from {-FLOAT32_MAX:.7g} to {FLOAT32_MAX:.7g}",
        )
    return float(scale)


def _positions(spec: Any, context: int | None, field: str) -> PositionSpec:
    """The edit's positions; a list is checked against the model's context here (no sequence is longer), and
    against each row's own sequence once it is tokenized (``loom_kernel.inputs.check_edit_positions``)."""
    if isinstance(spec, str) and spec in EDIT_POSITIONS:
        return spec  # type: ignore[return-value]
    ints = isinstance(spec, list) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    if ints and len(set(spec)) == len(spec) and (not context or all(-context <= p < context for p in spec)):
        return list(spec)
    within = f" from {-context} to {context - 1}, the model's context," if context else ""
    raise InvalidField(
        f"{field}: {echo(spec)} is not a position spec for an edit",
        field=field,
        allowed=[
            *EDIT_POSITIONS,
            f"a non-empty list of distinct token indices{within} (negative: from the end of the prompt)",
        ],
    )


def _heads(heads: Any, site: int | str, shape: tuple[int, ...], field: str) -> tuple[int, ...] | None:
    if heads is None:
        return None
    if len(shape) < 2:  # a per-head point is [heads, ...]
        raise InvalidField(
            f"{field}: heads apply to per-head sites only ([heads, ...]: attn.hook_q/k/v/rot_q/rot_k/z/result/"
            "attn_scores/pattern); this site's shape is " + str(list(shape)),
            field=field,
            allowed=None,
        )
    count = shape[0]
    bad = [h for h in heads if not 0 <= h < count]
    if not heads or bad or len(set(heads)) < len(heads):
        raise InvalidField(
            f"{field}: {echo(heads)} is not a list of distinct heads of this model",
            field=field,
            allowed=f"distinct integers from 0 to {count - 1}",
        )
    return tuple(heads)


def read_vector(value: Any, lookup: Callable[[str], Any] | None, field: str) -> Any:
    """A vector as a float32 CPU tensor: a JSON list (or list of lists), a wire tensor as the server returns them
    (``{data, shape, dtype[, encoding: "base64"]}``) or the name of a stored vector."""
    import torch

    if isinstance(value, str):
        stored = lookup(value) if lookup is not None else None
        if stored is None:
            raise InvalidField(
                f"{field}: no stored vector named {echo(value)}",
                field=field,
                allowed="a stored vector's name (GET /vectors)",
            )
        return stored
    if isinstance(value, dict):
        return _wire(value, field)
    try:
        t = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError):
        raise InvalidField(
            f"{field}: not a list of numbers or a rectangular list of lists of numbers",
            field=field,
            allowed="[D] or [P, D] numbers, a wire tensor or a stored vector's name",
        ) from None
    return _finite(t, field)


def _named(dtype: Any) -> bool:
    return isinstance(dtype, str) and dtype in WIRE_DTYPES


def _wire(value: dict[str, Any], field: str) -> Any:
    import numpy as np
    import torch

    allowed = '{"data", "shape", "dtype": float32|float16|bfloat16, "encoding": "base64" (optional)}'
    shape, dtype, data = value.get("shape"), value.get("dtype", "float32"), value.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape) or not _named(dtype):
        raise InvalidField(f"{field}: not a wire tensor", field=field, allowed=allowed)
    count = math.prod(shape)
    try:
        if value.get("encoding") == "base64":
            raw = base64.b64decode(data, validate=True)
            if len(raw) != count * WIRE_DTYPES[dtype]:
                raise ValueError(f"{len(raw)} bytes for shape {shape} in {dtype}")
            if dtype == "bfloat16":  # the top half of a float32's bits
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype="<f4" if dtype == "float32" else "<f2").astype(np.float32)
            t = torch.from_numpy(array.copy()).reshape(shape)
        else:
            t = torch.tensor(data, dtype=torch.float32).reshape(shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidField(f"{field}: not a wire tensor: {exc}", field=field, allowed=allowed) from None
    return _finite(t, field)


def _finite(t: Any, field: str) -> Any:
    import torch

    if t.numel() == 0:
        raise InvalidField(f"{field}: holds no numbers", field=field, allowed="a non-empty vector")
    if not bool(torch.isfinite(t).all()):
        raise InvalidField(f"{field}: holds NaN or infinity", field=field, allowed="finite numbers")
    return t


def _shapes(shape: tuple[int, ...]) -> str:
    d = shape[-1]
    return f"[{d}], or [P, {d}] with a list of P positions ([k, {d}] for ablate)"


def _shaped(v: Any, op: str, positions: PositionSpec, shape: tuple[int, ...], field: str) -> Any:
    """``v`` checked against the site's last dimension; for ablate, its rows' orthonormal basis."""
    import torch

    d = shape[-1]
    if v.ndim not in (1, 2) or v.shape[-1] != d:
        raise InvalidField(
            f"{field}: shape {list(v.shape)} does not fit the site's {d} dimensions",
            field=field,
            allowed=_shapes(shape),
        )
    if op == "ablate":
        rows = v.reshape(-1, d).double()
        if rows.shape[0] > d or bool((rows.norm(dim=1) == 0).any()):
            raise InvalidField(
                f"{field}: ablate needs at most {d} non-zero directions", field=field, allowed=_shapes(shape)
            )
        q, r = torch.linalg.qr(rows.T)
        if bool((r.diagonal().abs() < 1e-10 * rows.norm(dim=1).max()).any()):
            raise InvalidField(f"{field}: the directions are linearly dependent", field=field, allowed=_shapes(shape))
        return q.T.float().contiguous()
    if v.ndim == 2 and (not isinstance(positions, list) or len(positions) != v.shape[0]):
        raise InvalidField(
            f"{field}: {v.shape[0]} rows need a list of {v.shape[0]} positions",
            field=field,
            allowed=_shapes(shape),
        )
    return v.contiguous()
