"""An edit (``Intervention``) applied to one row's activations in a pass: which columns it touches and what it does
to them. The kernel's runner for declared parts and every loader's hooks share these, so that ``add``, ``set``,
``scale``, ``ablate`` and ``zero`` mean one thing at every site."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from loom_kernel.types import Intervention


@attrs.define(frozen=True)
class Layout:
    """Where a row's new tokens are in a pass: columns ``col``.. of the batch, tokens ``tok``.. of its sequence
    (``count`` of them), the first ``prompt`` tokens of the sequence being its prompt."""

    col: int
    tok: int
    count: int
    prompt: int


def edit_columns(edit: Intervention, place: Layout) -> tuple[list[int], list[int] | None]:
    """The pass's columns ``edit`` touches for one row, and the vector row for each (None: one vector for all)."""
    tokens = range(place.tok, place.tok + place.count)
    if edit.positions == "all":
        picked = list(tokens)
    elif edit.positions == "prompt":
        picked = [t for t in tokens if t < place.prompt]
    elif edit.positions == "generated":
        picked = [t for t in tokens if t >= place.prompt]
    else:
        wanted = {(p if p >= 0 else place.prompt + p): j for j, p in enumerate(edit.positions)}
        picked = [t for t in tokens if t in wanted]
        if edit.vector is not None and edit.vector.ndim == 2 and edit.op != "ablate":
            return [place.col + t - place.tok for t in picked], [wanted[t] for t in picked]
    return [place.col + t - place.tok for t in picked], None


def apply_edit(x: Any, edit: Intervention, rows: list[int] | None) -> Any:
    """``edit`` on ``x`` [m, ..., D], in float32: add (x + scale * v), set (v), scale (scale * x), ablate (x minus
    its projection on the rows of v, an orthonormal basis), zero."""
    xf = x.float()
    v = None
    if edit.vector is not None:
        v = edit.vector.to(xf.device)
        if rows is not None:
            v = v[rows]
            v = v.view(v.shape[0], *([1] * (xf.ndim - 2)), v.shape[-1])
    if edit.op == "add":
        return xf + edit.scale * v
    if edit.op == "set":
        return (v if v is not None else xf).expand_as(xf).clone()
    if edit.op == "scale":
        return edit.scale * xf
    if edit.op == "ablate":
        return xf - (xf @ v.T) @ v
    return xf.zero_()


def row_edits(edits: Sequence[Sequence[Intervention]], places: Sequence[Layout]) -> Callable[[int, Any], Any]:
    """``StateRecorder``'s ``edit`` for a pass of rows [B, T, ...]: row b's edits at a hidden-state index, at the
    columns its ``places[b]`` gives them."""

    def edit(index: int, h: Any) -> Any:
        import torch

        h = h.clone()
        for b, (row, place) in enumerate(zip(edits, places, strict=True)):
            for change in (e for e in row if e.site == index):
                columns, rows = edit_columns(change, place)
                if columns:
                    cols = torch.tensor(columns, device=h.device)
                    h[b, cols] = apply_edit(h[b].index_select(0, cols), change, rows).to(h.dtype)
        return h

    return edit
