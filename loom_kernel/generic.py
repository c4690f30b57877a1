"""The kernel's runner for a model whose loader declares its parts (``ModelParts``) and no runner of its own: a new
architecture gets capture and edits at hidden-state indices, the logit lens and, when causal, generation through
the scheduler (continuous batching, streams, ``n``, stop strings, log-probabilities) without writing any of it.

It runs each row alone and, generating, feeds each row its whole sequence every step (no KV cache: a model's own
call on token ids is all it is given), so it suits the small models a new architecture starts with; a loader that
wants speed brings its own ``runner`` and ``decoder``. Index ``i`` is block ``i``'s input, ``N`` the final norm's
output (the last block's, without one); an edit at an index changes that state on its way on, and the state it
reports is the edited one.
"""

from __future__ import annotations

from typing import Any

import attrs

from loom_kernel.capture import StateRecorder
from loom_kernel.editing import Layout, row_edits
from loom_kernel.errors import InvalidField, Unsupported
from loom_kernel.inputs import batch_inputs, vocabulary_size
from loom_kernel.types import (
    Batch,
    Capture,
    ForwardOutput,
    Intervention,
    LoadedModel,
    RowInput,
    SequenceOutput,
    StepOutput,
)


def declared(model: LoadedModel) -> None:
    """Give ``model`` the kernel's runner (and decoder, and lens) when its loader declared parts and brought none."""
    import functools

    if model.parts is None:
        return
    if model.runner is None:
        model.runner = Runner(model)
    if model.can_generate and model.decoder is None:
        model.decoder = functools.partial(Decoder, model)
    if model.unembed is None and model.parts.lm_head is not None:
        model.unembed = functools.partial(unembed, model)
    if model.sites is None:
        model.sites = {}  # hidden-state indices only: no named hook points


@attrs.define(eq=False)
class Runner:
    model: LoadedModel

    def forward(self, batch: Batch, capture: Capture) -> ForwardOutput:
        if batch.generation is not None and not self.model.can_generate:
            raise Unsupported(f"model: {self.model.ref.id!r} has no LM head and cannot generate", field="model")
        if batch.generation is not None:
            from loom_kernel.batching import generate_whole

            return generate_whole(self.model, batch, capture)
        refuse_attention(capture)
        tok, model = self.model.tokenizer, self.model
        # A refused row names its ``row`` (a merged call's refused row fails its own request); a cut one says so.
        inputs, truncated = batch_inputs(
            batch,
            tokenize=lambda text: tok(text, add_special_tokens=batch.add_special_tokens)["input_ids"],
            vocab_size=vocabulary_size(model),
            max_context=model.max_context,
        )
        rows = []
        for i, ids in enumerate(inputs):
            try:
                _, states = run(model, ids, capture, batch.edits(i), len(ids), last_only=False)
            except IndexError as exc:  # a lookup past a table: an id its embedding lacks (no vocabulary declared)
                field = "token_ids" if batch.token_ids is not None else "text"
                raise InvalidField(
                    f"{field}: the model's pass indexed past one of its tables ({exc}): an id outside its vocabulary?",
                    field=field,
                    allowed="the model's own token ids",
                    **({"row": i} if len(inputs) > 1 else {}),
                ) from None
            positions = capture.kept_positions(len(ids))
            rows.append(
                SequenceOutput(
                    token_ids=ids,
                    prompt_tokens=len(ids),
                    positions=positions,
                    states={sel.key: states[sel.index][positions] for sel in capture.layers if capture.wants_states},
                    truncated=truncated[i],
                )
            )
        return ForwardOutput(rows=rows)


@attrs.define(eq=False)
class _Row:
    ids: list[int]
    prompt: int
    capture: Capture
    edits: tuple[Intervention, ...]


class Decoder:
    """The running rows of a model with declared parts: each step feeds each row its whole sequence."""

    def __init__(self, model: LoadedModel, attention: bool = False) -> None:
        self.model = model
        self.rows: dict[int, _Row] = {}

    @property
    def joinable(self) -> bool:
        return True

    def prefill(self, inputs: list[RowInput]) -> StepOutput:
        for spec in inputs:
            refuse_attention(spec.capture)
            self.rows[spec.id] = _Row(list(spec.prompt), len(spec.prompt), spec.capture, spec.edits)
        return self._pass([spec.id for spec in inputs], last_only=False)

    def step(self, feed: dict[int, int]) -> StepOutput:
        for i, token in feed.items():
            self.rows[i].ids.append(token)
        return self._pass(list(feed), last_only=True)

    def release(self, ids: list[int]) -> None:
        for i in ids:
            self.rows.pop(i, None)

    def close(self) -> None:
        self.rows.clear()

    def _pass(self, ids: list[int], last_only: bool) -> StepOutput:
        import torch

        out = StepOutput(ids=ids, logits=None)
        logits = []
        for i in ids:
            row = self.rows[i]
            keep_last = last_only or row.capture.positions == "last"
            row_logits, states = run(self.model, row.ids, row.capture, row.edits, row.prompt, last_only=keep_last)
            logits.append(row_logits[0, -1])
            out.states[i] = dict(states)
        out.logits = torch.stack(logits)
        return out


def run(
    model: LoadedModel, ids: list[int], capture: Capture, edits: tuple[Intervention, ...], prompt: int, last_only: bool
) -> tuple[Any, dict[int, Any]]:
    """One row through the model: its output, and the states of ``capture``'s indices ([T, H], or the last row only),
    its ``edits`` applied where they point."""
    import torch

    parts = model.parts
    assert parts is not None
    wanted = sorted({sel.index for sel in capture.layers}) if capture.wants_states else []
    edit = row_edits([edits], [Layout(col=0, tok=0, count=len(ids), prompt=prompt)])
    final = parts.final_norm if parts.final_norm is not None else parts.blocks[-1]
    recorder = StateRecorder(model.model, parts.blocks, wanted, final, edit, [int(e.site) for e in edits])
    recorder.rows = [-1] if last_only else None
    with recorder, torch.inference_mode():
        out = model.model(torch.tensor([ids], device=_device(model)))
    return out, {index: t[0].float() for index, t in recorder.taken().items()}


def unembed(model: LoadedModel, states: Any, normalized: bool) -> Any:
    """The logit lens: the model's own final norm (unless ``normalized``) and LM head, on CPU states [P, H]."""
    import torch

    parts = model.parts
    assert parts is not None and parts.lm_head is not None
    # The modules' own ``forward``, not their call: a stream's lens runs on the output processor's thread while a
    # pass on the model's thread may have its hooks (edits, recording) on these very modules.
    with torch.inference_mode():
        x = states.to(_device(model), next(parts.lm_head.parameters()).dtype)
        if not normalized and parts.final_norm is not None:
            x = parts.final_norm.forward(x)
        return parts.lm_head.forward(x).float().cpu()


def refuse_attention(capture: Capture) -> None:
    if capture.attention:
        raise Unsupported(
            "return_attention: a model run from its declared parts gives no attention weights", field="return_attention"
        )


def _device(model: LoadedModel) -> Any:
    return next(model.model.parameters()).device
