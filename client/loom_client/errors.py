"""Problem details (RFC 9457) as typed exceptions: one class per status the server documents."""

from __future__ import annotations

from typing import Any

import httpx


class LoomError(Exception):
    """A request The Loom refused or failed; ``problem`` is the whole problem+json body."""

    status: int | None = None

    def __init__(self, problem: dict[str, Any], retry_after: float | None = None) -> None:
        self.problem = problem
        self.status = problem.get("status", self.status)
        self.title: str = problem.get("title", "")
        self.detail: str = problem.get("detail", "")
        self.field: str | None = problem.get("field")
        self.allowed: Any = problem.get("allowed")
        self.request_id: str | None = problem.get("request_id")
        self.retry_after = retry_after
        head = self.title if self.status is None else f"{self.status} {self.title}"
        super().__init__(f"{head}: {self.detail}" if self.detail else head)


class BadRequest(LoomError):
    status = 400


class Unauthorized(LoomError):
    status = 401


class Forbidden(LoomError):
    """403: what the server's policy refuses (remote code, a path outside ``allowed_paths``, a foreign origin)."""

    status = 403


class NotFound(LoomError):
    status = 404


class Conflict(LoomError):
    status = 409


class PayloadTooLarge(LoomError):
    status = 413


class InvalidField(LoomError):
    status = 422


class BackendMissing(LoomError):
    status = 424


class TooManyRequests(LoomError):
    status = 429


class ServerError(LoomError):
    status = 500


class ServiceUnavailable(LoomError):
    status = 503


class RequestTimeout(LoomError):
    status = 504


class InsufficientStorage(LoomError):
    """507: the server has no room for it, in memory (a model over the budget, an answer too large) or on disk (a
    store's entry). HTTP's own name for the status."""

    status = 507


InsufficientMemory = InsufficientStorage  # the name this status had before a full disk was one too


class LoomConnectionError(LoomError):
    """The server could not be reached or the connection broke (the httpx error is the ``__cause__``)."""


BY_STATUS: dict[int, type[LoomError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        InvalidField,
        BackendMissing,
        TooManyRequests,
        ServerError,
        ServiceUnavailable,
        RequestTimeout,
        InsufficientStorage,
    )
    if cls.status is not None
}


def problem_error(problem: dict[str, Any], retry_after: float | None = None) -> LoomError:
    status = problem.get("status")
    cls = BY_STATUS.get(status) if isinstance(status, int) else None
    if cls is None:
        cls = ServerError if isinstance(status, int) and status >= 500 else LoomError
    return cls(problem, retry_after)


def response_error(response: httpx.Response) -> LoomError:
    """The exception for a 4xx/5xx response (its body read), whatever its content type."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"title": response.reason_phrase, "detail": response.text[:500]}
    body.setdefault("status", response.status_code)
    retry = response.headers.get("retry-after")
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    return problem_error(body, retry_after)
