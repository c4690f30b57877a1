"""POST /v1/embeddings: OpenAI's texts and answer around the same embedding as /embed (``routes.serve``)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np
import pluggy
from litestar import Controller, Request, post
from litestar.params import JSONBody

from loom_embeddings.embed import MAX_BATCH_TEXTS, Embedded, declared_strategies
from loom_embeddings.routes import EmbedFields, serve
from loom_kernel import InvalidField, Manager, Plugins, b64_raw, json_raw, texts_or_ids


class OpenAIEmbeddingRequest(EmbedFields, kw_only=True):
    """OpenAI's fields, plus The Loom's embedding and load fields (an OpenAI client passes them in extra_body)."""

    input: str | list[Any]  # a text, texts, token ids, or lists of token ids (texts_or_ids)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None  # accepted and ignored, as OpenAI uses it only for abuse monitoring


def b64_float32(vector: Any) -> msgspec.Raw:
    """Little-endian float32 bytes, base64 (a JSON string): what the openai client decodes with numpy.frombuffer."""
    return b64_raw(np.ascontiguousarray(vector.detach().cpu().numpy(), dtype="<f4"))


def openai_texts(data: OpenAIEmbeddingRequest, pm: pluggy.PluginManager) -> tuple[list[Any], str, bool]:
    if data.pooling == "none":
        raise InvalidField(
            "pooling: /v1/embeddings returns one vector per input; use /embed/batch for per-token states",
            field="pooling",
            allowed=[p for p in declared_strategies(pm) if p != "none"],
        )
    texts, rows = texts_or_ids(data.input, "input")
    items: list[Any] = texts if rows is None else rows
    if len(items) > MAX_BATCH_TEXTS:
        raise InvalidField(
            f"input: {len(items)} inputs, more than {MAX_BATCH_TEXTS}", field="input", allowed=f"1 to {MAX_BATCH_TEXTS}"
        )
    return items, "input", isinstance(data.input, list) and (rows is None or isinstance(data.input[0], list))


def openai_answer(data: OpenAIEmbeddingRequest, result: Embedded, meta: dict[str, Any]) -> dict[str, Any]:
    encode = b64_float32 if data.encoding_format == "base64" else json_raw
    total = sum(result.token_counts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)],
        "model": data.model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }


class EmbeddingsController(Controller):
    tags = ["openai"]

    @post("/v1/embeddings", status_code=200)
    async def embeddings(
        self, data: JSONBody[OpenAIEmbeddingRequest], request: Request, manager: Manager, pm: Plugins
    ) -> dict[str, Any]:
        """OpenAI's embeddings response; ``encoding_format: base64`` carries little-endian float32 bytes."""
        return await serve(data, openai_texts, openai_answer, request, manager, pm)
