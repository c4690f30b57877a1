"""POST /logit_attribution: direct logit attribution in one call.

One pass captures the components the last block's output is the sum of (the embeddings and each block's attention and
MLP outputs, or each head's result and each block's output bias: ``LoadedModel.attribution``) and the final norm's
scale at the position; each component's value is its dot product with the target's direction through the model's
own final norm, frozen at that scale, and head (TransformerLens's ``cache.decompose_resid`` / ``stack_head_results``
and ``apply_ln_to_stack``). With the constant term (the norm's and the head's biases, site ``bias``) the values sum to
the model's own logit, or logit difference, which the answer gives beside the sum.
"""

from __future__ import annotations

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
    InvalidField,
    LoadedModel,
    Manager,
    ModelRequest,
    Session,
    Unsupported,
    client_gone,
    fit_text,
    model_metadata,
)

MAX_TEXTS = 64


class Target(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tokens: list[str] | None = None
    token_ids: list[int] | None = None
    token: str | None = None
    token_id: int | None = None


class AttributionRequest(ModelRequest, kw_only=True):
    target: Target
    text: str | None = None
    texts: list[str] | None = None
    token_ids: list[int] | None = None
    position: int = -1
    components: Literal["layers", "heads"] = "layers"
    add_special_tokens: bool = True


def target_ids(model: LoadedModel, target: Target) -> tuple[list[int], list[str]]:
    """The target's token ids (one: its logit; two: the first's minus the second's) and their texts."""
    given = [k for k in ("tokens", "token_ids", "token", "token_id") if getattr(target, k) is not None]
    if len(given) != 1:
        raise InvalidField(
            f"target: give one of tokens, token_ids, token or token_id ({', '.join(given) or 'none'} given)",
            field="target",
            allowed=['{"tokens": [a, b]}', '{"token_ids": [a, b]}', '{"token": a}', '{"token_id": a}'],
        )
    kind = given[0]
    value = getattr(target, kind)
    values = value if isinstance(value, list) else [value]
    if len(values) != (2 if isinstance(value, list) else 1):
        raise InvalidField(
            f"target.{kind}: {len(values)} entries; a difference is two (the first's logit minus the second's)",
            field=f"target.{kind}",
            allowed="two entries, or token / token_id for one logit",
        )
    vocab = model.model.get_output_embeddings().weight.shape[0] if model.model is not None else 0
    ids = []
    for i, v in enumerate(values):
        at = f"target.{kind}" + (f"[{i}]" if isinstance(value, list) else "")
        if kind in ("tokens", "token"):
            ids.append(one_token(model, v, at))
        elif isinstance(v, bool) or not 0 <= v < vocab:
            raise InvalidField(f"{at}: {v} is not a token id of this model", field=at, allowed=f"0 to {vocab - 1}")
        else:
            ids.append(int(v))
    tok = model.tokenizer
    return ids, [tok.decode([i]) if tok is not None else str(i) for i in ids]


def inputs(model: LoadedModel, data: AttributionRequest) -> tuple[Batch, list[int]]:
    """The batch, and each row's token count (its texts tokenized, to check ``position`` before the pass)."""
    batch = _batch(model, data)
    if batch.token_ids is not None:
        return batch, [len(ids) for ids in batch.token_ids]
    tok = model.tokenizer
    return batch, [len(tok(t, add_special_tokens=data.add_special_tokens)["input_ids"]) for t in batch.texts]


def _first(batch: Batch, n: int) -> Batch:
    if batch.token_ids is not None:
        return attrs.evolve(batch, token_ids=batch.token_ids[:n])
    return attrs.evolve(batch, texts=batch.texts[:n])


def _batch(model: LoadedModel, data: AttributionRequest) -> Batch:
    given = [k for k in ("text", "texts", "token_ids") if getattr(data, k) is not None]
    if len(given) != 1:
        raise InvalidField(
            f"text: give one of text, texts or token_ids ({', '.join(given) or 'none'} given)",
            field="text",
            allowed=["text", "texts", "token_ids"],
        )
    if data.token_ids is not None:
        if not data.token_ids:
            raise InvalidField("token_ids: empty", field="token_ids", allowed="a non-empty list of token ids")
        return Batch(token_ids=(tuple(data.token_ids),))
    texts = [data.text] if data.text is not None else list(data.texts or ())
    field = "text" if data.text is not None else "texts"
    if not texts or len(texts) > MAX_TEXTS or any(not t for t in texts):
        raise InvalidField(
            f"{field}: {len(texts)} texts, or an empty one",
            field=field,
            allowed=f"1 to {MAX_TEXTS} non-empty texts, run as one batch",
        )
    fitted = tuple(fit_text(model, t, field, **({"row": i} if len(texts) > 1 else {})) for i, t in enumerate(texts))
    return Batch(texts=fitted, add_special_tokens=data.add_special_tokens)


async def attribute(session: Session, data: AttributionRequest, max_bytes: int = 0) -> dict[str, Any]:
    model = session.model
    found = model.attribution
    if found is None:
        raise Unsupported(
            f"model: {data.model!r} offers no direct logit attribution (a causal LM of a described architecture, "
            "with attention and MLP blocks, a final norm and a dense LM head, does)",
            field="model",
        )
    sites = found.sites(data.components)
    missing = [s for s in sites if not isinstance((model.sites or {}).get(s), tuple)]
    if missing:
        raise Unsupported(
            f"components: {data.components!r} needs {missing[0]}, which this model has not: "
            f"{(model.sites or {}).get(missing[0])}",
            field="components",
            allowed=["layers"] if data.components == "heads" else None,
        )
    tokens, texts = target_ids(model, data.target)
    batch, lengths = await session.thread(inputs, model, data)
    for r, total in enumerate(lengths):
        if model.max_context and total > model.max_context:
            continue  # the pass refuses it, naming the text
        if not -total <= data.position < total:
            raise InvalidField(
                f"position: {data.position} is out of range for a text of {total} tokens",
                field="position",
                allowed=f"integers from {-total} to {total - 1}",
                row=r,
            )
    # Only the position read is kept, and the logits there.
    capture = Capture(sites=tuple(sites), positions=[data.position], logits=True)
    field = "texts" if data.texts is not None else "text" if data.text is not None else "token_ids"
    check_capture(
        model, batch, capture, max_bytes, field, len(lengths), lambda n: (_first(batch, n), capture), "texts", "texts"
    )
    out = await session.forward(batch, capture)
    results = []
    for row in out.rows:
        total = len(row.token_ids)
        p = data.position % total
        results.append(await session.thread(one_row, model, found, row, p, tokens, data.components))
    target = {"token_ids": tokens, "tokens": texts}
    answer: dict[str, Any] = {
        "model": data.model,
        "target": target,
        "difference": len(tokens) == 2,
        "components_kind": data.components,
        "softcap": found.softcap,
        "metadata": model_metadata(model),
    }
    if data.texts is not None:
        return {**answer, "results": results}
    return {**answer, **results[0]}


def one_row(model: LoadedModel, found: Any, row: Any, p: int, tokens: list[int], kind: str) -> dict[str, Any]:
    """One row's components at position ``p``: each one's value, the constant, their sum and the model's own."""
    import torch

    at = row.positions.index(p)  # the row keeps ``p`` and its last position (every one, merged with another call)
    states = {k: v[at : at + 1] for k, v in row.states.items()}
    directions, constants = found.logit_map(states, tokens)  # [1, k, d], [1, k]
    sign = torch.tensor([1.0, -1.0][: len(tokens)], dtype=torch.float64)
    direction, constant = (directions[0] * sign[:, None]).sum(0), float((constants[0] * sign).sum())
    components = [
        {"site": site, **({"head": head} if head is not None else {}), "value": float(vec[0] @ direction)}
        for site, head, vec in found.decompose(states, kind)
    ]
    components.append({"site": "bias", "value": constant})
    total = math.fsum(c["value"] for c in components)
    # The model's own logits (after any soft-capping), at ``p`` alone (cut to it from every position when merged).
    own = row.logits[0].double()[tokens]
    answer: dict[str, Any] = {
        "position": p,
        "token": model.tokenizer.decode([row.token_ids[p]]) if model.tokenizer is not None else None,
        "components": components,
        "sum": total,
        "logit": float((own * sign).sum()),
    }
    if found.softcap:  # the components decompose the logits before the cap: the model's, uncapped, beside them
        cap = found.softcap
        uncapped = cap * torch.atanh((own / cap).clamp(-1 + 1e-12, 1 - 1e-12))
        answer["logit_before_softcap"] = float((uncapped * sign).sum())
    return answer


class AttributionController(Controller):
    tags = ["interventions"]

    @post("/logit_attribution", status_code=200)
    async def logit_attribution(
        self, data: JSONBody[AttributionRequest], request: Request, manager: Manager
    ) -> dict[str, Any]:
        """Direct logit attribution of a text's logit (or logit difference) at a position: each component's share
        through the model's own final norm, frozen at its value there, and head; the values sum to the logit."""
        entry = await manager.get_for(data)
        limit = int(CAPTURE_MAX_MB.of(manager.settings) * 2**20)
        return await manager.run(entry, lambda session: attribute(session, data, limit), until=client_gone(request))
