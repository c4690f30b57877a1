"""Forward passes and KV-cached generation with hook-based capture of the requested layers only.

Contract of ``run_batch`` (what the kernel receives in ``ForwardOutput.rows``, one per input row):

- ``token_ids`` is the final sequence (prompt + generated), ``prompt_tokens`` the prompt's length.
- ``positions`` is ``[total - 1]`` when ``capture.positions == "last"``, the listed positions and the last (in
  order) for a list of indices, else ``list(range(total))``; empty when no layer is asked for. Only those columns
  are kept while the pass runs (``kept_columns``), each row its own. ``states[key]`` is a CPU tensor
  [len(positions), H] in the model's dtype, keyed by ``LayerSel.key``; ``attentions[key]`` [heads,
  len(positions), total] under eager attention for the request (``attention.py``). The kernel slices "prompt",
  "generated" and index lists from the full rows.
- Generation (``generation.py``) runs rows in one left-padded KV-cached loop that rows join and leave at step
  boundaries; after a row's last token is chosen one more pass feeds it, so that the last token's state exists
  (only when states are asked for).
- Several rows without generation (/extract, /embed/batch) run as ONE padded forward pass with an attention
  mask, padded on the tokenizer's side; each row's states are sliced back to its own tokens, so a row equals
  running it alone within float tolerance.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from loom_kernel import (
    Batch,
    Capture,
    ForwardOutput,
    Gradient,
    Intervention,
    Layout,
    LoadedModel,
    SequenceOutput,
    batch_inputs,
    find_blocks,
    resolve_positions,
)
from loom_transformers.attention import LOOM, AttentionRecorder, eager_attention
from loom_transformers.sites import Site, SiteHooks, keyed_fill, site_map


def run_batch(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    """Rows without generation: one padded forward pass (generations: ``generation.Decoder``)."""
    import torch

    inputs, truncated = _inputs(model, batch)
    if capture.wanted or capture.logits:  # logits alone read index N too, on the base model ``_blocks`` finds
        _blocks(model)
    edits = [batch.edits(i) for i in range(len(inputs))]
    # Gradients (attribution patching) need autograd; every other pass runs without it.
    with torch.enable_grad() if capture.gradient is not None else torch.inference_mode():
        if capture.attention_layers:
            with eager_attention(model.model):
                rows = forward_many(model, inputs, capture, edits)
        else:
            rows = forward_many(model, inputs, capture, edits)
    for row, cut in zip(rows, truncated, strict=True):
        row.truncated = cut
    return ForwardOutput(rows=rows)


def _inputs(model: LoadedModel, batch: Batch) -> tuple[list[list[int]], list[bool]]:
    """Token ids per row, checked against the vocabulary and the context before any forward pass."""
    tok = model.tokenizer
    special = batch.add_special_tokens
    return batch_inputs(
        batch,
        tokenize=lambda text: tok(text, add_special_tokens=special)["input_ids"],
        vocab_size=model.model.get_input_embeddings().num_embeddings,
        max_context=model.max_context,
        # The tokenizer cuts the text and keeps its closing special tokens ([SEP], ...) where it adds them.
        cut_text=lambda text, limit: tok(text, add_special_tokens=special, truncation=True, max_length=limit)[
            "input_ids"
        ],
    )


def _blocks(model: LoadedModel) -> Any:
    if "blocks" not in model.extra:
        model.extra["base"], model.extra["blocks"] = find_blocks(model.model, model.num_layers)
    return model.extra["blocks"]


def recorded(capture: Capture) -> list[int | str]:
    """The layer indices and hook points a capture reads (each index is read at the point it aliases)."""
    return [*capture.indices, *capture.sites] if capture.wants_states else []


def _device(model: LoadedModel) -> Any:
    return model.model.get_input_embeddings().weight.device


def pad_id(model: LoadedModel) -> int:
    """The id padding uses: it only has to be a valid embedding row, since the mask keeps every real token from
    attending to it."""
    tok = model.tokenizer
    candidates = (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
    return int(next((v for v in candidates if v is not None), 0))


def _pad(model: LoadedModel, inputs: list[list[int]], left: bool | None = None) -> tuple[Any, Any, bool]:
    """(input_ids [B, T], attention_mask [B, T], left-padded?) on the model's device, padded on the tokenizer's side
    unless ``left`` says which."""
    import torch

    if left is None:
        left = getattr(model.tokenizer, "padding_side", "right") == "left"
    width = max(len(ids) for ids in inputs)
    ids = torch.full((len(inputs), width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, row in enumerate(inputs):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    device = _device(model)
    return ids.to(device), mask.to(device), left


def _position_offset(base: Any) -> int | None:
    """Where position ids start: 0, or padding_idx + 1 for RoBERTa-style learned positions; None: no such input."""
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return None
    for name, module in base.named_modules():
        if name.endswith("position_embeddings") and isinstance(getattr(module, "padding_idx", None), int):
            return module.padding_idx + 1
    return 0


def forward_many(
    model: LoadedModel, inputs: list[list[int]], capture: Capture, edits: Sequence[Sequence[Intervention]] = ()
) -> list[SequenceOutput]:
    """One pass of the base model over one row, or several rows padded on the tokenizer's side, each row with its
    own ``edits``; each row's states and attention are its own tokens only. ``capture.logits``: each row's logits at
    its positions (``capture.positions``), the LM head (``LoadedModel.unembed``) on index N, so that the head runs
    on the positions asked for only."""
    logits = capture.logits and model.unembed is not None
    if not capture.wanted and not logits:
        return [SequenceOutput(token_ids=list(ids), prompt_tokens=len(ids)) for ids in inputs]
    ids, mask, left = _pad(model, inputs)
    width = ids.shape[1]
    layout = [Layout(col=width - len(row) if left else 0, tok=0, count=len(row), prompt=len(row)) for row in inputs]
    n = model.num_layers
    grad = capture.gradient is not None
    record = list(dict.fromkeys([*recorded(capture), *([n] if logits else [])]))
    # With gradients, the embeddings' outputs are the graph's leaves (the parameters are frozen): registered before
    # the site hooks, so that every point downstream, hook_embed included, is in the graph.
    roots = _graph_roots(model) if grad else []
    sites = SiteHooks(model, edits, layout, record, grad=grad) if any(edits) or record else None
    att_idx = sorted({sel.index for sel in capture.attention_layers})
    attn = AttentionRecorder(model.model, _blocks(model), att_idx) if att_idx else None
    gradients: dict[int | str, Any] = {}
    try:
        kept = kept_columns(capture, inputs, width, left)
        for r in (attn, sites):
            if r is not None:
                r.rows = kept[1] if kept is not None else None
        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if left:
            # Left padding shifts every real token; without explicit ids the model would number pads first.
            base = model.extra["base"]
            if "position_offset" not in model.extra:
                model.extra["position_offset"] = _position_offset(base)
            if (offset := model.extra["position_offset"]) is not None:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0) + offset
        # With gradients the whole model runs (its head gives the metric: at the last column only, where every row
        # ends there); otherwise the base model, without a head.
        net = model.model if grad else model.extra["base"]
        ends = left or len({len(row) for row in inputs}) == 1
        if grad and ends:
            kwargs.update(_step_kwargs(model.model)[1])
        if sites is not None and sites.attention:
            with eager_attention(model.model, LOOM, "hidden_state_layers"):
                out = net(input_ids=ids, **kwargs)
        else:
            out = net(input_ids=ids, **kwargs)
        if grad and sites is not None:
            last = [-1] * len(inputs) if ends else [len(row) - 1 for row in inputs]
            gradients = sites.gradients(metric(out.logits[range(len(inputs)), last], capture.gradient))
        del out  # no graph outlives the pass
        taken = sites.kept if sites is not None else {}
        weights = attn.latest if attn is not None else {}
    finally:
        for r in (attn, sites):
            if r is not None:
                r.close()
        for handle in roots:
            handle.remove()
    rows = []
    for i, row in enumerate(inputs):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        queries = cols if kept is None else slice(0, len(kept[0][i]))
        head = None
        if logits and grad:  # at every position kept (``positions``): the metric's, the last, among them
            head = model.unembed(taken[n][i, queries], True)
        elif logits:
            at = (
                [len(row) - 1] if capture.positions == "last" else resolve_positions(capture.positions, *[len(row)] * 2)
            )
            if kept is not None:
                at = [kept[0][i].index(p) for p in at]
            head = model.unembed(taken[n][i, queries][at], True)
        rows.append(
            SequenceOutput(
                token_ids=list(row),
                prompt_tokens=len(row),
                logits=head,
                gradients={
                    **{sel.key: gradients[sel.index][i, queries].clone() for sel in capture.layers if gradients},
                    **{name: _row_keys(model, name, gradients[name][i, queries], cols) for name in capture.sites},
                }
                if grad
                else {},
                positions=(kept[0][i] if kept is not None else capture.kept_positions(len(row)))
                if capture.wanted
                else [],
                # A copy per row, so that no row keeps the whole padded batch alive.
                states={
                    **{sel.key: taken[sel.index][i, queries].clone() for sel in capture.layers if taken},
                    **{name: _row_keys(model, name, taken[name][i, queries], cols) for name in capture.sites},
                },
                attentions={
                    sel.key: weights[sel.index][i, :, queries, cols].clone() for sel in capture.attention_layers
                },
            )
        )
    return rows


def kept_columns(
    capture: Capture, inputs: list[list[int]], width: int, left: bool
) -> tuple[list[list[int]], Any] | None:
    """The positions each row keeps ("last": its last; a list: those listed and its last) and their columns in the
    padded pass, a LongTensor [B, k] (a row with fewer repeats its last); None: every column ("all", "prompt")."""
    import torch

    spec = capture.positions
    if spec != "last" and not isinstance(spec, list | tuple):
        return None
    kept = [
        [len(row) - 1] if spec == "last" else sorted({*resolve_positions(spec, len(row), len(row)), len(row) - 1})
        for row in inputs
    ]
    k = max(len(p) for p in kept)
    starts = [width - len(row) if left else 0 for row in inputs]
    columns = [[s + p for p in ps] + [s + ps[-1]] * (k - len(ps)) for s, ps in zip(starts, kept, strict=True)]
    if all(c == columns[0] for c in columns):  # the same columns in every row: plain indexing
        return kept, [c - width for c in columns[0]]
    return kept, torch.tensor(columns, dtype=torch.long)


def _graph_roots(model: LoadedModel) -> list[Any]:
    """Forward hooks making the token (and position) embeddings' outputs leaves that require gradients."""

    def root(module: Any, args: Any, output: Any) -> Any:
        return output.detach().requires_grad_()

    modules = [
        site.module for key in ("hook_embed", "hook_pos_embed") if isinstance(site := site_map(model).get(key), Site)
    ]
    return [m.register_forward_hook(root) for m in modules or [model.model.get_input_embeddings()]]


