"""RFC 9457 problem details for every error, each naming the field at fault; tracebacks stay in the log."""

from __future__ import annotations

import logging
import os
import re
import time
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.types import Message, Scope, Send

from loom_kernel.errors import LoomError, clip, out_of_memory

log = logging.getLogger("loom.api")
MEDIA_TYPE = "application/problem+json"
_NAMED = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


class Problem(msgspec.Struct, kw_only=True):
    """An RFC 9457 problem, the body of every error response (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    request_id: str | None = None
    field: str | None = None


# What each kind of route may answer besides its success, all as problem+json (the OpenAPI document lists them so
# that a client, and the schemathesis test, can rely on the list).
ANY_ROUTE = {500: "Internal error", 503: "Out of memory or shutting down (Retry-After)"}
WITH_BODY = {
    400: "Malformed request body",
    413: "Request body too large",
    415: "Not a body type this server accepts",
    422: "Invalid field",
}
NAMING_A_MODEL = {
    403: "Refused by the server's policy",
    404: "No such model, alias or path",
    409: "Conflicts with the model's state",
    422: "Invalid field",
    424: "A backend the model needs is not installed",
    429: "The model's queue is full (Retry-After)",
    504: "Past request_timeout",
    507: "Not enough memory to load the model",
}


def document_problems(app: Litestar, api_key: bool = False) -> None:
    """Declare every problem a route can answer, with the problem body, instead of Litestar's default 400. A
    handler served only under /v1/ answers OpenAI's statuses (``problem``)."""
    paths: dict[Any, set[str]] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            paths.setdefault(handler, set()).add(route.path)
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            statuses = dict(ANY_ROUTE)
            if "data" in handler.parsed_fn_signature.parameters or handler.opt.get("raw_body"):
                statuses |= WITH_BODY | NAMING_A_MODEL
            elif getattr(route, "path_parameters", None):
                statuses |= NAMING_A_MODEL | {400: "Malformed path or query parameter"}
            if api_key:
                statuses[401] = "Missing or wrong API key"
            if all(p.startswith("/v1/") for p in paths[handler]):
                for status in set(statuses) & set(OPENAI_STATUS):
                    statuses.setdefault(OPENAI_STATUS[status], statuses.pop(status))
            specs = {
                code: ResponseSpec(data_container=Problem, media_type=MEDIA_TYPE, description=text)
                for code, text in statuses.items()
            }
            handler.responses = {**specs, **(handler.responses or {})}


def begin_request(scope: Scope) -> str:
    """A new request's id, kept with its start time in the scope's state (problem bodies, metrics, the log)."""
    rid = os.urandom(8).hex()  # uuid4().hex[:16]'s format, without building a UUID
    state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
    state["request_id"] = rid
    state["started"] = time.perf_counter()
    return rid


def with_request_id(send: Send, rid: str) -> Send:
    """``send`` that adds ``X-Request-ID`` to the response's headers."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
        await send(message)

    return send_with_id


def request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def problem(
    request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    path = request.url.path
    detail = clip(detail)
    if path.startswith("/v1/"):  # OpenAI's clients: OpenAI's statuses, and its error object beside the problem
        status = OPENAI_STATUS.get(status, status)
        extra["error"] = openai_error(status, title, detail, extra.get("field"))
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    body["request_id"] = request_id(request)
    body["instance"] = path
    return Response(content=body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


# OpenAI answers a bad parameter with 400 (the SDK's BadRequestError, which clients catch); statuses it never sends
# become the nearest one it does.
OPENAI_STATUS = {413: 400, 415: 400, 422: 400, 424: 400, 507: 503}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "request_cancelled",
    504: "timeout_error",
}


def openai_error(status: int, title: str, detail: str, field: Any = None) -> dict[str, Any]:
    """OpenAI's ``error`` object for a problem: what its SDK, LangChain, llm and litellm show the user."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"message": detail, "type": kind, "param": field, "code": title.lower().replace(" ", "_")}


def on_loom_error(request: Request, exc: LoomError) -> Response:
    if exc.status >= 500:
        log.error("request %s failed: %s", request_id(request), exc.detail, exc_info=exc.__cause__ or exc)
    body = exc.problem()
    return problem(
        request,
        exc.status,
        body.pop("title"),
        body.pop("detail"),
        exc.headers() or None,
        **{k: v for k, v in body.items() if k not in ("type", "status")},
    )


def on_validation(request: Request, exc: ValidationException) -> Response:
    errors = exc.extra if isinstance(exc.extra, list) else []
    if not errors:
        # Litestar raises the same exception for a body that is not JSON at all.
        return problem(request, 400, "Malformed request body", str(exc.detail), field="body")
    first = errors[0] if isinstance(errors[0], dict) else {}
    message = str(first.get("message", exc.detail))
    field = str(first.get("key", "body"))
    if field == "data":
        named = _NAMED.search(message)
        field = named.group(1) if named else "body"
    return problem(request, 422, "Invalid field", f"{field}: {message}", field=field, errors=errors)


def on_http(request: Request, exc: HTTPException) -> Response:
    extra: dict[str, Any] = {"allowed": exc.extra} if exc.extra else {}
    detail = str(exc.detail)
    # A body that is not JSON (or stops short) is Litestar's SerializationException, re-raised as a 400.
    if exc.status_code == 400 and ("JSON" in detail or isinstance(exc.__cause__, SerializationException)):
        extra["field"] = "body"
    return problem(request, exc.status_code, HTTPStatus(exc.status_code).phrase, detail, **extra)


def on_unexpected(request: Request, exc: Exception) -> Response:
    if out_of_memory(exc):
        # The request was valid and another try (alone, or smaller) may fit: a 503 that says so, not a bare 500.
        log.error("request %s: out of memory", request_id(request), exc_info=exc)
        return problem(
            request,
            503,
            "Out of memory",
            "the device ran out of memory running this request; retry, or send fewer or shorter inputs "
            "(fewer layers or positions, a smaller max_tokens)",
            headers={"Retry-After": "1"},
        )
    log.error("request %s: unexpected error", request_id(request), exc_info=exc)
    return problem(
        request, 500, "Internal error", "the server hit an unexpected error; see its log for this request id"
    )


def on_recursion(request: Request, exc: RecursionError) -> Response:
    # msgspec gives up on JSON nested deeper than the interpreter's recursion limit: the body's fault, not ours.
    if "deserializ" in str(exc):
        return problem(request, 400, "Malformed request body", "body: the JSON is nested too deeply", field="body")
    return on_unexpected(request, exc)


EXCEPTION_HANDLERS = {
    LoomError: on_loom_error,
    RecursionError: on_recursion,
    ValidationException: on_validation,
    HTTPException: on_http,
    Exception: on_unexpected,
}


def error_response(request: Request, exc: Exception) -> Response:
    """The problem response the app's exception handlers give ``exc`` (the nearest class in its MRO)."""
    handler = next(EXCEPTION_HANDLERS[c] for c in type(exc).__mro__ if c in EXCEPTION_HANDLERS)
    return handler(request, exc)  # type: ignore[operator]
