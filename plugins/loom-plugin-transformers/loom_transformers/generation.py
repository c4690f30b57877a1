"""Continuous batching, the loader's side (``loom_kernel.Decoder``): a model's running batch of generated rows over
one left-padded KV cache, which rows join (a prefill pass) and leave (released) at step boundaries. The kernel picks
every token and decides when a row is done; this runs the passes and hands back each row's logits and captured
states (``StepOutput``).

Rows are right aligned in the cache: each pass appends one column to every row, a joining row's prefill cache is
padded on the left to the running width (or the running rows' to its), and a released row is cut out of the batch;
columns that no row attends to any more are dropped. Each row's position ids count its own tokens, and the
attention mask hides every pad, so a row computes what it would alone.

A cache of another kind than transformers' ``DynamicCache`` of plain layers (sliding windows, quantized caches)
cannot be padded and joined: such a model's rows join only an empty batch (``joinable``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs

from loom_kernel import Capture, Intervention, Layout, LoadedModel, RowInput, StepOutput
from loom_transformers.architectures import recurrent
from loom_transformers.attention import LOOM, AttentionRecorder, eager_attention
from loom_transformers.running import _blocks, _device, _pad, _position_offset, _step_kwargs, recorded
from loom_transformers.sites import SiteHooks, keyed_fill


@attrs.define(eq=False)
class Row:
    id: int
    prompt: int  # its prompt's token count
    capture: Capture
    edits: tuple[Intervention, ...] = ()
    fed: int = 0  # tokens of this row the model has seen (its real key columns are the last ``fed``)

    @property
    def keep_last(self) -> bool:
        return self.capture.positions == "last"


class Decoder:
    """The running batch of one model (all of its rows capture attention, or none do: attention switches the model
    to eager attention for a whole pass)."""

    def __init__(self, model: LoadedModel, attention: bool = False) -> None:
        self.model, self.attention = model, attention
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, columns]: 1 for a row's real tokens, 0 for pads
        self.plain_cache = True  # whether the caches seen so far can be padded and joined
        net = model.model
        if "step_kwargs" not in model.extra:
            model.extra["step_kwargs"] = _step_kwargs(net)
        if "causal_position_offset" not in model.extra:
            model.extra["causal_position_offset"] = _position_offset(net)
            model.extra["recurrent"] = recurrent(net.config)

    @property
    def joinable(self) -> bool:
        """Whether rows may join now: into an empty batch always, into a running one when its cache can be
        padded."""
        return not self.rows or self.plain_cache

    def prefill(self, inputs: list[RowInput]) -> StepOutput:
        """Feed ``inputs`` their prompts (one pass over just them) and add them to the running rows."""
        import torch

        rows = [Row(id=r.id, prompt=len(r.prompt), capture=r.capture, edits=r.edits) for r in inputs]
        if any(r.capture.wanted for r in rows):
            _blocks(self.model)
        ids, mask, _ = _pad(self.model, [r.prompt for r in inputs], left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out, cache = self._pass(rows, ids, mask, positions, None, [r.prompt for r in rows])
        self._add(rows, cache, mask)
        return out

    def step(self, feed: dict[int, int]) -> StepOutput:
        """Every running row fed its next token (row id -> token)."""
        import torch

        device = _device(self.model)
        ids = torch.tensor([[feed[r.id]] for r in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=device)], dim=1)
        positions = torch.tensor([[r.fed] for r in self.rows], device=device)
        with torch.inference_mode():
            out, self.cache = self._pass(self.rows, ids, self.mask, positions, self.cache, [1] * len(self.rows))
        return out

    def release(self, ids: list[int]) -> None:
        """Rows leave: out of the cache and the mask."""
        import torch

        gone = set(ids)
        keep = [i for i, r in enumerate(self.rows) if r.id not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        if not self.plain_cache:  # its layers keep columns their own way: only the rows go
            _select_rows(self.cache, index)
            return
        first = self.mask.shape[1] - max(r.fed for r in self.rows)  # columns before it are pads of every row left
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]

    def close(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    # -- passes ------------------------------------------------------------------------------------------------

    def _pass(
        self, rows: list[Row], ids: Any, mask: Any, positions: Any, cache: Any, fresh: list[int]
    ) -> tuple[StepOutput, Any]:
        """One pass of ``rows`` (their new tokens ``ids``): what it gives each row, and the cache."""
        model = self.model
        cache_arg, extra = model.extra["step_kwargs"]
        offset = model.extra["causal_position_offset"]
        kwargs: dict[str, Any] = {cache_arg: cache, **extra}
        # Whether any row has pads, from the rows' own counts (right aligned: a row fills the width or has pads on
        # its left): reading the mask would make the host wait for the device every step.
        padded = any(r.fed + fresh[b] != mask.shape[1] for b, r in enumerate(rows))
        if padded:  # unpadded rows: the model's own causal path is faster than an explicit mask
            # A recurrent model (Mamba) keeps its pads out of its state; it takes the mask of the new columns only.
            kwargs["attention_mask"] = mask[:, -ids.shape[1] :] if model.extra["recurrent"] else mask
            if offset is not None:
                kwargs["position_ids"] = positions + offset
        # Hooks for this pass only: another decoder of the model (or a forward pass) runs between two steps.
        width = ids.shape[1]
        layout = [Layout(width - fresh[b], r.fed, fresh[b], r.prompt) for b, r in enumerate(rows)]
        record = list(dict.fromkeys(k for r in rows for k in recorded(r.capture)))
        sites = (
            SiteHooks(model, [r.edits for r in rows], layout, record) if record or any(r.edits for r in rows) else None
        )
        attn = self._recorders(rows, width)
        if sites is not None:  # a long prefill keeps only its last column when no row needs more
            sites.rows = [-1] if width > 1 and all(r.keep_last for r in rows) else None
        if sites is not None and sites.attention:
            implementation = eager_attention(model.model, LOOM, "hidden_state_layers")
        else:
            implementation = eager_attention(model.model) if self.attention else contextlib.nullcontext()
        try:
            with implementation:
                out = model.model(input_ids=ids, use_cache=True, **kwargs)
            taken_states = sites.kept if sites is not None else {}
            taken_attn = attn.latest if attn is not None else {}
        finally:
            for rec in (sites, attn):
                if rec is not None:
                    rec.close()
        step = StepOutput(ids=[r.id for r in rows], logits=out.logits[:, -1])
        for b, row in enumerate(rows):
            row.fed += fresh[b]
            step.states[row.id], step.attentions[row.id] = self._taken(row, b, fresh[b], taken_states, taken_attn)
        step.fills = {k: fill for k in record if (fill := keyed_fill(model, k)) is not None}
        return step, getattr(out, cache_arg)

    def _recorders(self, rows: list[Row], width: int) -> AttentionRecorder | None:
        """Hooks on the union of the attention weights ``rows`` capture."""
        attn_indices = sorted({s.index for r in rows for s in r.capture.attention_layers})
        if not attn_indices:
            return None
        attn = AttentionRecorder(self.model.model, _blocks(self.model), attn_indices)
        attn.rows = [-1] if width > 1 and all(r.keep_last for r in rows) else None
        return attn

    def _taken(
        self, row: Row, b: int, fresh: int, states: dict[int | str, Any], attn: dict[int, Any]
    ) -> tuple[dict[int | str, Any], dict[int, Any]]:
        """This pass's rows of states and attention for ``row`` (its real columns are the rightmost)."""
        mine: dict[int | str, Any] = {}
        for key in recorded(row.capture):
            t = states[key]
            part = t[b, -min(fresh, t.shape[1]) :]
            if (fill := keyed_fill(self.model, key)) is not None:  # scores, pattern: the row's keys so far
                mine[key] = _row_keys(part, row.fed, fill)
            else:
                mine[key] = part.clone()
        weights = {}
        for sel in row.capture.attention_layers:
            a = attn[sel.index]
            weights[sel.index] = _row_keys(a[b, :, -min(fresh, a.shape[2]) :], row.fed, 0.0)
        return mine, weights

    # -- joining -------------------------------------------------------------------------------------------------

    def _add(self, rows: list[Row], cache: Any, mask: Any) -> None:
        """The prefilled ``rows`` (their ``cache`` and ``mask``) appended to the running batch, right aligned."""
        import torch

        from loom_transformers.cache import plain, roomy

        self.plain_cache = self.plain_cache and plain(cache)
        if not self.rows:  # the prefill's cache becomes the running one; else its tensors join the running layers
            self.rows, self.cache, self.mask = list(rows), roomy(cache) if self.plain_cache else cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)], dim=0)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)], dim=0)
        self.rows.extend(rows)