def metric(logits: Any, gradient: Gradient) -> Any:
    """The metric of each row's last-position logits [B, V], summed over the rows (which do not interact)."""
    import torch

    if gradient.metric == "logit_diff":
        good, bad = gradient.tokens
        return (logits[:, good] - logits[:, bad]).sum()
    return torch.log_softmax(logits.double(), dim=-1)[:, gradient.tokens[0]].sum()


def _row_keys(model: LoadedModel, name: str, t: Any, cols: slice) -> Any:
    """A row's copy of one point's states; a keyed point's (scores, pattern) over the row's own key columns."""
    return (t[..., cols] if keyed_fill(model, name) is not None else t).clone()


def eos_ids(model: LoadedModel) -> set[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer names."""
    out: set[int] = set()
    for source in (getattr(model.model, "generation_config", None), model.model.config, model.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, list | tuple | set):
            out.update(int(v) for v in value)
        elif value is not None:
            out.add(int(value))
    return out


def _step_kwargs(net: Any) -> tuple[str, dict[str, Any]]:
    """The KV-cache argument's name (``cache`` in transformers 5, ``past_key_values`` before) and extras.

    ``logits_to_keep=1`` spares the [T, vocab] logits of a long prompt when only the last row is sampled.
    """
    params = inspect.signature(net.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return cache_arg, extra
