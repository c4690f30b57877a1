"""Choosing each generated row's next token: the kernel's, for every loader.

One step's rows are picked together from their logits ``[B, V]`` on the model's device: greedy rows by argmax,
sampled rows by temperature, top-k and top-p, each row with its own numbers only (so that a row picks what it picks
alone, in any batch), and whatever the rows ask to keep (log-probabilities, raw logits) taken on the device too.
Then ONE copy brings all of it to the host, where each sampled row draws with its own CPU generator: a seed gives
the same tokens on any device and in any batch. A row whose logits are not finite gets no token, and fails alone.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from loom_kernel.types import GenerationParams


@attrs.define(eq=False)
class Choice:
    """What one row's pick needs: its parameters and generator, how many alternatives to give with its
    log-probability (None: no log-probability), whether to keep its raw logits."""

    params: GenerationParams
    generator: Any
    top_logprobs: int | None = None
    keep_logits: bool = False


@attrs.define(eq=False)
class Pick:
    """A row's pick: ``token`` (None when its logits are not finite; ``top`` is then what the largest one was),
    ``logprob`` ``{"token_id", "logprob", "top": [[id, logprob], ...]}`` (the log-softmax of the raw logits) when
    asked, ``logits`` (a CPU float tensor [V]) when asked."""

    token: int | None
    top: float
    logprob: dict[str, Any] | None = None
    logits: Any = None


def generator(seed: int | None) -> Any:
    """A CPU generator for one row: seeded, or from the OS's entropy."""
    import torch

    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


def pick(logits: Any, rows: list[Choice]) -> list[Pick]:
    """Every row's next token from ``logits`` [len(rows), V]."""
    import torch

    lf = logits.float()
    top, best = lf.max(-1)
    parts: list[Any] = [top, best.float()]
    layout: list[dict[str, tuple[int, int]]] = []
    at = 2 * len(rows)

    def keep(name: str, t: Any, where: dict[str, tuple[int, int]]) -> None:
        nonlocal at
        flat = t.reshape(-1)
        parts.append(flat)
        where[name] = (at, at + flat.numel())
        at += flat.numel()

    for i, row in enumerate(rows):
        where: dict[str, tuple[int, int]] = {}
        if not row.params.greedy:
            keep("probs", _probabilities(lf[i], top[i], row.params), where)
        if row.top_logprobs is not None:
            lp = torch.log_softmax(lf[i], dim=-1)
            keep("logprobs", lp, where) if not row.params.greedy else keep("best", lp.max().reshape(1), where)
            if row.top_logprobs:
                values, ids = torch.topk(lp, min(row.top_logprobs, lp.numel()))
                keep("top_values", values, where)
                keep("top_ids", ids.float(), where)
        if row.keep_logits:
            keep("logits", lf[i], where)
        layout.append(where)
    host = torch.cat(parts).cpu()  # the one device-to-host copy of the step
    numbers = host[: 2 * len(rows)].tolist()
    return [_decide(row, host, numbers[i], int(numbers[len(rows) + i]), layout[i]) for i, row in enumerate(rows)]


def _decide(row: Choice, host: Any, top: float, best: int, where: dict[str, tuple[int, int]]) -> Pick:
    import torch

    def part(name: str) -> Any:
        a, b = where[name]
        return host[a:b]

    if not math.isfinite(top):
        return Pick(token=None, top=top)
    token = best if row.params.greedy else int(torch.multinomial(part("probs"), 1, generator=row.generator))
    out = Pick(token=token, top=top)
    if row.top_logprobs is not None:
        chosen = float(part("best")[0]) if row.params.greedy else float(part("logprobs")[token])
        alternatives = []
        if row.top_logprobs:
            values, ids = part("top_values").tolist(), part("top_ids").tolist()
            alternatives = [[int(i), v] for i, v in zip(ids, values, strict=True)]
        out.logprob = {"token_id": token, "logprob": chosen, "top": alternatives}
    if row.keep_logits:
        out.logits = part("logits").clone()
    return out


def _probabilities(logits: Any, top: Any, params: GenerationParams) -> Any:
    """One row's sampling distribution: temperature, then top-k, then top-p. Shifted so the largest logit is 0
    before dividing: a tiny temperature then sends the others to -inf (greedy in the limit) instead of overflowing
    to inf - inf = nan; one below float32's smallest normal value would become 0 (0 / 0 = nan) and divides as that
    value instead, the same limit."""
    import torch

    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    scaled = (logits - top) / temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Keep the smallest set reaching top_p: a token goes once the ones before it hold top_p already (ties
        # included, as transformers' TopPLogitsWarper and vLLM decide); the most likely one always stays.
        drop = torch.cumsum(probs, dim=-1) - probs >= params.top_p
        drop[0] = False
        scaled = scaled.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    return torch.softmax(scaled, dim=-1)
