"""Batched KV-cached generation: left padding, one generator and one stop rule per row, and the states, attention
weights and log-probabilities captured in the same passes that generate.

Each step feeds every unfinished row its last token (the first step feeds the left-padded prompts) with explicit
position ids, so that a padded row computes what it would alone. A row whose last token is chosen needs one more
pass for that token's own states and attention; it rides along with the next step of the others (or runs as the
final step), then feeds pads under a zero mask until the batch is done.

With ``Capture.stream_states`` a token's event waits for the pass that feeds it, which is what computes its states:
events then trail the tokens by one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from loom_kernel import Capture, GenerationParams, LoadedModel, SequenceOutput
from loom_transformers.attention import AttentionRecorder, eager_attention
from loom_transformers.running import (
    _device,
    _pad,
    _position_offset,
    _positions,
    _recorder,
    _step_kwargs,
    choose_token,
    cut_at_stop,
    eos_ids,
    pad_id,
    streamable,
)


@attrs.define(eq=False)
class Row:
    slot: int
    prompt: list[int]
    params: GenerationParams
    budget: int
    generator: Any
    generated: list[int] = attrs.field(factory=list)
    text: str = ""
    emitted: str = ""
    finish: str | None = None
    complete: bool = False
    fed: int = 0  # tokens of this row the model has seen (its real key columns are the last ``fed``)
    states: dict[int, list[Any]] = attrs.field(factory=dict)
    attn: dict[int, list[Any]] = attrs.field(factory=dict)
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    logits: list[Any] = attrs.field(factory=list)
    held: tuple[int, str, dict[str, Any]] | None = None


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


class Generation:
    """One batched generation (one GenerationParams per prompt); ``run()`` returns a SequenceOutput per prompt."""

    def __init__(
        self,
        model: LoadedModel,
        prompts: Sequence[list[int]],
        params: Sequence[GenerationParams],
        budgets: Sequence[int],
        capture: Capture,
        on_token: Any,
    ) -> None:
        self.model, self.capture, self.on_token = model, capture, on_token
        self.tok = model.tokenizer
        self.stop_ids = eos_ids(model)
        self.rows = [
            Row(slot=i, prompt=list(p), params=rp, budget=b, generator=_generator(rp.seed))
            for i, (p, rp, b) in enumerate(zip(prompts, params, budgets, strict=True))
        ]
        for row in self.rows:
            if row.budget <= 0:  # nothing may be generated: max_tokens 0, or the prompt fills the context
                row.finish = "length"
        self.keep_last = capture.positions == "last"
        self.states = _recorder(model, capture) if capture.wants_states else None
        self.attention: AttentionRecorder | None = None
        if capture.attention_layers:
            _, blocks = model.extra["base"], model.extra["blocks"]
            self.attention = AttentionRecorder(model.model, blocks, sorted({s.index for s in capture.attention_layers}))
        # A row with a last token chosen needs one more pass for that token only when something of it is kept.
        self.final_pass = self.states is not None or self.attention is not None

    def run(self) -> list[SequenceOutput]:
        try:
            if self.attention is not None:
                with eager_attention(self.model.model):
                    self._loop()
            else:
                self._loop()
        finally:
            for rec in (self.states, self.attention):
                if rec is not None:
                    rec.close()
        return [self._output(row) for row in self.rows]

    def _loop(self) -> None:
        import torch

        model = self.model
        net = model.model
        if "step_kwargs" not in model.extra:
            model.extra["step_kwargs"] = _step_kwargs(net)
        cache_arg, extra = model.extra["step_kwargs"]
        if "causal_position_offset" not in model.extra:
            model.extra["causal_position_offset"] = _position_offset(net)
        offset = model.extra["causal_position_offset"]
        device = _device(model)
        pad = pad_id(model)
        ids, mask, _ = _pad(model, [r.prompt for r in self.rows], left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, full_mask, step_pos = ids, mask, positions
        padded = len(self.rows) > 1
        cache, first = None, True
        for rec in (self.states, self.attention):
            if rec is not None:
                rec.rows = [-1] if self.keep_last else None
        if self.states is not None:
            self.states.replace = True  # each step's rows are filed per row below; the recorder keeps one step
        while not all(r.complete for r in self.rows):
            kwargs: dict[str, Any] = {cache_arg: cache, **extra}
            if padded:  # one row has no padding: the model's own causal path is faster than an explicit mask
                kwargs["attention_mask"] = full_mask
                if offset is not None:
                    kwargs["position_ids"] = step_pos + offset
            out = net(input_ids=step_ids, use_cache=True, **kwargs)
            cache = getattr(out, cache_arg)
            taken_states = self.states.taken() if self.states is not None else {}
            taken_attn = self.attention.latest if self.attention is not None else {}
            for b, row in enumerate(self.rows):
                if row.complete:
                    continue
                fresh = len(row.prompt) if first else 1
                row.fed += fresh
                self._keep(row, b, fresh, taken_states, taken_attn)
                self._advance(row, out.logits[b, -1])
            # Next step: every unfinished row feeds its last token; finished rows feed a pad nobody attends to.
            live = [not r.complete for r in self.rows]
            step_ids = torch.tensor(
                [[r.generated[-1] if ok else pad] for r, ok in zip(self.rows, live, strict=True)], device=device
            )
            column = torch.tensor([[int(ok)] for ok in live], dtype=torch.long, device=device)
            full_mask = torch.cat([full_mask, column], dim=1)
            step_pos = step_pos[:, -1:] + 1
            first = False

    def _keep(self, row: Row, b: int, fresh: int, states: dict[int, Any], attn: dict[int, Any]) -> None:
        """File this step's rows of states and attention under ``row`` (its real columns are the rightmost)."""
        for index, t in states.items():
            part = t[b, -min(fresh, t.shape[1]) :]
            if self.keep_last:
                row.states[index] = [part]
            else:
                row.states.setdefault(index, []).append(part)
        for index, a in attn.items():
            part = a[b, :, -min(fresh, a.shape[2]) :, a.shape[3] - row.fed :]
            if self.keep_last:
                row.attn[index] = [part]
            else:
                row.attn.setdefault(index, []).append(part)

    def _emit(self, row: Row, token: int, piece: str, extras: dict[str, Any]) -> None:
        if self.on_token is None:
            return
        if self.on_token(row.slot, token, piece, extras) is False and row.finish is None:
            row.finish = "stop"

    def _advance(self, row: Row, logits: Any) -> None:
        """After a pass that fed ``row``: release its held event, then choose its next token or complete it."""
        if row.held is not None:
            token, piece, extras = row.held
            row.held = None
            extras["states"] = {sel.key: row.states[sel.index][-1][-1:] for sel in self.capture.layers}
            self._emit(row, token, piece, extras)
        if row.finish is not None:
            row.complete = True
            return
        token = choose_token(logits, row.params, row.generator)
        row.generated.append(token)
        extras: dict[str, Any] = {}
        if self.capture.top_logprobs is not None:
            entry = _logprob_entry(logits, token, self.capture.top_logprobs)
            row.logprobs.append(entry)
            extras["logprob"] = entry
        if self.capture.logits:
            row.logits.append(logits.float().cpu())
        row.text = self.tok.decode(row.generated, skip_special_tokens=True)
        if token in self.stop_ids:
            row.finish = "stop"
        if row.params.stop:
            row.text, hit = cut_at_stop(row.text, row.params.stop)
            if hit:
                row.finish = "stop"
        if row.finish is None and len(row.generated) >= row.budget:
            row.finish = "length"
        piece = ""
        if self.on_token is not None:
            safe = row.text if row.finish else streamable(row.text, row.params.stop)
            if len(safe) > len(row.emitted):
                piece, row.emitted = safe[len(row.emitted) :], safe
        if self.capture.stream_states and self.states is not None:
            row.held = (token, piece, extras)  # its states come with the next pass
        else:
            self._emit(row, token, piece, extras)
        if row.finish is not None and not self.final_pass:
            row.complete = True

    def _output(self, row: Row) -> SequenceOutput:
        import torch

        total = len(row.prompt) + len(row.generated)
        states = {}
        attentions = {}
        for sel in self.capture.layers:
            if self.states is not None:
                states[sel.key] = torch.cat(row.states[sel.index], dim=0)
        for sel in self.capture.attention_layers:
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
            positions=_positions(total, self.capture) if self.final_pass else [],
            states=states,
            attentions=attentions,
            logprobs=row.logprobs,
            logits=torch.stack(row.logits) if row.logits else None,
        )
