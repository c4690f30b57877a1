"""POST /analyze: the geometry of a set of texts' hidden states, per layer, computed on the server.

Which rows make a layer's matrix (``rows``): ``"last"`` (default) one row per text, its last token's state, as the
original project's demo computes D_eff from one vector per prompt; ``"mean"`` one row per text, the mean over its
tokens; ``"tokens"`` every token of every text. The metrics are those of ``loom_geometry.metrics``, in float64
whatever the model's dtype. A layer whose rows span fewer than two directions (identical texts, or one text with a
row per text) has no beta: a 422 naming ``texts`` and the layer, not a null.
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
    SequenceOutput,
    Session,
    client_gone,
    model_metadata,
    resolve_layers,
    timing,
)

MAX_ANALYZE_TEXTS = 256


class AnalyzeRequest(ModelRequest, kw_only=True):
    texts: Annotated[list[NonEmpty], msgspec.Meta(min_length=1, max_length=MAX_ANALYZE_TEXTS)]
    hidden_state_layers: LayerSpec | None = "all"
    rows: Literal["last", "mean", "tokens"] = "last"
    add_special_tokens: bool = True


async def analyze(session: Session, data: AnalyzeRequest) -> dict[str, Any]:
    start = time.perf_counter()
    layers = resolve_layers(data.hidden_state_layers, session.model.num_layers)
    capture = Capture(layers=layers, positions="last" if data.rows == "last" else "all")
    batch = Batch(texts=tuple(data.texts), add_special_tokens=data.add_special_tokens)
    try:
        out = (await session.forward(batch, capture)).rows
    except InvalidField as exc:  # the loader names a row's "text": the request's field is texts[row]
        if exc.field != "text":
            raise
        row = exc.extra.get("row", 0)
        detail = exc.detail.split(": ", 1)[-1]
        raise InvalidField(f"texts[{row}]: {detail}", field="texts", allowed=exc.allowed, row=row) from None
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
        entry = await manager.get_for(data)
        return await manager.run(entry, lambda s: analyze(s, data), until=client_gone(request))
