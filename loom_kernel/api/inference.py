"""POST /generate (and /v1/generate) and POST /extract."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.params import JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage

from loom_kernel.admission import Session
from loom_kernel.api.deps import Manager
from loom_kernel.api.payloads import (
    StateRequest,
    check_generation,
    check_prompts,
    finish,
    generate_choices,
    generate_rows,
    model_metadata,
    state_payload,
    stream_extras,
    timing,
    token_texts,
)
from loom_kernel.api.problems import request_id
from loom_kernel.api.schemas import (
    MAX_STOPS,
    BatchGenerateRequest,
    CaptureFields,
    ExtractRequest,
    GenerateRequest,
    GenerationFields,
)
from loom_kernel.api.security import caller
from loom_kernel.api.streaming import TokenBridge, client_gone, event_stream
from loom_kernel.config import Settings
from loom_kernel.encoding import SAFETENSORS_MEDIA_TYPE
from loom_kernel.errors import InvalidField, LoomError, Unsupported
from loom_kernel.models import Kernel, ModelManager
from loom_kernel.types import Batch, GenerationParams

DEFAULT_MAX_TOKENS = 256  # what a generation that names no max_tokens may run to (its context permitting)


def state_request(
    data: CaptureFields, manager: ModelManager, wanted: bool, stream: bool = False, caller: str = ""
) -> StateRequest:
    """``stream``: the endpoint streams, so ``stream_hidden_states`` puts states in token events; elsewhere it
    asks for the states of the response. ``caller``: whose stored vectors and probes the request names."""
    settings = manager.settings
    streamed = bool(getattr(data, "stream_hidden_states", False))
    top = getattr(data, "top_logprobs", None)
    if top is None and getattr(data, "logprobs", False):
        top = 0
    return StateRequest.from_fields(
        wanted=wanted or streamed,
        layers=data.hidden_state_layers,
        positions=data.positions,
        return_full_sequence=data.return_full_sequence,
        fmt=data.hidden_state_format or settings.default_format,
        dtype=data.hidden_state_dtype or settings.default_precision,
        default_layers=settings.default_layers,
        attention=data.return_attention,
        stream=stream and streamed,
        top_logprobs=top,
        logits=bool(getattr(data, "return_logits", False)),
        max_response_bytes=int(settings.max_response_mb * 2**20),
        asked=asked_fields(data, manager.kernel),
        reading_fields=reading_fields(data, manager.kernel),
        resolver=functools.partial(manager.reading, caller=caller),
        streaming=stream,
    )


def asked_fields(data: Any, kernel: Kernel) -> dict[str, Any]:
    """The plugins' request fields a request gives (the ``readouts`` hook resolves them)."""
    return {f.name: value for f in kernel.request_fields() if (value := getattr(data, f.name, None))}


def reading_fields(data: Any, kernel: Kernel) -> tuple[str, ...]:
    """The request fields a request gives that answer at its positions (``RequestField.reads``)."""
    return tuple(f.name for f in kernel.request_fields() if f.reads and getattr(data, f.name, None))


def controller_with_fields(controller: type[Controller], kernel: Kernel) -> type[Controller]:
    """The kernel's capture routes, their bodies with the plugins' request fields."""
    types = {
        "ExtractRequest": kernel.request_type(ExtractRequest, generation=False),
        "GenerateRequest": kernel.request_type(GenerateRequest, generation=True),
        "BatchGenerateRequest": kernel.request_type(BatchGenerateRequest, generation=True),
    }
    return type(controller.__name__, (controller,), {"signature_namespace": types})


def json_formats_only(req: StateRequest, what: str) -> StateRequest:
    """Safetensors is a whole-body format: endpoints that answer in JSON (or events) carry list or base64."""
    if req.fmt == "safetensors":
        raise InvalidField(
            f"hidden_state_format: {what} answers in JSON; use list or base64",
            field="hidden_state_format",
            allowed=["list", "base64"],
        )
    return req


def respond(body: dict[str, Any] | bytes) -> Response:
    if isinstance(body, bytes):
        return Response(content=body, media_type=SAFETENSORS_MEDIA_TYPE)
    return Response(content=body)


def checked_params(
    settings: Settings,
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: str | list[str] | None,
    max_stop: int | None = None,
) -> GenerationParams:
    """Generation parameters after the checks every generating endpoint shares; ``max_tokens`` None: the default,
    as many as the model's context holds up to ``DEFAULT_MAX_TOKENS``."""
    fit_context = max_tokens is None
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, settings.max_tokens_limit)
    if max_tokens > settings.max_tokens_limit:
        raise InvalidField(
            f"max_tokens: {max_tokens} is over this server's limit",
            field="max_tokens",
            allowed=f"0 to {settings.max_tokens_limit}",
        )
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if max_stop is not None and len(stops) > max_stop:
        raise InvalidField(f"stop: at most {max_stop} stop strings", field="stop", allowed=f"up to {max_stop}")
    if any(not s for s in stops):
        raise InvalidField("stop: stop strings must be non-empty", field="stop")
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stops,
        fit_context=fit_context,
    )


def with_choices(results: list[tuple[dict[str, Any], Any, Any]]) -> dict[str, Any]:
    """The answer for ``n`` > 1: the first choice's fields, and every choice (``index``, its own fields)."""
    return {**results[0][0], "choices": [{"index": i, **payload} for i, (payload, _, _) in enumerate(results)]}


def generation_params(data: GenerationFields, settings: Settings) -> GenerationParams:
    return checked_params(
        settings,
        max_tokens=data.max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        seed=data.seed,
        stop=data.stop,
        max_stop=MAX_STOPS,
    )


