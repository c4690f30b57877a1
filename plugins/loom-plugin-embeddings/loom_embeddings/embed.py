"""Embeddings: which pooling a request gets, one batched forward pass, then pooling, Matryoshka truncation and
normalization, with what was actually done reported back.

Pooling rules (the README's "Embeddings" section says the same for users):

- ``"model"``: the model's own pipeline (sentence-transformers Pooling, Dense, Normalize as configured), over its
  last layer; what ``SentenceTransformer.encode`` returns. Only for models whose loader has one (kind "embedding").
- No pooling named: ``"model"`` when the model has a pipeline and the layer is the last; otherwise the strategy
  the model was trained with (``LoadedModel.default_pooling``), else ``last_token`` for decoders and ``mean``
  for every other model.
- A named strategy goes through the ``pool`` hook: the kernel's default plugin answers ``mean``, ``cls``,
  ``first_token``, ``last_token``, ``max`` and ``none`` (per-token states); a third-party plugin adds a name by
  returning a tensor for it from its ``pool`` hookimpl (and lists it in a module-level ``POOLING_STRATEGIES``
  tuple so that 422s and GET /plugins can name it).

Normalization: ``normalize: null`` (default) keeps the model's convention: unit vectors when its pipeline ends in
Normalize (renormalized after ``dimensions`` cuts them), raw vectors otherwise. ``true`` always returns unit
vectors; ``false`` adds no normalization (a pipeline's own Normalize still applies, and is reported).

A request runs ``embed``: the checks, then one forward call on the model's thread (merged with other requests'),
whose rows are pooled, cut and normalized there right after the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from loom_kernel import (
    NUMBER_BYTES,
    AnswerTooLarge,
    Batch,
    Capture,
    Intervention,
    InvalidField,
    LayerSel,
    LoadedModel,
    SequenceOutput,
    Unsupported,
    check_vocabulary,
    resolve_layers,
    row_lengths,
    vocabulary_size,
)
from loom_kernel import POOLING_STRATEGIES as STRATEGIES

if TYPE_CHECKING:
    from loom_kernel import Session

MAX_BATCH_TEXTS = 256  # texts per /embed/batch or /v1/embeddings request: one forward pass must fit in memory
MODEL_POOLING = "model"


def declared_strategies(pm: pluggy.PluginManager) -> list[str]:
    """Every pooling name known without running anything: "model", the defaults, and plugins' declared names."""
    names = [MODEL_POOLING, *STRATEGIES]
    for impl in pm.hook.pool.get_hookimpls():
        for name in getattr(impl.plugin, "POOLING_STRATEGIES", ()):
            if name not in names:
                names.append(str(name))
    return names


def pool_answers(pm: pluggy.PluginManager, strategy: str) -> bool:
    """Whether some plugin's ``pool`` returns a tensor for ``strategy`` (asked with a 1x1x1 state; uses torch)."""
    import torch

    try:
        return pm.hook.pool(output=torch.zeros(1, 1, 1), strategy=strategy, mask=torch.ones(1, 1)) is not None
    except Exception:  # a plugin that fails on the probe does not get the name
        return False


@attrs.define(frozen=True)
class EmbedSpec:
    """The embedding fields of a request, checked at the boundary; ``field`` names where its texts are."""

    pooling: str | None = None
    normalize: bool | None = None
    layer: int = -1
    truncate: bool = True
    dimensions: int | None = None
    field: str = "text"
    listed: bool = False  # the texts came as a list (errors name "texts[3]"), not as one string
    max_answer_bytes: int = 0  # the server's max_response_mb (0: no bound)


@attrs.define
class Embedded:
    """The pooled vectors of a batch and what was done to get them.

    ``vectors`` is a float32 tensor [n, D], or for pooling "none" a list of n tensors [T_i, D].
    """

    vectors: Any
    pooling: str
    layer: LayerSel
    normalized: bool
    token_counts: list[int]
    truncated: list[bool]
    _norms: list[Any] | None = None

    @property
    def dimensions(self) -> int:
        return int(self.vectors[0].shape[-1])

    def norms(self) -> list[Any]:
        """One L2 norm per row, or per token of each row for pooling "none" (computed once)."""
        if self._norms is None:
            if isinstance(self.vectors, list):
                self._norms = [v.norm(dim=-1).tolist() for v in self.vectors]
            else:
                self._norms = self.vectors.norm(dim=-1).tolist()
        return self._norms


