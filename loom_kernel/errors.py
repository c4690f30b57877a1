"""Every error the kernel or a plugin raises on purpose, each with the HTTP status it maps to."""

from __future__ import annotations

from typing import Any


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) is a device running out of memory (torch's OutOfMemoryError or its text)."""
    text = f"{type(exc).__name__} {exc} {exc.__cause__!r}".lower()
    return "out of memory" in text or "outofmemory" in text


class LoomError(Exception):
    status = 500
    title = "Internal error"

    def __init__(self, detail: str, *, field: str | None = None, allowed: Any = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.allowed = allowed
        self.extra = extra

    def headers(self) -> dict[str, str]:
        """HTTP headers the response carries besides the problem body."""
        return {}

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "about:blank", "title": self.title, "status": self.status}
        body["detail"] = self.detail
        if self.field is not None:
            body["field"] = self.field
        if self.allowed is not None:
            body["allowed"] = self.allowed
        body.update(self.extra)
        return body


class BadRequest(LoomError):
    status = 400
    title = "Bad request"


class InvalidField(LoomError):
    """A field has a value outside what is allowed (unknown layer, loader, format, ...)."""

    status = 422
    title = "Invalid field"


class Forbidden(LoomError):
    status = 403
    title = "Forbidden"


class ModelNotFound(LoomError):
    status = 404
    title = "Model not found"


class Conflict(LoomError):
    status = 409
    title = "Conflict"


class Unsupported(LoomError):
    """The request is well formed but the chosen model or loader cannot do it."""

    status = 422
    title = "Not supported by this model"


class MissingBackend(LoomError):
    """A plugin or library is not installed; ``detail`` says what to pip install."""

    status = 424
    title = "Backend not installed"


class LoadFailed(LoomError):
    status = 500
    title = "Model failed to load"


class InsufficientStorage(LoomError):
    status = 507
    title = "Insufficient storage"


class ServiceUnavailable(LoomError):
    status = 503
    title = "Service unavailable"


class TooManyRequests(LoomError):
    """A model's queue is full; ``retry_after`` seconds is when it is likely to have room."""

    status = 429
    title = "Too many requests"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.extra.get("retry_after", 1))}


class RequestTimeout(LoomError):
    """The request ran past the server's ``request_timeout``; its work was stopped."""

    status = 504
    title = "Request timed out"
