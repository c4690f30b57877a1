"""One forward pass over a batch with hidden-state capture, following the kernel's ``forward_with_states`` contract.

What the kernel expects back, per input row (``SequenceOutput``):

- ``token_ids``: the row's tokens; ``prompt_tokens``: all of them (no generation here).
- ``positions``: ``[total - 1]`` when ``capture.positions == "last"``, else every position; the kernel slices
  "prompt", "generated" and explicit index lists out of the full rows itself. Empty when no layer is asked for.
- ``states[sel.key]``: a CPU float tensor [len(positions), H] for each requested ``LayerSel``.
"""

from __future__ import annotations

from typing import Any

import torch

from loom_example.toy import VOCAB_SIZE
from loom_kernel import (
    Batch,
    Capture,
    ForwardOutput,
    LoadedModel,
    SequenceOutput,
    StateRecorder,
    Unsupported,
    batch_inputs,
)


def run_batch(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    # Refuse by field name what the toy cannot do, so the client gets a 422 that says which field to drop.
    if batch.generation is not None:
        raise Unsupported(f"model: {model.ref.id!r} has no language-model head and cannot generate", field="model")
    if capture.attention:
        raise Unsupported("return_attention: the toy architecture has no attention", field="return_attention")
    inputs, truncated = _inputs(model, batch)
    toy = model.model
    device = next(toy.parameters()).device
    width = max(len(ids) for ids in inputs)
    # Right padding with id 0 is safe: every block is causal, so a row's real tokens never see the padding.
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    for i, row in enumerate(inputs):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    recorder = StateRecorder(toy, toy.blocks, capture.indices) if capture.wants_states else None
    try:
        with torch.inference_mode():
            toy(ids.to(device))
        taken = recorder.taken() if recorder is not None else {}
    finally:
        # Hooks must not outlive the request: the next request may ask for other layers.
        if recorder is not None:
            recorder.close()
    rows = []
    for i, row in enumerate(inputs):
        total = len(row)
        positions = capture.kept_positions(total)
        states = {sel.key: taken[sel.index][i, positions].float() for sel in capture.layers if sel.index in taken}
        rows.append(
            SequenceOutput(
                token_ids=row,
                prompt_tokens=total,
                text=batch.texts[i] if batch.texts else model.tokenizer.decode(row),
                positions=positions,
                states=states,
                truncated=truncated[i],
            )
        )
    return ForwardOutput(rows=rows)


def _inputs(model: LoadedModel, batch: Batch) -> tuple[list[list[int]], list[bool]]:
    """Token ids per row, checked before any forward pass (the kernel's helper names the field and row of a bad
    one), and which rows were cut to the context."""
    tok: Any = model.tokenizer
    return batch_inputs(
        batch,
        tokenize=lambda text: tok.encode(text, add_special_tokens=batch.add_special_tokens),
        vocab_size=VOCAB_SIZE,
        max_context=model.max_context,
    )
