"""Merging compatible calls into one Batch and one Capture, and cutting each call's rows back out of the result.

A merged capture is a superset: the union of the layers (keyed by index), every position when the specs differ
(whole generations only: plain passes merge at the same positions, ``Call.key``), the most ``top_logprobs`` any
asks for. Each row (and each streamed token) is cut back to what its call asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from loom_kernel.capture import resolve_positions
from loom_kernel.types import Batch, Capture, LayerSel, SequenceOutput

if TYPE_CHECKING:
    from loom_kernel.calls import Call


def merge(calls: list[Call]) -> tuple[Batch, Capture, list[int]]:
    """One Batch and one Capture for ``calls`` (each call's first row number in it); a lone call as it is, with
    only a cancellation check added to its generation."""
    starts, at = [], 0
    for call in calls:
        starts.append(at)
        at += call.rows
    first = calls[0].batch
    capture = merge_captures([c.capture for c in calls])
    on_token = _merged_on_token(calls, capture) if first.generation is not None else first.on_token
    if len(calls) == 1:
        return attrs.evolve(first, on_token=on_token), capture, starts
    params = [c.batch.params(i) for c in calls for i in range(c.rows)] if first.generation is not None else []
    texts = first.token_ids is None
    batch = attrs.evolve(
        first,
        texts=tuple(t for c in calls for t in c.batch.texts) if texts else (),
        token_ids=None if texts else tuple(ids for c in calls for ids in c.batch.token_ids or ()),
        row_generation=None if first.generation is None or len(set(params)) == 1 else tuple(params),
        interventions=tuple(c.batch.edits(i) for c in calls for i in range(c.rows))
        if any(c.batch.interventions for c in calls)
        else (),
        on_token=on_token,
    )
    return batch, capture, starts


def pick(batch: Batch, rows: list[int]) -> Batch:
    """The plain pass of ``batch``'s ``rows`` (in that order)."""
    if rows == list(range(batch.size)):
        return batch
    return attrs.evolve(
        batch,
        texts=tuple(batch.texts[i] for i in rows) if batch.token_ids is None else (),
        token_ids=None if batch.token_ids is None else tuple(batch.token_ids[i] for i in rows),
        interventions=tuple(batch.interventions[i] for i in rows) if batch.interventions else (),
    )


def merge_captures(captures: list[Capture]) -> Capture:
    """A capture that holds every one of ``captures``: the union of their layers (keyed by index), every position
    when their positions differ (of those keeping states, attention or logits), the most alternatives any asks
    for."""
    if all(c == captures[0] for c in captures):
        return captures[0]
    indices = sorted({sel.index for c in captures if c.wanted for sel in c.layers})
    # Positions matter to a capture that keeps states or attention, or logits (read at its positions): a scored
    # run's last logits are not another call's listed position's.
    placed = [c for c in captures if c.wanted or c.logits]
    positions = (placed or captures)[0].positions
    if any(c.positions != positions for c in placed):
        positions = "all"
    tops = [c.top_logprobs for c in captures if c.top_logprobs is not None]
    return Capture(
        layers=tuple(LayerSel(key=str(i), index=i) for i in indices),
        sites=tuple(dict.fromkeys(site for c in captures if c.wanted for site in c.sites)),
        positions=positions,
        states=any(c.wants_states for c in captures),
        attention=any(c.attention for c in captures),
        top_logprobs=max(tops) if tops else None,
        logits=any(c.logits for c in captures),
        stream_states=any(c.stream_states for c in captures),
        gradient=captures[0].gradient,  # calls of one key share it
    )


def restrict(row: SequenceOutput, capture: Capture, merged: Capture) -> SequenceOutput:
    """``row`` of a merged call cut back to what ``capture`` asked for."""
    if capture == merged:
        return row
    keys = {sel.index: sel.key for sel in merged.layers}
    return attrs.evolve(
        row,
        states=_states(row.states, capture, keys) if capture.wants_states else {},
        attentions={s.key: row.attentions[keys[s.index]] for s in capture.attention_layers},
        logprobs=[_top(e, capture.top_logprobs) for e in row.logprobs] if capture.top_logprobs is not None else [],
        logits=_logits(row, capture, merged) if capture.logits else None,
        gradients=_states(row.gradients, capture, keys) if capture.gradient is not None else {},
    )


def _states(states: dict[str, Any], capture: Capture, keys: dict[int, str]) -> dict[str, Any]:
    """``capture``'s states out of a merged capture's (``keys``: the merged key of each layer index)."""
    return {**{s.key: states[keys[s.index]] for s in capture.layers}, **{site: states[site] for site in capture.sites}}


def _logits(row: SequenceOutput, capture: Capture, merged: Capture) -> Any:
    """A forward pass's logits at ``capture``'s positions, out of those at every position (``merged`` asked for
    "all"); a generation's (one per step) as they are."""
    total = len(row.token_ids)
    logits = row.logits
    if logits is None or merged.positions != "all" or capture.positions == "all" or row.prompt_tokens != total:
        return logits
    if logits.shape[0] != total:
        return logits
    at = resolve_positions(capture.positions, total, total) if capture.positions != "last" else [total - 1]
    if capture.gradient is not None:  # at the positions a pass keeps: those asked for and the last
        at = sorted({*at, total - 1})
    return logits[at]


def _top(entry: dict[str, Any], k: int) -> dict[str, Any]:
    return {**entry, "top": entry["top"][:k]}


def _merged_on_token(calls: list[Call], merged: Capture) -> Callable[..., bool | str]:
    """Route each row's tokens to its own call's ``on_token`` (row renumbered, extras cut to what it asked for);
    a row whose request was cancelled stops."""
    owner = [(call, row) for call in calls for row in range(call.rows)]

    def on_token(row: int, token: int, piece: str, extras: dict[str, Any] | None = None) -> bool | str:
        call, local = owner[row]
        if call.ticket.cancelled.is_set():
            return False
        if call.batch.on_token is None:
            return True
        result = call.batch.on_token(local, token, piece, _extras(extras or {}, call.capture, merged))
        return result if isinstance(result, str) else result is not False

    return on_token


def _extras(extras: dict[str, Any], capture: Capture, merged: Capture) -> dict[str, Any]:
    if capture == merged:
        return extras
    out: dict[str, Any] = {}
    if capture.stream_states and "states" in extras:
        out["states"] = _states(extras["states"], capture, {sel.index: sel.key for sel in merged.layers})
    if capture.top_logprobs is not None and "logprob" in extras:
        out["logprob"] = _top(extras["logprob"], capture.top_logprobs)
    return out
