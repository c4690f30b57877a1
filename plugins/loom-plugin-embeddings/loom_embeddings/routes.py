"""POST /embed and /embed/batch (the openai plugin serves /v1/embeddings through ``serve`` too).

Every field is checked before any model work; the batch runs as one forward call on the model's thread, merged
with other requests'. Pooling and normalization rules are in ``loom_embeddings.embed``. Each route is its texts
(what it reads from its body) and its answer (what it returns), around the same embedding.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import pluggy
from litestar import Controller, Request, post
from litestar.params import JSONBody

from loom_embeddings.embed import MAX_BATCH_TEXTS, Embedded, EmbedSpec, declared_strategies, embed, pool_answers
from loom_kernel import (
    InvalidField,
    Manager,
    ModelManager,
    ModelRequest,
    NonEmpty,
    Plugins,
    asked_fields,
    caller,
    client_gone,
    echo,
    json_raw,
    model_metadata,
    timing,
)

Texts = Annotated[
    list[NonEmpty],
    msgspec.Meta(min_length=1, max_length=MAX_BATCH_TEXTS, description=f"1 to {MAX_BATCH_TEXTS} non-empty texts"),
]
Dimensions = Annotated[int, msgspec.Meta(ge=1, description="keep the first N dimensions (Matryoshka)")]


class EmbedFields(ModelRequest, kw_only=True):
    pooling: str | None = None  # None: the model's own pooling (see loom_embeddings.embed)
    normalize: bool | None = None  # None: the model's convention
    layer: int = -1
    truncate: bool = True
    dimensions: Dimensions | None = None

    def spec(self, field: str, listed: bool, max_answer_bytes: int = 0) -> EmbedSpec:
        return EmbedSpec(
            pooling=self.pooling,
            normalize=self.normalize,
            layer=self.layer,
            truncate=self.truncate,
            dimensions=self.dimensions,
            field=field,
            listed=listed,
            max_answer_bytes=max_answer_bytes,
        )


class EmbedRequest(EmbedFields, kw_only=True):
    text: NonEmpty


class EmbedBatchRequest(EmbedFields, kw_only=True):
    texts: Texts


EMBED_REQUESTS = {"EmbedRequest": EmbedRequest, "EmbedBatchRequest": EmbedBatchRequest}


async def check_pooling(pm: pluggy.PluginManager, name: str | None) -> None:
    """An unknown strategy is a 422 before any model loads; an undeclared name is asked of the pool hook."""
    if name is None:
        return
    known = declared_strategies(pm)
    if name in known or await asyncio.to_thread(pool_answers, pm, name):
        return
    raise InvalidField(f"pooling: unknown strategy {echo(name)}", field="pooling", allowed=known)


async def embed_texts(
    manager: ModelManager,
    pm: pluggy.PluginManager,
    data: EmbedFields,
    texts: list[Any],
    field: str,
    listed: bool,
    request: Request,
) -> tuple[Embedded, dict[str, Any]]:
    """Check, load (if needed) and embed (one forward call, merged with other requests' on the model's thread):
    (vectors, metadata)."""
    await check_pooling(pm, data.pooling)
    spec = data.spec(field, listed, int(manager.settings.max_response_mb * 2**20))
    entry = await manager.get_for(data)
    start = time.perf_counter()
    edits = ()
    if asked := asked_fields(data, manager.kernel):  # the plugins' edits, resolved on the model
        reading = await asyncio.to_thread(manager.reading, entry.model(), asked, caller(request))
        edits = reading.edits if reading is not None else ()
    result = await manager.run(entry, lambda s: embed(s, texts, spec, edits), until=client_gone(request))
    model = entry.model()
    meta = {**model_metadata(model), **timing(start, sum(result.token_counts))}
    if "pipeline" in model.extra:
        meta["pipeline"] = model.extra["pipeline"]
    return result, meta


def one_texts(data: EmbedRequest, pm: pluggy.PluginManager) -> tuple[list[str], str, bool]:
    return [data.text], "text", False


def one_answer(data: EmbedRequest, result: Embedded, meta: dict[str, Any]) -> dict[str, Any]:
    vector = result.vectors[0]
    return {
        "model": data.model,
        "embedding": json_raw(vector),
        "shape": list(vector.shape),
        "dtype": "float32",
        "normalized": result.normalized,
        "l2_norm": result.norms()[0],
        "pooling": result.pooling,
        "layer": data.layer,
        "layer_index": result.layer.index,
        "dimensions": result.dimensions,
        "token_count": result.token_counts[0],
        "truncated": result.truncated[0],
        "metadata": meta,
    }


def batch_texts(data: EmbedBatchRequest, pm: pluggy.PluginManager) -> tuple[list[str], str, bool]:
    return data.texts, "texts", True


def batch_answer(data: EmbedBatchRequest, result: Embedded, meta: dict[str, Any]) -> dict[str, Any]:
    ragged = isinstance(result.vectors, list)
    body: dict[str, Any] = {
        "model": data.model,
        "embeddings": [json_raw(v) for v in result.vectors] if ragged else json_raw(result.vectors),
        "shape": None if ragged else list(result.vectors.shape),
        "dtype": "float32",
        "normalized": result.normalized,
        "l2_norms": result.norms(),
        "pooling": result.pooling,
        "layer": data.layer,
        "layer_index": result.layer.index,
        "dimensions": result.dimensions,
        "token_counts": result.token_counts,
        "total_tokens": sum(result.token_counts),
        "truncated": result.truncated,
        "metadata": meta,
    }
    if ragged:
        body["shapes"] = [list(v.shape) for v in result.vectors]
    return body


async def serve(
    data: Any,
    texts: Callable[[Any, pluggy.PluginManager], tuple[list[Any], str, bool]],
    answer: Callable[[Any, Embedded, dict[str, Any]], dict[str, Any]],
    request: Request,
    manager: ModelManager,
    pm: pluggy.PluginManager,
) -> dict[str, Any]:
    """One embedding endpoint: its texts (checked: texts, field, listed), embedded, then its answer."""
    items, field, listed = texts(data, pm)
    result, meta = await embed_texts(manager, pm, data, items, field, listed, request)
    return answer(data, result, meta)


class EmbedController(Controller):
    tags = ["embeddings"]

    @post("/embed", status_code=200)
    async def embed_one(
        self, data: JSONBody[EmbedRequest], request: Request, manager: Manager, pm: Plugins
    ) -> dict[str, Any]:
        """One text's embedding: ``shape`` [D] (or [T, D] for pooling "none")."""
        return await serve(data, one_texts, one_answer, request, manager, pm)

    @post("/embed/batch", status_code=200)
    async def embed_batch(
        self, data: JSONBody[EmbedBatchRequest], request: Request, manager: Manager, pm: Plugins
    ) -> dict[str, Any]:
        """Every text in one forward pass: ``shape`` [n, D]; for pooling "none" ``shape`` is null and
        ``shapes`` lists each text's [T_i, D]."""
        return await serve(data, batch_texts, batch_answer, request, manager, pm)
