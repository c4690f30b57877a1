"""POST /analyze: the geometry of a set of texts' hidden states, per layer, computed on the server.

Which rows make a layer's matrix (``rows``): ``"last"`` (default) one row per text, its last token's state, as the
original project's demo computes D_eff from one vector per prompt; ``"mean"`` one row per text, the mean over its
tokens; ``"tokens"`` every token of every text. The metrics are those of ``loom_geometry.metrics``, in float64
whatever the model's dtype. A layer whose rows span fewer than two directions (identical texts, or one text with a
row per text) has no beta: a 422 naming ``texts`` and the layer, not a null. What the pass keeps (every layer asked
for, at every token for ``"mean"`` and ``"tokens"``) and the metrics' float64 copy are estimated before any work and
bounded by ``geometry.max_capture_mb``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from loom_geometry.metrics import layer_metrics
from loom_kernel import (
    Batch,
    Capture,
    InvalidField,
    LayerSel,
    LayerSpec,
    LoadedModel,
    Manager,
    ModelRequest,
    NonEmpty,
    Option,
    SequenceOutput,
    Session,
    client_gone,
    model_metadata,
    resolve_layers,
    row_lengths,
    timing,
)

MAX_ANALYZE_TEXTS = 256
CAPTURE_MAX_MB = Option(
    "geometry",
    "max_capture_mb",
    4096.0,
    "MiB of states one /analyze may keep, estimated before any work (0: no bound)",
    minimum=0.0,
)
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class CaptureTooLarge(InvalidField):
    title = "Capture too large"


class AnalyzeRequest(ModelRequest, kw_only=True):
    texts: Annotated[list[NonEmpty], msgspec.Meta(min_length=1, max_length=MAX_ANALYZE_TEXTS)]
    hidden_state_layers: LayerSpec | None = "all"
    rows: Literal["last", "mean", "tokens"] = "last"
    add_special_tokens: bool = True


def capture_bytes(model: LoadedModel, lengths: list[int], rows: str, layers: int) -> int:
    """An upper estimate of the bytes an analysis of texts of ``lengths`` tokens holds at its peak, from shapes alone:
    each layer's states at the positions kept (the last for ``"last"``, every one otherwise), twice (the pass's padded
    batch and each row's copy coexist as it ends), and one layer's matrix as the metrics make it (its float32 rows,
    their concatenation and its float64 copy)."""
    per = DTYPE_BYTES.get(model.dtype, 4)
    width = max(model.hidden_size, model.final_width or 0)
    kept = [1 if rows == "last" else n for n in lengths]
    padded = len(kept) * (1 if rows == "last" else max(kept, default=0))
    states = (padded + sum(kept)) * layers * width * per
    matrix = sum(kept) * width * (4 + 4 + 8)
    return states + matrix


def check_capture(model: LoadedModel, data: AnalyzeRequest, layers: int, limit: int) -> None:
    """A 422 naming ``texts`` (and how many of them fit) when the analysis would keep over ``limit`` bytes (0: no
    bound); a text counts as one token per character plus two, at most the model's context."""
    lengths = row_lengths(model, Batch(texts=tuple(data.texts)))
    total = capture_bytes(model, lengths, data.rows, layers)
    if not limit or total <= limit:
        return
    fit = next(
        (k for k in range(len(lengths), 0, -1) if capture_bytes(model, lengths[:k], data.rows, layers) <= limit), 0
    )
    raise CaptureTooLarge(
        f"texts: the states this analysis keeps ({layers} layers of {len(lengths)} texts, rows {data.rows!r}) would "
        f"take about {total / 2**20:.1f} MiB, over this server's geometry.max_capture_mb of {limit / 2**20:g}; send "
        'fewer or shorter texts, fewer hidden_state_layers, or rows "last"',
        field="texts",
        allowed=f"at most {fit} of these texts with these layers and rows" if fit else "fewer layers or shorter texts",
        estimate_bytes=total,
        limit_bytes=limit,
    )


async def analyze(session: Session, data: AnalyzeRequest, limit: int = 0) -> dict[str, Any]:
    start = time.perf_counter()
    layers = resolve_layers(data.hidden_state_layers, session.model.num_layers)
    check_capture(session.model, data, len(layers), limit)
    capture = Capture(layers=layers, positions="last" if data.rows == "last" else "all")
    batch = Batch(texts=tuple(data.texts), add_special_tokens=data.add_special_tokens)
    try:
        out = (await session.forward(batch, capture)).rows
    except InvalidField as exc:  # the loader names a row's "text": the request's field is texts[row]
        if exc.field != "text":
            raise
        row = exc.extra.get("row", 0)
        detail = exc.detail.split(": ", 1)[-1]
        raise InvalidField(f"texts[{row}]: {detail}", field=f"texts[{row}]", allowed=exc.allowed, row=row) from None
    return await session.thread(metrics, session.model, data, layers, out, start)


def metrics(
    model: LoadedModel, data: AnalyzeRequest, layers: tuple[LayerSel, ...], out: list[SequenceOutput], start: float
) -> dict[str, Any]:
    """The answer: each layer's matrix of rows and its geometry (on a request thread)."""
    import torch

    metrics = {}
    for sel in layers:
        per_text = [row.states[sel.key].float() for row in out]
        if data.rows == "last":
            matrix = torch.cat([s[-1:] for s in per_text])
        elif data.rows == "mean":
            matrix = torch.stack([s.mean(dim=0) for s in per_text])
        else:
            matrix = torch.cat(per_text)
        found = layer_metrics(matrix)
        if found["rank"] < 2:  # beta is a slope through the non-zero squared singular values: one point has none
            rank = found["rank"]
            raise InvalidField(
                f"texts: at layer {sel.key} the states' {int(matrix.shape[0])} rows span {rank} "
                f"direction{'' if rank == 1 else 's'} (rank {rank}), and beta, the slope of the spectrum's decay, "
                f'needs two; send texts whose states differ there, rows "tokens", or leave layer {sel.key} out of '
                "hidden_state_layers",
                field="texts",
                allowed="texts whose rows span two directions or more at every layer asked for",
                layer=sel.key,
            )
        metrics[sel.key] = {"layer_index": sel.index, "rows": int(matrix.shape[0]), **found}
    return {
        "model": data.model,
        "rows": data.rows,
        "hidden_size": model.hidden_size,
        "token_counts": [len(row.token_ids) for row in out],
        "layers": metrics,
        "metadata": {**model_metadata(model), **timing(start, 0)},
    }


class AnalyzeController(Controller):
    tags = ["analysis"]

    @post("/analyze", status_code=200)
    async def analyze(self, data: JSONBody[AnalyzeRequest], request: Request, manager: Manager) -> dict[str, Any]:
        """Per layer: D_eff (entropy and 90%-variance forms), beta and row norms of the texts' states."""
        limit = int(CAPTURE_MAX_MB.of(manager.settings) * 2**20)
        entry = await manager.get_for(data)
        return await manager.run(entry, lambda s: analyze(s, data, limit), until=client_gone(request))