def _row_keys(part: Any, fed: int, fill: float) -> Any:
    """A row's copy of a keyed tensor (scores, pattern, attention weights) over its ``fed`` keys so far.

    The pass's key columns are right aligned, the row's own the last of them; a sliding-window cache holds only the
    last window of keys, so there may be fewer columns than the row's keys: those are the latest, and the earlier
    keys (out of the window, which no query sees) hold ``fill``, what a masked key holds in a full pass."""
    keys = part.shape[-1]
    if keys >= fed:
        return part[..., keys - fed :].clone()
    out = part.new_full((*part.shape[:-1], fed), fill)
    out[..., fed - keys :] = part
    return out


def _select_rows(cache: Any, index: Any) -> None:
    """Only the rows ``index`` of every layer of ``cache`` kept. A recurrent layer (Mamba's
    ``LinearAttentionLayer``) has no ``batch_select_indices``; its ``reorder_cache`` (beam search's row gather)
    selects the same rows of its conv and recurrent states."""
    for layer in cache.layers:
        select = getattr(layer, "batch_select_indices", None)
        if select is not None:
            select(index)
        else:
            layer.reorder_cache(index)


def _left_pad(t: Any, width: int, dim: int) -> Any:
    """``t`` padded with zeros on the left of ``dim`` to ``width``."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
