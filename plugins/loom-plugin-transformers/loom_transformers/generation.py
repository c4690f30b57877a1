"""Continuous batching: a model's running generation, which rows join (a prefill pass) and leave (finished) at
step boundaries, over one left-padded KV cache.

Every row keeps its own parameters, generator, stop rule, capture, log-probabilities and stream. Rows are right
aligned in the cache: each pass appends one column to every row, a joining row's prefill cache is padded on the
left to the running width (or the running rows' to its), and a row that leaves is cut out of the batch; columns
that no row attends to any more are dropped. Each row's position ids count its own tokens, and the attention mask
hides every pad, so a row computes what it would alone.

A row whose last token is chosen needs one more pass for that token's own states (and attention): it rides along
with the next step of the others, then leaves. With ``Capture.stream_states`` a token's event waits for the pass
that feeds it, which is what computes its states: events then trail the tokens by one step.

A cache of another kind than transformers' ``DynamicCache`` of plain layers (sliding windows, quantized caches)
cannot be padded and joined: such a model's rows join only an empty batch (``Decoder.joinable``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs

from loom_kernel import (
    Batch,
    Capture,
    GenerationParams,
    Intervention,
    InvalidField,
    LoadedModel,
    LoomError,
    SequenceOutput,
    Unsupported,
)
from loom_transformers.architectures import recurrent
from loom_transformers.attention import LOOM, AttentionRecorder, eager_attention
from loom_transformers.running import (
    NonFiniteLogits,
    _blocks,
    _budget,
    _device,
    _inputs,
    _pad,
    _position_offset,
    _step_kwargs,
    choose_token,
    cut_at_stop,
    eos_ids,
    recorded,
    streamable,
)
from loom_transformers.sites import Layout, SiteHooks, keyed_fill


@attrs.define(eq=False)
class Row:
    id: int
    slot: int  # the row's number in the batch it joined with (its on_token's row)
    prompt: list[int]
    params: GenerationParams
    budget: int
    generator: Any
    capture: Capture
    on_token: Any
    stop_ids: set[int]
    edits: tuple[Intervention, ...] = ()
    truncated: bool = False
    generated: list[int] = attrs.field(factory=list)
    text: str = ""
    emitted: str = ""
    finish: str | None = None
    complete: bool = False
    fed: int = 0  # tokens of this row the model has seen (its real key columns are the last ``fed``)
    states: dict[int | str, list[Any]] = attrs.field(factory=dict)  # by layer index, and by site name
    attn: dict[int, list[Any]] = attrs.field(factory=dict)
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    logits: list[Any] = attrs.field(factory=list)
    held: tuple[int, str, dict[str, Any]] | None = None
    error: LoomError | None = None  # what ended the row instead of a finish (its call fails with it)

    @property
    def keep_last(self) -> bool:
        return self.capture.positions == "last"

    @property
    def final_pass(self) -> bool:
        """Whether the last token needs a pass of its own: only when something of it is kept."""
        return self.capture.wants_states or bool(self.capture.attention_layers)


def _generator(seed: int | None) -> Any:
    import torch

    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


def _logprob_entry(logits: Any, token: int, k: int) -> dict[str, Any]:
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    entry: dict[str, Any] = {"token_id": token, "logprob": float(lp[token]), "top": []}
    if k:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        entry["top"] = [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return entry


class Decoder:
    """The running generation of one model (all of its rows capture attention, or none do: attention switches the
    model to eager attention for a whole pass). ``join`` prefills a batch's prompts and returns their row ids,
    ``step`` runs one decoding step of every running row; finished rows' outputs wait in ``done``."""

    def __init__(self, model: LoadedModel, attention: bool = False) -> None:
        self.model, self.attention = model, attention
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, columns]: 1 for a row's real tokens, 0 for pads
        self.done: dict[int, SequenceOutput] = {}
        self.plain_cache = True  # whether the caches seen so far can be padded and joined
        self._ids = 0
        net = model.model
        if "step_kwargs" not in model.extra:
            model.extra["step_kwargs"] = _step_kwargs(net)
        if "causal_position_offset" not in model.extra:
            model.extra["causal_position_offset"] = _position_offset(net)
            model.extra["recurrent"] = recurrent(net.config)

    @property
    def busy(self) -> bool:
        return bool(self.rows)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def joinable(self) -> bool:
        """Whether rows may join now: into an empty batch always, into a running one when its cache can be
        padded."""
        return not self.rows or self.plain_cache

    def join(self, batch: Batch, capture: Capture) -> list[int]:
        """Prefill ``batch``'s prompts and add them to the running rows; InvalidField (naming the ``row``) for a
        prompt refused before any pass."""
        import torch

        inputs, truncated = _inputs(self.model, batch)
        if capture.wanted:
            _blocks(self.model)
        rows = []
        stop_ids = eos_ids(self.model)
        for i, ids in enumerate(inputs):
            params = batch.params(i)
            row = Row(
                id=self._ids,
                slot=i,
                prompt=list(ids),
                params=params,
                budget=_budget(self.model, len(ids), params),
                generator=_generator(params.seed),
                capture=capture,
                on_token=batch.on_token,
                stop_ids=stop_ids,
                edits=batch.edits(i),
                truncated=truncated[i],
            )
            if row.budget <= 0:  # nothing may be generated: max_tokens 0, or the prompt fills the context
                row.finish = "length"
            self._ids += 1
            rows.append(row)
        ids_t, mask, _ = _pad(self.model, [r.prompt for r in rows], left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            cache = self._pass(rows, ids_t, mask, positions, None, [len(r.prompt) for r in rows])
        self._add(rows, cache, mask)
        self._collect()
        return [r.id for r in rows]

    def step(self) -> None:
        """One decoding step: every running row feeds its last token."""
        import torch

        device = _device(self.model)
        ids = torch.tensor([[r.generated[-1]] for r in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=device)], dim=1)
        positions = torch.tensor([[r.fed] for r in self.rows], device=device)
        with torch.inference_mode():
            self.cache = self._pass(self.rows, ids, self.mask, positions, self.cache, [1] * len(self.rows))
        self._collect()

    def close(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    # -- passes ------------------------------------------------------------------------------------------------

    def _pass(self, rows: list[Row], ids: Any, mask: Any, positions: Any, cache: Any, fresh: list[int]) -> Any:
        """One pass of ``rows`` (their new tokens ``ids``); files each row's states and advances it. The cache."""
        model = self.model
        cache_arg, extra = model.extra["step_kwargs"]
        offset = model.extra["causal_position_offset"]
        kwargs: dict[str, Any] = {cache_arg: cache, **extra}
        if not bool(mask.all()):  # unpadded rows: the model's own causal path is faster than an explicit mask
            # A recurrent model (Mamba) keeps its pads out of its state; it takes the mask of the new columns only.
            kwargs["attention_mask"] = mask[:, -ids.shape[1] :] if model.extra["recurrent"] else mask
            if offset is not None:
                kwargs["position_ids"] = positions + offset
        # Hooks for this pass only: another decoder of the model (or a forward pass) runs between two steps.
        width = ids.shape[1]
        layout = [Layout(width - fresh[b], r.fed, fresh[b], len(r.prompt)) for b, r in enumerate(rows)]
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
        for b, row in enumerate(rows):
            row.fed += fresh[b]
            self._keep(row, b, fresh[b], taken_states, taken_attn)
            self._advance(row, out.logits[b, -1])
        return getattr(out, cache_arg)

    def _recorders(self, rows: list[Row], width: int) -> AttentionRecorder | None:
        """Hooks on the union of the attention weights ``rows`` capture."""
        attn_indices = sorted({s.index for r in rows for s in r.capture.attention_layers})
        if not attn_indices:
            return None
        attn = AttentionRecorder(self.model.model, _blocks(self.model), attn_indices)
        attn.rows = [-1] if width > 1 and all(r.keep_last for r in rows) else None
        return attn

    def _keep(self, row: Row, b: int, fresh: int, states: dict[int, Any], attn: dict[int, Any]) -> None:
        """File this pass's rows of states and attention under ``row`` (its real columns are the rightmost)."""
        for index in [*row.capture.indices, *row.capture.sites] if row.capture.wants_states else ():
            t = states[index]
            part = t[b, -min(fresh, t.shape[1]) :]
            if keyed_fill(self.model, index) is not None:  # scores, pattern: the row's keys so far
                part = part[..., t.shape[-1] - row.fed :]
            part = part.clone()
            row.states[index] = [part] if row.keep_last else [*row.states.get(index, []), part]
        for sel in row.capture.attention_layers:
            a = attn[sel.index]
            part = a[b, :, -min(fresh, a.shape[2]) :, a.shape[3] - row.fed :].clone()
            row.attn[sel.index] = [part] if row.keep_last else [*row.attn.get(sel.index, []), part]

    # -- joining and leaving -------------------------------------------------------------------------------------

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

    def _collect(self) -> None:
        """Finished rows leave: their outputs to ``done``, their rows out of the cache and the mask."""
        import torch

        keep = [i for i, r in enumerate(self.rows) if not r.complete]
        if len(keep) == len(self.rows):
            return
        for row in self.rows:
            if row.complete:
                self.done[row.id] = self._output(row)
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        if not self.plain_cache:  # its layers keep columns their own way: only the rows go
            self.cache.batch_select_indices(index)
            return
        first = int((self.mask.sum(0) > 0).nonzero()[0])  # columns before it are pads of every row left
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]

    # -- tokens --------------------------------------------------------------------------------------------------

    def _emit(self, row: Row, token: int, piece: str, extras: dict[str, Any]) -> None:
        if row.on_token is None:
            return
        result = row.on_token(row.slot, token, piece, extras)
        if row.finish is None and (result is False or isinstance(result, str)):
            row.finish = result or "stop"  # a string is the finish reason (a stop rule's "probe")

    def _advance(self, row: Row, logits: Any) -> None:
        """After a pass that fed ``row``: release its held event, then choose its next token or complete it."""
        if row.held is not None:
            token, piece, extras = row.held
            row.held = None
            extras["states"] = {key: row.states[at][-1][-1:] for key, at in _keys(row.capture)}
            self._emit(row, token, piece, extras)
        if row.finish is not None:
            row.complete = True
            return
        try:
            token = choose_token(logits, row.params, row.generator)
        except NonFiniteLogits as exc:  # this row fails alone; the batch runs on
            row.error, row.finish, row.complete = non_finite(row, exc), "error", True
            return
        row.generated.append(token)
        extras: dict[str, Any] = {}
        if row.capture.top_logprobs is not None:
            entry = _logprob_entry(logits, token, row.capture.top_logprobs)
            row.logprobs.append(entry)
            extras["logprob"] = entry
        if row.capture.logits:
            row.logits.append(logits.float().cpu())
        tok = self.model.tokenizer
        row.text = tok.decode(row.generated, skip_special_tokens=True)
        if token in row.stop_ids:
            row.finish = "stop"
        if row.params.stop:
            row.text, hit = cut_at_stop(row.text, row.params.stop)
            if hit:
                row.finish = "stop"
        if row.finish is None and len(row.generated) >= row.budget:
            row.finish = "length"
        piece = ""
        if row.on_token is not None:
            safe = row.text if row.finish else streamable(row.text, row.params.stop)
            if len(safe) > len(row.emitted):
                piece, row.emitted = safe[len(row.emitted) :], safe
        if row.capture.stream_states and row.capture.wants_states:
            row.held = (token, piece, extras)  # its states come with the next pass
        else:
            self._emit(row, token, piece, extras)
        if row.finish is not None and not row.final_pass:
            row.complete = True

    def _output(self, row: Row) -> SequenceOutput | LoomError:
        import torch

        if row.error is not None:
            return row.error
        total = len(row.prompt) + len(row.generated)
        states = {}
        attentions = {}
        if row.capture.wants_states:
            for key, at in _keys(row.capture):
                fill = keyed_fill(self.model, at)
                chunks = row.states[at] if fill is None else [_pad_keys(c, total, fill) for c in row.states[at]]
                states[key] = torch.cat(chunks, dim=0)
        for sel in row.capture.attention_layers:
            chunks = row.attn[sel.index]
            heads = chunks[0].shape[0]
            full = torch.zeros((heads, sum(c.shape[1] for c in chunks), total), dtype=chunks[0].dtype)
            at = 0
            for c in chunks:  # each step's queries see the keys so far; later keys stay zero (causal)
                full[:, at : at + c.shape[1], : c.shape[2]] = c
                at += c.shape[1]
            attentions[sel.key] = full
        return SequenceOutput(
            token_ids=[*row.prompt, *row.generated],
            prompt_tokens=len(row.prompt),
            text=row.text,
            finish_reason=row.finish,
            positions=row.capture.kept_positions(total) if row.final_pass else [],
            states=states,
            attentions=attentions,
            logprobs=row.logprobs,
            logits=torch.stack(row.logits) if row.logits else None,
            truncated=row.truncated,
        )