class InferenceController(Controller):
    tags = ["inference"]

    @post(["/generate", "/v1/generate"], status_code=200)
    async def generate(self, data: JSONBody[GenerateRequest], request: Request, manager: Manager) -> Response:
        settings = manager.settings
        req = state_request(data, manager, data.return_hidden_states, caller=caller(request))
        params = generation_params(data, settings)
        entry = await manager.get_for(data)

        batch = Batch(texts=(data.prompt,), generation=params, add_special_tokens=data.add_special_tokens)

        if data.n > 1:
            json_formats_only(req, "n > 1")

        async def work(s: Session) -> dict[str, Any] | bytes:
            results = await generate_choices(s, batch, req, data.n)
            payload, groups, _ = results[0]
            if data.n > 1:
                payload = with_choices(results)
            return payload if req.fmt != "safetensors" else await s.thread(finish, payload, groups, req)

        return respond(await manager.run(entry, work, until=client_gone(request)))

    @post("/generate/stream", status_code=200, media_type="text/event-stream")
    async def generate_stream(
        self, data: JSONBody[GenerateRequest], request: Request, manager: Manager
    ) -> ServerSentEvent:
        """SSE: a ``token`` event per generated token, then ``done`` (the /generate body) or ``error``."""
        settings = manager.settings
        req = state_request(data, manager, data.return_hidden_states, stream=True, caller=caller(request))
        req = json_formats_only(req, "a stream")
        params = generation_params(data, settings)
        entry = await manager.get_for(data)
        if entry.loaded is not None:  # refuse now what would otherwise be an error event after a 200
            check_generation(entry.loaded, params)
            prompt = Batch(texts=(data.prompt,), generation=params, add_special_tokens=data.add_special_tokens)
            await asyncio.to_thread(check_prompts, entry.loaded, prompt)
            await req.resolved(entry.loaded, prompt)
        bridge = TokenBridge()

        async def work(s: Session) -> dict[str, Any]:
            def on_token(row: int, token: int, piece: str, extras: dict[str, Any] | None = None) -> bool:
                # Tensors become JSON here, on the model's thread, not on the event loop.
                return bridge.on_token(row, token, piece, stream_extras(extras, req, s.model))

            batch = Batch(
                texts=(data.prompt,), generation=params, add_special_tokens=data.add_special_tokens, on_token=on_token
            )
            results = await generate_choices(s, batch, req, data.n)
            return results[0][0] if data.n == 1 else with_choices(results)

        job = manager.run(entry, work)

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            # A token's index is its place among its own choice's tokens (as with n = 1), not among the events of
            # every choice: the choices' tokens interleave, and a client places each by (choice, index).
            counts = [0] * data.n
            async for kind, value in bridge.events(job, request_id(request)):
                if kind == "token":
                    row = value["row"]
                    choice = {"choice": row} if data.n > 1 else {}
                    value = {"index": counts[row], **choice, **{k: v for k, v in value.items() if k != "row"}}
                    counts[row] += 1
                yield ServerSentEventMessage(event=kind, data=msgspec.json.encode(value).decode())

        return event_stream(events())

    @post("/generate/batch", status_code=200)
    async def generate_batch(
        self, data: JSONBody[BatchGenerateRequest], request: Request, manager: Manager
    ) -> dict[str, Any]:
        """One batched generation; every prompt gets its own result in input order, and a prompt refused on its
        own (too long, no tokens) is reported in its own slot while the others run."""
        settings = manager.settings
        req = state_request(data, manager, data.return_hidden_states, caller=caller(request))
        req = json_formats_only(req, "a batch")
        params = generation_params(data, settings)
        entry = await manager.get_for(data)
        rid = request_id(request)

        async def work(s: Session) -> list[dict[str, Any]]:
            batch = Batch(texts=tuple(data.prompts), generation=params, add_special_tokens=data.add_special_tokens)
            return [
                {"index": i, "error": {**r.problem(), "request_id": rid}}
                if isinstance(r, LoomError)
                else {"index": i, **r[0]}
                for i, r in enumerate(await generate_rows(s, batch, req))
            ]

        results = await manager.run(entry, work, until=client_gone(request))
        return {"model": data.model, "count": len(results), "results": results}

    @post("/extract", status_code=200)
    async def extract(self, data: JSONBody[ExtractRequest], request: Request, manager: Manager) -> Response:
        req = state_request(data, manager, True, caller=caller(request))
        entry = await manager.get_for(data)

        async def work(s: Session) -> dict[str, Any] | bytes:
            model = s.model
            if data.return_logits and model.unembed is None:
                raise Unsupported(
                    f"return_logits: {data.model!r} has no LM head the server can read ({model.kind} model)",
                    field="return_logits",
                )
            batch = Batch(texts=(data.text,), add_special_tokens=data.add_special_tokens)
            capture = await req.resolved(model, batch, s.thread)
            batch = req.edited(model, batch)
            start = time.perf_counter()
            row = (await s.forward(batch, capture)).rows[0]

            def answer() -> dict[str, Any] | bytes:  # tensors encoded on a request thread
                fields, groups = state_payload(row, req, capture, model)
                payload = {
                    "model": data.model,
                    "token_ids": row.token_ids,
                    "tokens": token_texts(model.tokenizer, row.token_ids),
                    "token_count": len(row.token_ids),
                    **fields,
                    "metadata": {**model_metadata(model), **timing(start, 0)},
                }
                return finish(payload, groups, req)

            return await s.thread(answer)

        return respond(await manager.run(entry, work, until=client_gone(request)))
