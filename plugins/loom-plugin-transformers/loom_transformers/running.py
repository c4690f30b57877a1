"""Forward passes and KV-cached generation with hook-based capture of the requested layers only.

Positions are those of the final sequence (prompt + generated). After generation one more cached decode step
runs on the last generated token, so that the state of the last token of the final sequence exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from loom_kernel import Batch, Capture, ForwardOutput, GenerationParams, LoadedModel, SequenceOutput
from loom_kernel.capture import StateRecorder, find_blocks
from loom_kernel.errors import InvalidField


def run_batch(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput:
    import torch

    field = "prompt" if batch.generation is not None else "text"
    if batch.token_ids is not None:
        inputs = [list(ids) for ids in batch.token_ids]
    else:
        tok = model.tokenizer
        inputs = [tok(text, add_special_tokens=batch.add_special_tokens)["input_ids"] for text in batch.texts]
    rows = []
    with torch.inference_mode():
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidField(f"{field}: tokenizes to no tokens", field=field)
            if model.max_context and len(ids) > model.max_context:
                raise InvalidField(
                    f"{field}: {len(ids)} tokens exceed the model's context of {model.max_context}",
                    field=field,
                    allowed=f"at most {model.max_context} tokens",
                )
            params = batch.generation
            if params is None or params.max_tokens == 0:
                row = forward_once(model, ids, capture)
                if params is not None:
                    row.finish_reason = "length"
            else:
                row = generate_one(model, ids, params, capture, batch.on_token, i)
            rows.append(row)
    return ForwardOutput(rows=rows)


def _recorder(model: LoadedModel, capture: Capture) -> StateRecorder | None:
    if not capture.wanted:
        return None
    if "blocks" not in model.extra:
        model.extra["base"], model.extra["blocks"] = find_blocks(model.model, model.num_layers)
    rec = StateRecorder(model.extra["base"], model.extra["blocks"], capture.indices)
    last_only = capture.positions == "last"
    rec.rows, rec.replace = ([-1], True) if last_only else (None, False)
    return rec


def _states(rec: StateRecorder | None, capture: Capture) -> dict[str, Any]:
    if rec is None:
        return {}
    taken = rec.taken()
    return {sel.key: taken[sel.index][0] for sel in capture.layers}


def _positions(total: int, capture: Capture) -> list[int]:
    if not capture.wanted:
        return []
    return [total - 1] if capture.positions == "last" else list(range(total))


def _device(model: LoadedModel) -> Any:
    return model.model.get_input_embeddings().weight.device


def forward_once(model: LoadedModel, ids: list[int], capture: Capture) -> SequenceOutput:
    import torch

    rec = _recorder(model, capture)
    try:
        if rec is not None:
            base = model.extra["base"]
            base(input_ids=torch.tensor([ids], device=_device(model)), use_cache=False)
        return SequenceOutput(
            token_ids=list(ids),
            prompt_tokens=len(ids),
            positions=_positions(len(ids), capture),
            states=_states(rec, capture),
        )
    finally:
        if rec is not None:
            rec.close()


def eos_ids(model: LoadedModel) -> set[int]:
    for source in (getattr(model.model, "generation_config", None), model.model.config, model.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return set(value) if isinstance(value, list | tuple) else {int(value)}
    return set()


def _cache_kwarg(model: Any) -> str:
    """transformers 5 calls the KV cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def choose_token(logits: Any, params: GenerationParams, generator: Any) -> int:
    import torch

    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = torch.cumsum(probs, dim=-1) - probs > params.top_p
        logits = logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def generate_one(
    model: LoadedModel, ids: list[int], params: GenerationParams, capture: Capture, on_token: Any, row: int
) -> SequenceOutput:
    import torch

    net, tok = model.model, model.tokenizer
    device = _device(model)
    cache_arg = model.extra.setdefault("cache_arg", _cache_kwarg(net))
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    stops = eos_ids(model)
    budget = params.max_tokens
    if model.max_context:
        budget = min(budget, model.max_context - len(ids))
    generated: list[int] = []
    text, finish = "", "length"
    rec = _recorder(model, capture)
    try:
        step_input = torch.tensor([ids], device=device)
        cache = None
        for _ in range(budget):
            out = net(input_ids=step_input, use_cache=True, **{cache_arg: cache})
            cache = getattr(out, cache_arg)
            token = choose_token(out.logits[0, -1], params, generator)
            generated.append(token)
            step_input = torch.tensor([[token]], device=device)
            new_text = tok.decode(generated, skip_special_tokens=True)
            piece, text = new_text[len(text) :], new_text
            if on_token is not None and on_token(row, token, piece) is False:
                finish = "stop"
                break
            if token in stops:
                finish = "stop"
                break
            if params.stop:
                text, hit = _cut_at_stop(text, params.stop)
                if hit:
                    finish = "stop"
                    break
        if rec is not None and generated:
            # The last generated token has not been through the model yet: one more cached step gives its state.
            net(input_ids=step_input, use_cache=True, **{cache_arg: cache})
        return SequenceOutput(
            token_ids=[*ids, *generated],
            prompt_tokens=len(ids),
            text=text,
            finish_reason=finish,
            positions=_positions(len(ids) + len(generated), capture),
            states=_states(rec, capture),
        )
    finally:
        if rec is not None:
            rec.close()
