"""POST /patch: activation patching (causal tracing) in one call.

The clean text runs once with its states kept at every site; then the clean run, the corrupted run and one corrupted
run per (site, position), with the clean state set there, go through the scheduler as rows of a few batched calls
(forward passes whose last logits give the metric: a text of the model's whole context needs no room for a token
after it), as TransformerLens's ``patching`` module and the ROME paper compute it. ``"method": "attribution"``
estimates every cell at once instead, from the clean run and one forward and backward pass of the corrupted run:
(clean - corrupted) . d metric / d activation (Neel Nanda's attribution patching). At a per-head site
(``attn.hook_z``, ``hook_result``, ``hook_pattern``, ``hook_q``/``k``/``v``) each (position, head) is a run of its
own, with the clean value of that head set there, as TransformerLens's ``get_act_patch_attn_head_*_by_pos`` do.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

import attrs
import msgspec
from litestar import Controller, Request, post
from litestar.params import JSONBody

from loom_interp.bounds import CAPTURE_MAX_MB, check_capture
from loom_interp.readouts import one_token
from loom_kernel import (
    Batch,
    Capture,
    Gradient,
    Intervention,
    InvalidField,
    LayerSel,
    LoadedModel,
    Manager,
    ModelRequest,
    NonEmpty,
    Option,
    Session,
    Sites,
    StateRequest,
    Unsupported,
    check_site,
    client_gone,
    echo,
    fit_text,
    model_metadata,
    token_texts,
)

PATCH_MAX_ROWS = Option(
    "interventions", "patch_max_rows", 2048, "runs one POST /patch may ask for (sites x positions + 2)", minimum=1
)
FAMILIES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_FAMILIES = ("z", "result", "pattern", "q", "k", "v")  # attn.hook_<name> of every block, per head


class Metric(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["logit_diff", "logprob"]
    correct: str | None = None
    incorrect: str | None = None
    token: str | None = None


class PatchRequest(ModelRequest, kw_only=True):
    clean: NonEmpty
    corrupted: NonEmpty
    sites: str | Sites  # a family (every block's hook of that name), or sites
    metric: Metric
    positions: Literal["all"] | list[int] = "all"
    add_special_tokens: bool = True
    method: Literal["exact", "attribution"] = "exact"


def expand_sites(sites: str | list[int | str], num_layers: int) -> list[int | str]:
    allowed = [*FAMILIES, *HEAD_FAMILIES, "a list of sites"]
    if isinstance(sites, list):
        if not sites:
            raise InvalidField("sites: empty", field="sites", allowed=allowed)
        return list(dict.fromkeys(sites))
    if sites in HEAD_FAMILIES:
        return [f"blocks.{i}.attn.hook_{sites}" for i in range(num_layers)]
    if sites not in FAMILIES:
        raise InvalidField(f"sites: unknown family {echo(sites)}", field="sites", allowed=allowed)
    return [f"blocks.{i}.hook_{sites}" for i in range(num_layers)]


def fewer(batch: Batch, capture: Capture, positions: list[int]) -> Any:
    """The request with its first n positions (the bound ``check_capture`` names)."""
    return lambda n: (batch, attrs.evolve(capture, positions=sorted(positions[:n])))


METRIC_FIELDS = {"logit_diff": ("correct", "incorrect"), "logprob": ("token",)}


def metric_tokens(model: LoadedModel, metric: Metric) -> tuple[int, ...]:
    # Each type reads its own fields only: one of the other type's would be ignored (a logprob metric given
    # ``correct`` is not the logit difference its sender meant), and a missing one is named as missing.
    wanted = METRIC_FIELDS[metric.type]
    allowed = ['{"type": "logit_diff", "correct": a, "incorrect": b}', '{"type": "logprob", "token": a}']
    for key in ("correct", "incorrect", "token"):
        if key not in wanted and getattr(metric, key) is not None:
            raise InvalidField(
                f"metric.{key}: not a field of a {metric.type} metric, which reads {' and '.join(wanted)}",
                field=f"metric.{key}",
                allowed=allowed,
            )
        if key in wanted and getattr(metric, key) is None:
            raise InvalidField(
                f"metric.{key}: required by a {metric.type} metric", field=f"metric.{key}", allowed=allowed
            )
    if metric.type == "logit_diff":
        return (
            one_token(model, metric.correct or "", "metric.correct"),
            one_token(model, metric.incorrect or "", "metric.incorrect"),
        )
    return (one_token(model, metric.token or "", "metric.token"),)


def scorer(model: LoadedModel, metric: Metric) -> Any:
    """The metric of one row's logits at the last position."""
    import torch

    tokens = metric_tokens(model, metric)
    if metric.type == "logit_diff":
        good, bad = tokens
        return lambda logits: float(logits[good] - logits[bad])
    return lambda logits: float(torch.log_softmax(logits.double(), dim=-1)[tokens[0]])