def generate_whole(model: LoadedModel, batch: Batch, capture: Capture) -> list[SequenceOutput]:
    """Every row of ``batch`` generated to its end, alone in a decoder of its own."""
    decoder = Decoder(model, attention=bool(capture.attention_layers))
    ids = decoder.join(batch, capture)
    while decoder.busy:
        decoder.step()
    rows = [decoder.done.pop(i) for i in ids]
    for row in rows:
        if isinstance(row, LoomError):
            raise row
    return rows  # type: ignore[return-value]


def non_finite(row: Row, exc: NonFiniteLogits) -> LoomError:
    """The error a row whose logits are not finite fails with: its edits' fault when it has any."""
    where = f"the logits of generated token {len(row.generated)} are {exc.args[0]} (not finite)"
    if row.edits:
        return InvalidField(
            f"interventions: {where}: the edits push the model's activations out of floating-point range; "
            "use a smaller scale or vector",
            field="interventions",
            allowed="edits that keep the activations finite",
        )
    return Unsupported(
        f"model: {where}: the model's activations overflow in its dtype; load it as float32", field="model"
    )


def _keys(capture: Capture) -> list[tuple[str, int | str]]:
    """(answer key, where the row keeps it) for every layer and site ``capture`` asks for."""
    return [(sel.key, sel.index) for sel in capture.layers] + [(name, name) for name in capture.sites]


def _pad_keys(t: Any, total: int, fill: float) -> Any:
    """A keyed point's rows [P, heads, keys so far] to ``total`` key positions; the later ones hold ``fill``."""
    import torch

    out = torch.full((*t.shape[:-1], total), fill, dtype=t.dtype)
    out[..., : t.shape[-1]] = t
    return out


def _left_pad(t: Any, width: int, dim: int) -> Any:
    """``t`` padded with zeros on the left of ``dim`` to ``width``."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)