def choose_pooling(model: LoadedModel, requested: str | None, layer: LayerSel) -> str:
    last = layer.index == model.num_layers
    own = model.kind == "embedding"
    if requested == MODEL_POOLING:
        if not own:
            raise Unsupported(
                f'pooling: "model" is a sentence-transformers pipeline; {model.ref.id!r} (loader '
                f"{model.loader!r}) has none, so name a strategy",
                field="pooling",
                allowed=list(STRATEGIES),
            )
        if not last:
            raise InvalidField(
                f'layer: pooling "model" runs the model\'s pipeline on its last layer ({model.num_layers}); name a '
                "strategy to pool another layer",
                field="layer",
                allowed=[-1, model.num_layers],
            )
        return MODEL_POOLING
    if requested is not None:
        return requested
    if own and last:
        return MODEL_POOLING
    return model.default_pooling or ("last_token" if model.kind == "causal" else "mean")


def _renamed(exc: InvalidField, spec: EmbedSpec) -> InvalidField:
    """A plugin names the input "text"; say which field (and which row of it) the request used: ``field`` is the
    row's own path, as the detail says it and as a malformed row's 422 names it (``texts[1]``), ``row`` its index."""
    extra = dict(exc.extra)
    row = extra.pop("row", None)
    if row is None and spec.listed:  # a list of one: its plugin named no row
        row = 0
    where = spec.field if row is None else f"{spec.field}[{row}]"
    detail = exc.detail.split(": ", 1)[-1]
    if "exceed" in detail and not spec.truncate:
        detail += "; truncate: true cuts it to the model's limit"
    if row is not None:
        extra["row"] = row
    return InvalidField(f"{where}: {detail}", field=where, allowed=exc.allowed, **extra)


