"""A template third-party Loom plugin: a loader for the toy "loom-toy" architecture and one pooling strategy.

The kernel registers this module under its entry point's name (``example`` in the ``loom`` group, see
pyproject.toml), so that name is also the loader name: ``probe`` results carry it, ``load`` answers only for it,
and a request's ``loader`` field can select it. The loader declares the model's parts (``ModelParts``: its blocks,
final norm and LM head) and the kernel does the rest: hidden states and edits at every index, the logit lens,
and, for the causal toy, generation through the scheduler (streams, ``n``, stop strings, log-probabilities).

Heavy imports (torch, the model code) happen inside the hooks, so that ``loom plugins`` and server start-up
stay fast however many plugins are installed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from loom_kernel import LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl

__version__ = "0.1.0"
__all__ = ["NAME", "POOLING_STRATEGIES", "make_toy_model"]

NAME = "example"
FIRST_LAST_MEAN = "first_last_mean"
# The kernel reads this module-level tuple (on the module it registered) to accept these names in /embed without
# a trial call of the hook, and to list them in the 422 for an unknown pooling.
POOLING_STRATEGIES = (FIRST_LAST_MEAN,)


def make_toy_model(path: str | Path, seed: int = 0, causal: bool = False, **sizes: int) -> Path:
    """Write a loom-toy model directory (config.json + weights.pt) with random weights from ``seed``; ``causal``
    gives it an LM head, and generation."""
    from loom_example.toy import make_toy_model as make

    return make(path, seed=seed, causal=causal, **sizes)


@hookimpl
def probe(model: ModelRef) -> ProbeResult | None:
    # Probes see only the config files, run for every model on every load, and must never raise.
    from loom_example.toy import MODEL_TYPE, toy_config

    try:
        sizes = toy_config(model.config)
    except Exception:  # a malformed toy config is reported as score 0 with the reason, not a crash
        return ProbeResult(loader=NAME, score=0.0, reason=f"config.json says {MODEL_TYPE} but its sizes are invalid")
    if sizes is None:
        return None  # no opinion: GET /loaders/probe lists us under loaders_without_opinion
    # 1.0 beats the generic transformers loader, which scores any config.json between 0.1 and 0.5.
    return ProbeResult(loader=NAME, score=1.0, reason=f"model_type {MODEL_TYPE!r}: {sizes['num_layers']} blocks")


@hookimpl
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    if loader != NAME:  # firstresult hook: None lets the loader the kernel chose answer
        return None
    from loom_example.toy import WEIGHTS_FILE, ByteTokenizer, load_toy, toy_config
    from loom_kernel import InvalidField, ModelParts, Unsupported, resolve_device, resolve_dtype

    if model.path is None or not (model.path / WEIGHTS_FILE).is_file():
        raise InvalidField(f"model: {model.id!r} has no local {WEIGHTS_FILE}", field="model")
    if (sizes := toy_config(model.config)) is None:
        raise InvalidField(f"loader: {model.id!r} is not a loom-toy model", field="loader")
    if options.quantization or options.device_map:
        field = "quantization" if options.quantization else "device_map"
        raise Unsupported(f"{field}: the example loader places the whole toy model on one device", field=field)
    start = time.perf_counter()
    device = resolve_device(options.device)  # the kernel's rules, so "auto" and "cuda:N" mean what they mean elsewhere
    dtype = resolve_dtype(options.dtype, device)
    toy = load_toy(model.path, model.config or {}, device, dtype)
    return LoadedModel(
        ref=model,
        loader=NAME,
        model=toy,
        tokenizer=ByteTokenizer(),
        options=options,
        num_layers=len(toy.blocks),
        hidden_size=toy.embed.embedding_dim,
        kind="causal" if sizes["causal"] else "encoder",  # an encoder has no LM head: /generate is refused
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        size_bytes=sum(p.numel() * p.element_size() for p in toy.parameters()),
        load_seconds=time.perf_counter() - start,
        max_context=toy.max_position_embeddings,
        # What the kernel needs to run it: capture, edits, the lens and generation come from these.
        parts=ModelParts(blocks=toy.blocks, final_norm=toy.norm, lm_head=toy.head),
    )


@hookimpl
def pool(output: Any, strategy: str, mask: Any) -> Any | None:
    """``first_last_mean``: the mean of each row's first and last real token, for either padding side."""
    if strategy != FIRST_LAST_MEAN:  # firstresult hook: None passes every other name on to the next plugin
        return None
    import torch

    states = output.float()
    m = mask.to(states.device).bool()
    rows = torch.arange(states.shape[0], device=states.device)
    steps = torch.arange(states.shape[1], device=states.device).expand_as(m)
    first = torch.where(m, steps, states.shape[1]).min(1).values
    last = torch.where(m, steps, -1).max(1).values
    return (states[rows, first] + states[rows, last]) / 2
