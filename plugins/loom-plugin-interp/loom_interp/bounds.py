"""What ``/patch`` and ``/logit_attribution`` capture, bounded before any work: the tensors a pass keeps for every
position and site they read grow with the text's length and the model's width (an 8B model's per-head results over
8K tokens are tens of GB), so a request over ``max_capture_mb`` is a 422 naming the field to shrink and the most
that fits."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from loom_kernel import Batch, Capture, InvalidField, LoadedModel, Option, row_lengths, vocabulary_size

CAPTURE_MAX_MB = Option(
    "interventions",
    "max_capture_mb",
    4096.0,
    "MiB of tensors one /patch or /logit_attribution pass may capture, estimated before any work (0: no bound)",
    flag="max-capture-mb",
    minimum=0.0,
)

# Bytes one number of a captured tensor takes, by the model's dtype (a norm's scale is float32 whatever it is).
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
HEADS = ("num_attention_heads", "n_head", "num_heads")  # the config's count of attention heads, by family
MLP_WIDTH = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "ffn_hidden_size")  # an MLP's width, by family
# What autograd keeps for a gradient pass's backward, in numbers per token and block: the inputs of every linear,
# norm and activation. Measured with torch's saved-tensor hooks at 11.6 d for the tiny Llama (MLP 2 d wide) and 24.5
# d for GPT-2 (4 d): 6 d + 5 MLP covers both (tests/test_capture_bounds.py checks it against that count).
GRAPH_PER_D, GRAPH_PER_MLP = 6, 5
# Under eager attention the graph keeps each head's pattern [T, T] a block (measured one such tensor): twice, for
# the masks and scores a family keeps beside it.
GRAPH_PATTERNS = 2


class CaptureTooLarge(InvalidField):
    title = "Capture too large"


def capture_bytes(model: LoadedModel, batch: Batch, capture: Capture) -> dict[str, int]:
    """An upper estimate of the bytes a forward pass's ``capture`` holds at its peak, by part, from shapes alone,
    before any work (a text counts as one token per character plus two, at most the model's context). Each row
    keeps its positions (the last for "last"; those listed and the last for a list; every one otherwise) of every
    layer and site; states, gradients and attention weights count twice, since the pass's padded batch and each
    row's copy of it coexist as the pass ends; logits (float32) once, at the positions read (with ``gradient``, at
    every position kept), with the final norm's output they are computed from. With a gradient, the graph autograd
    keeps for the backward pass (``graph``) is counted too; the model's transient activations of a plain pass are
    not (one block's at a time)."""
    per = DTYPE_BYTES.get(model.dtype, 4)
    config = model.ref.config or {}
    heads = next((v for k in HEADS if isinstance(v := config.get(k), int) and v > 0), max(1, model.hidden_size // 64))
    vocab = vocabulary_size(model) or 0
    lengths = row_lengths(model, batch)
    width = max(lengths, default=0)
    spec = capture.positions

    def kept(total: int) -> int:  # the positions a row of ``total`` tokens keeps
        if spec == "last":
            return 1
        if isinstance(spec, list | tuple):
            return len({p % total for p in spec if -total <= p < total} | {total - 1})
        return total

    own = [kept(n) for n in lengths]
    padded = len(lengths) * (max(own) if spec == "last" or isinstance(spec, list | tuple) else width)
    logit_rows = 1 if spec == "last" else len(spec) if isinstance(spec, list | tuple) else 0
    shapes = model.sites or {}
    per_position = len(capture.layers) * model.hidden_size * per
    for site in capture.sites:
        number = 4 if site.endswith("hook_scale") else per
        per_position += math.prod(width if d == -1 else d for d in shapes.get(site, (model.hidden_size,))) * number
    states = (padded + sum(own)) * per_position if capture.wants_states else 0
    # The logits, and the final norm's output the LM head reads them from (kept in the padded batch only; with a
    # gradient, its gradient too).
    final = padded * model.hidden_size * per * (2 if capture.gradient is not None else 1)
    # With a gradient, the logits are at every position kept (the metric's, the last, among them).
    at = own if capture.gradient is not None else [logit_rows or n for n in lengths]
    logits = sum(at) * vocab * 4 + final if capture.logits else 0
    return {
        "states": states,
        "gradients": states if capture.gradient is not None else 0,
        "attentions": (padded + sum(own)) * len(capture.attention_layers) * heads * width * per,
        "logits": logits,
        "graph": graph_bytes(model, capture, len(lengths), width, heads) if capture.gradient is not None else 0,
    }


def graph_bytes(model: LoadedModel, capture: Capture, rows: int, width: int, heads: int) -> int:
    """An upper estimate of what autograd keeps for the backward pass of ``rows`` padded to ``width`` tokens: per
    token and block, ``GRAPH_PER_D`` numbers per stream dimension and ``GRAPH_PER_MLP`` per MLP unit a token runs
    through (a mixture of experts': each of the experts it is routed to), and under eager attention (a point inside
    attention read) each head's pattern."""
    config = model.ref.config or {}
    per = DTYPE_BYTES.get(model.dtype, 4)
    d = model.hidden_size
    mlp = next((v for k in MLP_WIDTH if isinstance(v := config.get(k), int) and v > 0), 4 * d)
    routed = config.get("num_experts_per_tok")
    if isinstance(routed, int) and routed > 0:
        expert = config.get("moe_intermediate_size")
        mlp = max(mlp, routed * (expert if isinstance(expert, int) and expert > 0 else mlp))
    blocks = model.num_layers
    graph = rows * width * blocks * (GRAPH_PER_D * d + GRAPH_PER_MLP * mlp) * per
    if not model.attention_sites.isdisjoint(capture.sites):
        graph += GRAPH_PATTERNS * rows * blocks * heads * width * width * per
    return graph


def check_capture(
    model: LoadedModel,
    batch: Batch,
    capture: Capture,
    limit: int,
    field: str,
    count: int,
    smaller: Callable[[int], tuple[Batch, Capture]],
    unit: str,
    text: str,
) -> dict[str, int]:
    """``capture_bytes``, refused (422 ``CaptureTooLarge``) over ``limit`` bytes (0: no bound), naming ``field``, of
    ``count`` ``unit``: ``smaller(n)`` is the request with n of them, and the answer's ``allowed`` the most that fit
    (``sites`` where even one is too many; ``text``, the field holding the text, where even none is: a gradient's
    graph grows with the text alone)."""
    parts = capture_bytes(model, batch, capture)
    total = sum(parts.values())
    if not limit or total <= limit:
        return parts
    low, high = 0, count - 1  # the most that fit lies in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if sum(capture_bytes(model, *smaller(mid)).values()) <= limit:
            low = mid
        else:
            high = mid - 1
    if low < 1 and sum(capture_bytes(model, batch, attrs.evolve(capture, layers=(), sites=())).values()) > limit:
        field, allowed = text, "a shorter text"
    elif low < 1:
        field, allowed = "sites", "fewer sites or components, or a shorter text"
    else:
        allowed = f"at most {low} {unit} with these sites"
    raise CaptureTooLarge(
        f"{field}: the tensors this request captures would take about {total / 2**20:.1f} MiB, over this server's "
        f"max_capture_mb of {limit / 2**20:g}; ask for fewer {unit}, fewer sites or a shorter text",
        field=field,
        allowed=allowed,
        estimate_bytes=total,
        limit_bytes=limit,
        parts=parts,
    )