async def patch(
    session: Session, data: PatchRequest, max_rows: int, max_batch: int, max_bytes: int = 0
) -> dict[str, Any]:
    model, tok = session.model, session.model.tokenizer
    if not model.can_generate or model.unembed is None:  # the metric is read off next-token logits
        raise Unsupported(
            f"model: {data.model!r} is {'an' if model.kind[:1] in 'aeiou' else 'a'} {model.kind} model without a "
            "causal LM head: /patch reads its metric off next-token logits; use a causal language model",
            field="model",
            allowed="a causal language model with its LM head",
        )
    sites = expand_sites(data.sites, model.num_layers)
    checked, heads = [], []  # each site, and its head count (0: not per head)
    for k, site in enumerate(sites):
        at, shape = check_site(site, model, f"sites[{k}]")
        checked.append(at)
        heads.append(shape[0] if len(shape) > 1 else 0)

    def tokenized() -> tuple[tuple[int, ...], tuple[int, ...], Any]:
        """Both texts' ids and the metric, on a request thread (texts cut to the model's context first)."""
        ids = (
            tuple(tok(fit_text(model, text, field), add_special_tokens=data.add_special_tokens)["input_ids"])
            for field, text in (("clean", data.clean), ("corrupted", data.corrupted))
        )
        return *ids, scorer(model, data.metric)

    clean, corrupt, score = await session.thread(tokenized)
    for field, ids in (("clean", clean), ("corrupted", corrupt)):
        if model.max_context and len(ids) > model.max_context:  # else the pass would name its token_ids
            raise InvalidField(
                f"{field}: {len(ids)} tokens exceed the model's context of {model.max_context}",
                field=field,
                allowed=f"at most {model.max_context} tokens",
            )
    if len(clean) != len(corrupt):
        raise InvalidField(
            f"corrupted: {len(corrupt)} tokens, the clean text {len(clean)}; patching needs the same count",
            field="corrupted",
            allowed=f"a text of {len(clean)} tokens",
            clean_tokens=len(clean),
            corrupted_tokens=len(corrupt),
        )
    total = len(clean)
    positions = list(range(total)) if data.positions == "all" else [p if p >= 0 else total + p for p in data.positions]
    if not positions or any(not 0 <= p < total for p in positions) or len(set(positions)) < len(positions):
        raise InvalidField(
            f"positions: {echo(data.positions)} does not name distinct tokens of a {total}-token text",
            field="positions",
            allowed=f'"all" or distinct integers from {-total} to {total - 1}',
        )
    # Only the positions patched are kept from the clean run (and its last, which every row keeps).
    spec: Any = "all" if len(positions) == total else sorted(positions)
    if data.method == "attribution":
        return await attribution_patch(
            session, data, sites, checked, heads, clean, corrupt, positions, score, spec, max_bytes
        )
    cells = [max(h, 1) * len(positions) for h in heads]  # runs per site
    rows = 2 + sum(cells)
    if rows > max_rows:
        raise InvalidField(
            f"sites: {len(checked)} sites x {len(positions)} positions (x heads at per-head sites) is {rows} runs, "
            f"more than this server's limit of {max_rows} (interventions.patch_max_rows)",
            field="sites",
            allowed=f"at most {max_rows - 2} sites x positions (x heads)",
        )
    layers = [s for s in checked if isinstance(s, int)]
    req = StateRequest.from_fields(
        wanted=True,
        layers=[*layers, *(s for s in checked if isinstance(s, str))],
        positions=spec,
        return_full_sequence=False,
        fmt="list",
        dtype="float32",
        default_layers=[],
    )
    capture = req.capture(model)
    first = Batch(token_ids=(clean,))
    check_capture(
        model,
        first,
        capture,
        max_bytes,
        "positions",
        len(positions),
        fewer(first, capture, positions),
        "positions",
        "clean",
    )
    (kept,) = (await session.forward(first, capture)).rows

    edits: list[tuple[Intervention, ...]] = [(), ()]
    where = {p: i for i, p in enumerate(kept.positions)}
    for site, count in zip(checked, heads, strict=True):
        states = kept.states[str(site)].float()
        for p in positions:
            i = where[p]
            if not count:
                edits.append((Intervention(site=site, op="set", vector=states[i : i + 1], positions=[p]),))
                continue
            edits += [
                (Intervention(site=site, op="set", vector=states[i, h : h + 1], positions=[p], heads=(h,)),)
                for h in range(count)
            ]
    inputs = [clean] + [corrupt] * (rows - 1)
    chunks = [range(i, min(i + max_batch, rows)) for i in range(0, rows, max_batch)]
    outputs = await asyncio.gather(
        *(
            session.forward(
                Batch(token_ids=tuple(inputs[i] for i in chunk), interventions=tuple(edits[i] for i in chunk)),
                Capture(logits=True, positions="last"),
                # Scored on the model's thread as each call ends: no run's [vocab] logits wait for the others.
                lambda out: [score(row.logits[-1]) for row in out.rows],
            )
            for chunk in chunks
        )
    )
    metrics = [m for out in outputs for m in out]
    clean_m, corrupt_m = metrics[0], metrics[1]
    matrix: list[list[Any]] = []
    at = 2
    for count, n in zip(heads, cells, strict=True):
        run = metrics[at : at + n]
        at += n
        matrix.append([run[i : i + count] for i in range(0, n, count)] if count else run)
    gap = clean_m - corrupt_m

    def norm(m: Any) -> Any:
        if isinstance(m, list):
            return [norm(x) for x in m]
        return (m - corrupt_m) / gap if gap and math.isfinite(gap) else None

    return {
        "model": data.model,
        "metric": {"type": data.metric.type, "clean": clean_m, "corrupted": corrupt_m},
        "sites": [str(s) for s in sites],
        "positions": positions,
        "tokens": {"clean": token_texts(tok, list(clean)), "corrupted": token_texts(tok, list(corrupt))},
        "token_ids": {"clean": list(clean), "corrupted": list(corrupt)},
        "method": "exact",
        "heads": [h or None for h in heads],
        "patched": matrix,
        "normalized": norm(matrix),
        "runs": rows,
        "calls": len(chunks),
        "metadata": model_metadata(model),
    }


