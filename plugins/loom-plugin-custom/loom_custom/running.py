"""Forward passes of a custom model with hook-based capture (``loom_kernel.capture.StateRecorder``).

Index space as everywhere in The Loom: 0 is the input of block 0 (the embedding output), i the output of block i,
N the output of the module ``final_norm`` names (or of the last block when the manifest names none).

Each row runs alone as ``model(input_ids)`` with ``input_ids`` a LongTensor [1, T]: an arbitrary module may take
no attention mask, and padding it would change an encoder's states, so rows are never padded together. A custom
model does not generate (no KV cache, no sampling contract with the factory's module).
"""

from __future__ import annotations

from typing import Any

from loom_kernel import (
    Batch,
    Capture,
    ForwardOutput,
    InvalidField,
    LoadedModel,
    LoomError,
    SequenceOutput,
    StateRecorder,
    Unsupported,
    batch_inputs,
)


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
    """Token ids per row, checked against the vocabulary and the context before any forward pass."""
    tok = model.tokenizer
    return batch_inputs(
        batch,
        tokenize=lambda text: tok(text, add_special_tokens=batch.add_special_tokens)["input_ids"],
        vocab_size=model.extra.get("vocab_size"),
        max_context=model.max_context,
    )


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
        try:
            net(torch.tensor([ids], dtype=torch.long, device=model.extra["input_device"]))
        except IndexError as exc:  # a table lookup past its end: a position the factory's model cannot embed
            raise InvalidField(
                f"text: {len(ids)} tokens index past a table of {model.ref.id!r} ({exc}); its manifest's max_context "
                "would refuse or cut such a text before the pass",
                field="text",
                allowed="texts within the model's positions",
            ) from None
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