def _pool(pm: pluggy.PluginManager, states: list[Any], strategy: str) -> Any:
    """Pool rows of different lengths: right-padded into one [n, T, H] tensor with its mask, one hook call."""
    import torch

    lengths = [s.shape[0] for s in states]
    width = max(lengths)
    padded = torch.zeros(len(states), width, states[0].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for i, s in enumerate(states):
        padded[i, : lengths[i]] = s.float()
        mask[i, : lengths[i]] = 1
    pooled = pm.hook.pool(output=padded, strategy=strategy, mask=mask)
    if pooled is None:  # checked at the boundary; a plugin unregistered since then
        raise InvalidField(f"pooling: no plugin pools {strategy!r}", field="pooling", allowed=declared_strategies(pm))
    if strategy == "none":
        return [pooled[i, : lengths[i]].float() for i in range(len(states))]
    return pooled.float()


def renamed(exc: InvalidField, spec: EmbedSpec) -> InvalidField:
    """A plugin's InvalidField about the texts, naming the request's own field (and row); others as they are."""
    return _renamed(exc, spec) if exc.field in ("text", "token_ids") else exc


async def embed(
    session: Session,
    texts: Sequence[str] | Sequence[list[int]],
    spec: EmbedSpec,
    edits: Sequence[Intervention] = (),
) -> Embedded:
    """``texts`` through one forward call (each with ``edits``), pooled, cut to ``spec.dimensions`` and normalized
    as asked (a bad layer or pooling is a 4xx before any model work)."""
    pm, model = session.pm, session.model
    n = model.num_layers
    if not -(n + 1) <= spec.layer <= n:
        raise InvalidField(
            f"layer: {spec.layer} is out of range for a model with {n} layers",
            field="layer",
            allowed=f"integers from {-(n + 1)} to {n}",
        )
    (layer,) = resolve_layers([spec.layer], n, field="layer")
    strategy = choose_pooling(model, spec.pooling, layer)
    capture = Capture() if strategy == MODEL_POOLING else Capture(layers=(layer,), positions="all")
    if texts and not isinstance(texts[0], str):  # the model's own token ids
        rows = [list(row) for row in texts]
        check_vocabulary(rows, vocabulary_size(model), spec.field, flat=not spec.listed)
        batch = Batch(token_ids=tuple(tuple(row) for row in rows), truncate=spec.truncate)
    else:
        batch = Batch(texts=tuple(texts), truncate=spec.truncate)  # type: ignore[arg-type]
    if edits:
        batch = attrs.evolve(batch, interventions=(tuple(edits),) * batch.size)
    check_answer(model, batch, layer, strategy, spec)
    try:
        # Pooling runs on the model's thread right after the pass: a few small tensor operations, cheaper there
        # than a request thread's wake-up while the next pass runs.
        return await session.forward(
            batch, capture, then=lambda out: _pooled(pm, model, out.rows, layer, strategy, spec)
        )
    except InvalidField as exc:
        raise renamed(exc, spec) from None


ROW_BYTES = 256  # a row's token count, truncated flag, shape and brackets besides its numbers


def check_answer(model: LoadedModel, batch: Batch, layer: LayerSel, strategy: str, spec: EmbedSpec) -> None:
    """The answer's size estimated before any work, an AnswerTooLarge (422) over ``spec.max_answer_bytes``: a vector
    and its norm a text, or for pooling "none" one a token (a text counts as one token per character plus two, at
    most the model's context), each number as a JSON list writes it."""
    if not spec.max_answer_bytes:
        return
    lengths = row_lengths(model, batch)
    width = model.final_width if layer.index == model.num_layers and model.final_width else model.hidden_size
    width = min(width, spec.dimensions) if spec.dimensions else width
    rows = sum(lengths) if strategy == "none" else len(lengths)
    total = int(rows * (width + 1) * NUMBER_BYTES["list"]["float32"]) + len(lengths) * ROW_BYTES
    if total > spec.max_answer_bytes:
        limit = spec.max_answer_bytes
        raise AnswerTooLarge(
            f"{spec.field}: the answer would be about {total / 2**20:.1f} MiB, over this server's max_response_mb of "
            f"{limit / 2**20:g}; send fewer or shorter texts"
            + (', or pool them (pooling "none" answers every token)' if strategy == "none" else ""),
            field=spec.field,
            estimate_bytes=total,
            limit_bytes=limit,
        )


def _pooled(
    pm: pluggy.PluginManager,
    model: LoadedModel,
    rows: Sequence[SequenceOutput],
    layer: LayerSel,
    strategy: str,
    spec: EmbedSpec,
) -> Embedded:
    """The rows of the pass pooled, cut to ``spec.dimensions`` and normalized as asked."""
    import torch

    if strategy == MODEL_POOLING:
        if any(row.pooled is None for row in rows):
            raise Unsupported(
                f"pooling: loader {model.loader!r} returned no pooled output for {model.ref.id!r}", field="pooling"
            )
        vectors: Any = torch.stack([row.pooled.float() for row in rows])
        unit = model.pooled_normalized
    else:
        vectors = _pool(pm, [row.states[layer.key] for row in rows], strategy)
        unit = False
    width = int(vectors[0].shape[-1])
    if spec.dimensions is not None and spec.dimensions < width:
        vectors = (
            [v[..., : spec.dimensions] for v in vectors] if isinstance(vectors, list) else vectors[:, : spec.dimensions]
        )
        cut = True
    elif spec.dimensions is not None and spec.dimensions > width:
        raise InvalidField(
            f"dimensions: {spec.dimensions} is more than the {width} this embedding has",
            field="dimensions",
            allowed=f"1 to {width}",
        )
    else:
        cut = False
    want_unit = spec.normalize if spec.normalize is not None else unit
    if want_unit:
        normalize = torch.nn.functional.normalize
        vectors = [normalize(v, dim=-1) for v in vectors] if isinstance(vectors, list) else normalize(vectors, dim=-1)
    result = Embedded(
        vectors=vectors,
        pooling=strategy,
        layer=layer,
        normalized=bool(want_unit or (unit and not cut)),
        token_counts=[len(row.token_ids) for row in rows],
        truncated=[row.truncated for row in rows],
    )
    result.norms()  # computed and kept here, off the event loop
    return result