async def attribution_patch(
    session: Session,
    data: PatchRequest,
    sites: list[int | str],
    checked: list[int | str],
    heads: list[int],
    clean: tuple[int, ...],
    corrupt: tuple[int, ...],
    positions: list[int],
    score: Any,
    spec: Any,
    max_bytes: int,
) -> dict[str, Any]:
    """Every (site, position[, head]) at once: (clean - corrupted) . d metric / d activation, the gradient taken on
    the corrupted run: one forward and one backward pass of both texts as one batch, the model's parameters
    frozen."""
    model = session.model
    if not model.gradients:
        raise Unsupported(
            f"method: {data.model!r}'s loader takes no gradients; use the exact method",
            field="method",
            allowed=["exact"],
        )
    for k, site in enumerate(checked):
        if isinstance(site, str) and site.endswith("hook_scale"):
            raise InvalidField(
                f"sites[{k}]: {site} is computed from the stream, not a tensor of the model's graph: no gradient there",
                field=f"sites[{k}]",
                allowed="the other hook points",
            )
    layers = tuple(LayerSel(key=str(s), index=s) for s in checked if isinstance(s, int))
    names = tuple(s for s in checked if isinstance(s, str))
    tokens = await session.thread(metric_tokens, model, data.metric)
    gradient = Gradient(metric=data.metric.type, tokens=tokens)
    # The states and gradients at the positions asked for only; the logits (the metric's) at the last.
    graded = Capture(layers=layers, sites=names, positions=spec, logits=True, gradient=gradient)
    both = Batch(token_ids=(clean, corrupt))
    check_capture(
        model,
        both,
        graded,
        max_bytes,
        "positions",
        len(positions),
        fewer(both, graded, positions),
        "positions",
        "clean",
    )
    # One batch of both texts: the clean row's states come with the pass (its gradient, unused, costs little in a
    # batch; rows never interact, so the corrupted row's gradient is its own).
    kept, run = (await session.forward(both, graded)).rows

    def estimate() -> tuple[list[Any], float, float]:
        matrix: list[Any] = []
        at = [run.positions.index(p) for p in positions]
        for site, count in zip(checked, heads, strict=True):
            key = str(site)
            cells = (kept.states[key].double() - run.states[key].double()) * run.gradients[key].double()
            cells = cells.flatten(2 if count else 1).sum(-1)[at]  # [positions] or [positions, heads]
            matrix.append(cells.tolist())
        return matrix, score(kept.logits[-1]), score(run.logits[-1])

    matrix, clean_m, corrupt_m = await session.thread(estimate)
    gap = clean_m - corrupt_m
    tok = model.tokenizer
    return {
        "model": data.model,
        "method": "attribution",
        "metric": {"type": data.metric.type, "clean": clean_m, "corrupted": corrupt_m},
        "sites": [str(s) for s in sites],
        "positions": positions,
        "tokens": {"clean": token_texts(tok, list(clean)), "corrupted": token_texts(tok, list(corrupt))},
        "token_ids": {"clean": list(clean), "corrupted": list(corrupt)},
        "heads": [h or None for h in heads],
        "attribution": matrix,
        "normalized": _scaled(matrix, gap),
        "runs": 2,
        "calls": 1,
        "metadata": model_metadata(model),
    }


def _scaled(m: Any, gap: float) -> Any:
    """An estimate of (patched - corrupted) / (clean - corrupted), cell by cell (None when the gap is 0)."""
    if isinstance(m, list):
        return [_scaled(x, gap) for x in m]
    return m / gap if gap and math.isfinite(gap) else None


class PatchController(Controller):
    tags = ["interventions"]

    @post("/patch", status_code=200)
    async def patch(self, data: JSONBody[PatchRequest], request: Request, manager: Manager) -> dict[str, Any]:
        """The metric for the clean run, the corrupted run, and each (site, position) of the corrupted run with the
        clean state patched in (each (site, position, head) at a per-head site), with its normalized form
        (patched - corrupted) / (clean - corrupted)."""
        s = manager.settings
        entry = await manager.get_for(data)
        limit = int(CAPTURE_MAX_MB.of(s) * 2**20)
        work = lambda session: patch(session, data, PATCH_MAX_ROWS.of(s), s.max_batch_size, limit)  # noqa: E731
        return await manager.run(entry, work, until=client_gone(request))
