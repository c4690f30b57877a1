"""POST /generate (and /v1/generate) and POST /extract."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Response, post
from litestar.params import JSONBody

from loom_kernel.api.deps import Config, Manager, Plugins
from loom_kernel.api.schemas import CaptureFields, ExtractRequest, GenerateRequest
from loom_kernel.config import Settings
from loom_kernel.encoding import SAFETENSORS_MEDIA_TYPE
from loom_kernel.errors import InvalidField, Unsupported
from loom_kernel.inference import StateRequest, finish, forward, model_metadata, state_payload, timing
from loom_kernel.types import Batch, GenerationParams, LoadedModel


def state_request(data: CaptureFields, settings: Settings, wanted: bool) -> StateRequest:
    return StateRequest.from_fields(
        wanted=wanted,
        layers=data.hidden_state_layers,
        positions=data.positions,
        return_full_sequence=data.return_full_sequence,
        fmt=data.hidden_state_format or settings.default_format,
        dtype=data.hidden_state_dtype or settings.default_precision,
        default_layers=settings.default_layers,
    )


def respond(body: dict[str, Any] | bytes) -> Response:
    if isinstance(body, bytes):
        return Response(content=body, media_type=SAFETENSORS_MEDIA_TYPE)
    return Response(content=body)


def generation_params(data: GenerateRequest, settings: Settings) -> GenerationParams:
    if data.max_tokens > settings.max_tokens_limit:
        raise InvalidField(
            f"max_tokens: {data.max_tokens} is over this server's limit",
            field="max_tokens",
            allowed=f"0 to {settings.max_tokens_limit}",
        )
    stop = (data.stop,) if isinstance(data.stop, str) else tuple(data.stop or ())
    if any(not s for s in stop):
        raise InvalidField("stop: stop strings must be non-empty", field="stop")
    return GenerationParams(
        max_tokens=data.max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        seed=data.seed,
        stop=stop,
    )


class InferenceController(Controller):
    tags = ["inference"]

    @post(["/generate", "/v1/generate"], status_code=200)
    async def generate(
        self, data: JSONBody[GenerateRequest], manager: Manager, pm: Plugins, settings: Config
    ) -> Response:
        req = state_request(data, settings, data.return_hidden_states)
        params = generation_params(data, settings)
        entry = await manager.get(data.model, loader=data.loader, revision=data.revision, explicit=data.explicit())

        def work(model: LoadedModel) -> dict[str, Any] | bytes:
            if not model.can_generate:
                raise Unsupported(
                    f"model: {data.model!r} is a {model.kind} model and cannot generate; use /extract or /embed",
                    field="model",
                )
            if model.max_context and params.max_tokens > model.max_context:
                raise InvalidField(
                    f"max_tokens: {params.max_tokens} exceeds the model's context of {model.max_context} tokens",
                    field="max_tokens",
                    allowed=f"0 to {model.max_context}",
                )
            capture = req.capture(model)
            start = time.perf_counter()
            batch = Batch(texts=(data.prompt,), generation=params, add_special_tokens=data.add_special_tokens)
            row = forward(pm, model, batch, capture).rows[0]
            generated = len(row.generated_ids)
            fields, groups = state_payload(row, req, capture)
            payload = {
                "text": row.text,
                "token_count": generated,
                "prompt_tokens": row.prompt_tokens,
                "finish_reason": row.finish_reason,
                "token_ids": row.generated_ids,
                **fields,
                "metadata": {**model_metadata(model), **timing(start, generated), "prompt_tokens": row.prompt_tokens},
            }
            return finish(payload, groups, req)

        return respond(await manager.run(entry, work))

    @post("/extract", status_code=200)
    async def extract(
        self, data: JSONBody[ExtractRequest], manager: Manager, pm: Plugins, settings: Config
    ) -> Response:
        req = state_request(data, settings, True)
        entry = await manager.get(data.model, loader=data.loader, revision=data.revision, explicit=data.explicit())

        def work(model: LoadedModel) -> dict[str, Any] | bytes:
            capture = req.capture(model)
            start = time.perf_counter()
            batch = Batch(texts=(data.text,), add_special_tokens=data.add_special_tokens)
            row = forward(pm, model, batch, capture).rows[0]
            fields, groups = state_payload(row, req, capture)
            tokens = model.tokenizer.convert_ids_to_tokens(row.token_ids) if model.tokenizer is not None else None
            payload = {
                "model": data.model,
                "token_ids": row.token_ids,
                "tokens": tokens,
                "token_count": len(row.token_ids),
                **fields,
                "metadata": {**model_metadata(model), **timing(start, 0)},
            }
            return finish(payload, groups, req)

        return respond(await manager.run(entry, work))
