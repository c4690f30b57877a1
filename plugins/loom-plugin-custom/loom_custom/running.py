"""Forward passes of a custom model with hook-based capture (``loom_kernel.capture.StateRecorder``).

Index space as everywhere in The Loom: 0 is the input of block 0 (the embedding output), i the output of block i,
N the output of the module ``final_norm`` names (or of the last block when the manifest names none).

Each row runs alone as ``model(input_ids)`` with ``input_ids`` a LongTensor [1, T]: an arbitrary module may take
no attention mask, and padding it would change an encoder's states, so rows are never padded together. A custom
model does not generate (no KV cache, no sampling contract with the factory's module).
"""

from __future__ import annotations

from typing import Any

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, SequenceOutput
from loom_kernel.capture import StateRecorder
from loom_kernel.errors import InvalidField, LoomError, Unsupported


def run_batch(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    import torch

    if batch.generation is not None:
        raise Unsupported(
            f"model: {model.ref.id!r} is loaded by the custom loader, which runs forward passes (/extract, /embed) "
            "but does not generate",
            field="model",
        )
    if capture.attention_layers:
        raise Unsupported(
            f"return_attention: the custom loader cannot capture attention weights of {model.ref.id!r}",
            field="return_attention",
        )
    inputs, truncated = _inputs(model, batch)
    with torch.inference_mode():
        rows = [_forward(model, ids, capture) for ids in inputs]
    for row, cut in zip(rows, truncated, strict=True):
        row.truncated = cut
    return ForwardOutput(rows=rows)


def _inputs(model: LoadedModel, batch: Batch) -> tuple[list[list[int]], list[bool]]:
    """Token ids per row, checked against the vocabulary and the context before any forward pass, and which rows
    were cut to the context (only when ``batch.truncate`` allows it; otherwise a too-long row is InvalidField)."""
    vocab = model.extra.get("vocab_size")
    if batch.token_ids is not None:
        field = "token_ids"
        inputs = [[int(t) for t in ids] for ids in batch.token_ids]
        for ids in inputs:
            bad = [t for t in ids if vocab is not None and not 0 <= t < vocab]
            if bad:
                raise InvalidField(
                    f"{field}: ids {bad[:5]} are outside the vocabulary", field=field, allowed=f"0 to {vocab - 1}"
                )
    else:
        field = "prompt" if batch.generation is not None else "text"
        tok = model.tokenizer
        inputs = [
            [int(t) for t in tok(text, add_special_tokens=batch.add_special_tokens)["input_ids"]]
            for text in batch.texts
        ]
    limit = model.max_context
    truncated = [False] * len(inputs)
    for i, ids in enumerate(inputs):
        where = {"row": i} if len(inputs) > 1 else {}
        if not ids:
            raise InvalidField(f"{field}: tokenizes to no tokens", field=field, **where)
        if limit and len(ids) > limit:
            if not batch.truncate:
                raise InvalidField(
                    f"{field}: {len(ids)} tokens exceed the model's context of {limit}",
                    field=field,
                    allowed=f"at most {limit} tokens",
                    **where,
                )
            truncated[i], inputs[i] = True, ids[:limit]
    return inputs, truncated


def _forward(model: LoadedModel, ids: list[int], capture: Capture) -> SequenceOutput:
    import torch

    row = SequenceOutput(token_ids=list(ids), prompt_tokens=len(ids))
    if not capture.wants_states:
        return row
    net: Any = model.model
    with StateRecorder(net, model.extra["blocks"], capture.indices, final=model.extra["final"]) as rec:
        # "last" keeps one row per layer as the pass runs; anything else keeps every token for the kernel to slice.
        rec.rows = [-1] if capture.positions == "last" else None
        rec.replace = True
        net(torch.tensor([ids], dtype=torch.long, device=model.extra["input_device"]))
        taken = rec.taken()
    silent = [i for i in capture.indices if i not in taken]
    if silent:
        raise LoomError(
            f"model: {model.ref.id!r}: layers {silent} produced no output during the forward pass; does the "
            "manifest's blocks (or final_norm) name modules that model(input_ids) runs?",
            field="model",
        )
    row.positions = [len(ids) - 1] if capture.positions == "last" else list(range(len(ids)))
    row.states = {sel.key: taken[sel.index][0] for sel in capture.layers}
    return row
