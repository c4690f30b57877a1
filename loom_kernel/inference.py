"""What a request asks of a loaded model, turned into one hook call and a response payload.

Shared by the HTTP endpoints; nothing here knows about Litestar. Everything that touches tensors runs on the
model's worker thread (the API passes these functions to ``ModelManager.run``).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pluggy

from loom_kernel.capture import check_positions, resolve_layers, resolve_positions
from loom_kernel.encoding import check_dtype, check_format, encode_states, safetensors_body
from loom_kernel.errors import InvalidField, Unsupported
from loom_kernel.types import Batch, Capture, ForwardOutput, GenerationParams, LoadedModel, SequenceOutput


@attrs.define(frozen=True)
class StateRequest:
    """The capture fields of a request, checked before any model work."""

    wanted: bool
    layers: Any
    positions: Any
    fmt: str
    dtype: str

    @classmethod
    def from_fields(
        cls,
        *,
        wanted: bool,
        layers: Any,
        positions: Any,
        return_full_sequence: bool,
        fmt: str,
        dtype: str,
        default_layers: list[int],
    ) -> StateRequest:
        if positions is None:
            positions = "all" if return_full_sequence else "last"
        positions = check_positions(positions)
        return cls(
            wanted=wanted or return_full_sequence or positions != "last",
            layers=default_layers if layers is None else layers,
            positions=positions,
            fmt=check_format(fmt),
            dtype=check_dtype(dtype),
        )

    def capture(self, model: LoadedModel) -> Capture:
        """Resolve against the model; raises InvalidField for an out-of-range layer."""
        if not self.wanted:
            return Capture()
        # The last token is always returned as hidden_states, so anything but "last" needs every row.
        return Capture(layers=resolve_layers(self.layers, model.num_layers), positions=self.positions)


def forward(pm: pluggy.PluginManager, model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    out = pm.hook.forward_with_states(model=model, batch=batch, capture=capture)
    if out is None:
        raise Unsupported(f"loader: no plugin runs forward passes for loader {model.loader!r}", field="loader")
    return out


def split_states(row: SequenceOutput, positions: Any) -> tuple[dict[str, Any], dict[str, Any] | None, list[int]]:
    """(last-token states [1, H], selected rows [P, H] or None for "last", the selected positions)."""
    total = len(row.token_ids)
    if positions == "last":
        last = {k: t[-1:] for k, t in row.states.items()}
        return last, None, [total - 1]
    wanted = resolve_positions(positions, total, row.prompt_tokens)
    where = {p: i for i, p in enumerate(row.positions)}
    import torch

    rows = torch.tensor([where[p] for p in wanted], dtype=torch.long)
    last = {k: t[where[total - 1]].unsqueeze(0) for k, t in row.states.items()}
    return last, {k: t.index_select(0, rows) for k, t in row.states.items()}, wanted


def state_payload(
    row: SequenceOutput, req: StateRequest, capture: Capture
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """JSON fields for the states of one row, and the raw tensors by group (for safetensors)."""
    if not capture.wanted:
        return {}, {}
    last, seq, positions = split_states(row, req.positions)
    groups = {"hidden_states": last}
    if seq is not None:
        groups["sequence_hidden_states"] = seq
    fields: dict[str, Any] = {"layer_indices": {sel.key: sel.index for sel in capture.layers}}
    if seq is not None:
        fields["positions"] = positions
    if req.fmt != "safetensors":
        for group, states in groups.items():
            fields[group] = encode_states(states, req.dtype, req.fmt)
    return fields, groups


def finish(payload: dict[str, Any], groups: dict[str, dict[str, Any]], req: StateRequest) -> dict[str, Any] | bytes:
    if req.fmt == "safetensors":
        return safetensors_body(payload, groups, req.dtype)
    return payload


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    return {
        "model_id": model.ref.id,
        "loader": model.loader,
        "device": model.device,
        "dtype": model.dtype,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
    }


def timing(start: float, generated: int) -> dict[str, Any]:
    elapsed = time.perf_counter() - start
    return {
        "inference_time_ms": round(elapsed * 1000.0, 3),
        "tokens_per_second": round(generated / elapsed, 3) if elapsed > 0 and generated else 0.0,
    }


def check_generation(model: LoadedModel, params: GenerationParams) -> None:
    """Refuse what this model cannot generate before any work starts."""
    if not model.can_generate:
        raise Unsupported(
            f"model: {model.ref.id!r} is a {model.kind} model and cannot generate; use /extract or /embed",
            field="model",
        )
    if model.max_context and params.max_tokens > model.max_context:
        raise InvalidField(
            f"max_tokens: {params.max_tokens} exceeds the model's context of {model.max_context} tokens",
            field="max_tokens",
            allowed=f"0 to {model.max_context}",
        )


def generate(
    pm: pluggy.PluginManager, model: LoadedModel, batch: Batch, req: StateRequest
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], SequenceOutput]:
    """One prompt generated with states: the /generate payload, its tensors by group, and the raw row."""
    assert batch.generation is not None
    check_generation(model, batch.generation)
    capture = req.capture(model)
    start = time.perf_counter()
    row = forward(pm, model, batch, capture).rows[0]
    generated = len(row.generated_ids)
    fields, groups = state_payload(row, req, capture)
    payload = {
        "text": row.text,
        "token_count": generated,
        "prompt_tokens": row.prompt_tokens,
        "finish_reason": row.finish_reason,
        "token_ids": row.generated_ids,
        **fields,
        "metadata": {**model_metadata(model), **timing(start, generated), "prompt_tokens": row.prompt_tokens},
    }
    return payload, groups, row
