"""Default pooling strategies, attention-mask aware, for either padding side."""

from __future__ import annotations

from typing import Any

from loom_kernel.hookspecs import hookimpl

STRATEGIES = ("mean", "cls", "first_token", "last_token", "max", "none")


@hookimpl(trylast=True)
def pool(output: Any, strategy: str, mask: Any) -> Any | None:
    import torch

    states = output.float()
    m = mask.to(states.device).bool()
    if strategy == "none":
        return states
    if strategy == "mean":
        w = m.unsqueeze(-1).to(states.dtype)
        return (states * w).sum(1) / w.sum(1).clamp(min=1.0)
    if strategy == "max":
        return states.masked_fill(~m.unsqueeze(-1), float("-inf")).max(1).values
    rows = torch.arange(states.shape[0], device=states.device)
    positions = torch.arange(states.shape[1], device=states.device).expand_as(m)
    if strategy in ("cls", "first_token"):
        first = torch.where(m, positions, states.shape[1]).min(1).values
        return states[rows, first]
    if strategy == "last_token":
        last = torch.where(m, positions, -1).max(1).values
        return states[rows, last]
    return None
