"""Every error the kernel or a plugin raises on purpose, each with the HTTP status it maps to."""

from __future__ import annotations

from typing import Any

# An error detail repeats at most this much of an input (a text, a list, a name): a 5 MB text must not come back
# as a 5 MB error, nor fill the log.
ECHO_CHARS = 80
# ... and is at most this long in all (the backstop for a detail that repeats an input without ``echo``).
MAX_DETAIL_CHARS = 2048


def echo(value: Any) -> str:
    """``value`` as an error detail shows it: its repr, cut to ``ECHO_CHARS`` with the whole length said."""
    text = repr(value)
    if len(text) <= ECHO_CHARS:
        return text
    size = f"{len(value)} items" if isinstance(value, list | tuple | dict) else f"{len(text)} characters"
    if isinstance(value, str):
        size = f"{len(value)} characters"
    return f"{text[:ECHO_CHARS]}... ({size})"


def clip(detail: str) -> str:
    """``detail`` cut to ``MAX_DETAIL_CHARS``."""
    if len(detail) <= MAX_DETAIL_CHARS:
        return detail
    return f"{detail[:MAX_DETAIL_CHARS]}... (cut from {len(detail)} characters)"


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
        body["detail"] = clip(self.detail)
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


class BadModel(InvalidField):
    """The model's own files are at fault (its config, weights or manifest): no retry will load it."""

    title = "Model cannot be loaded"


class InsufficientStorage(LoomError):
    status = 507
    title = "Insufficient storage"


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


def load_error(exc: BaseException, what: str) -> LoomError:
    """The error a load that raised ``exc`` answers with; ``what`` names the load ("transformers could not load
    'org/name' from /path"). Loaders call it on what their library raised, and the model manager on what a loader let
    through, so that a load failure means the same status whichever loader met it.

    What the model's own files cause is a 4xx naming ``model``: a config.json the library rejects, weights that do
    not match the config or cannot be read (422), code the model would run without trust_remote_code (403), a pickle
    that holds more than tensors (422, and it is never unpickled). A library that is not installed is a 424; the rest,
    running out of memory included (the manager evicts and retries that one), is a 500."""
    chain: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        e = pending.pop(0)
        if e is not None and all(e is not seen for seen in chain):
            chain.append(e)
            pending += [e.__cause__, e.__context__]
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    text = "\n".join(str(e) for e in chain)
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    if out_of_memory(exc):
        return LoadFailed(f"model: {what}: {cause}", field="model")
    if "trust_remote_code" in text and "ValueError" in names:
        return Forbidden(
            f"model: {what}: refused: the model needs code from its own files to load (an auto_map in its "
            "config files), which this server runs only when told to: set models.trust_remote_code: true in the "
            "server's config file, for models whose code you trust",
            field="model",
        )
    if "Weights only load failed" in text:
        blocked = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        return BadModel(
            f"model: {what}: refused as unsafe: its checkpoint is a pickle that holds more than tensors, and "
            f"unpickling it could run code ({blocked or 'weights_only refused it'}); only plain tensors are read "
            "from pickles: convert the checkpoint to safetensors",
            field="model",
        )
    if "StrictDataclassError" in names:  # transformers 5 checks each config field's type
        return BadModel(f"model: {what}: its config.json is invalid: {cause}", field="model")
    if "JSONDecodeError" in names:
        return BadModel(f"model: {what}: one of its JSON files is invalid: {cause}", field="model")
    if "size mismatch" in text:
        return BadModel(f"model: {what}: the checkpoint does not match its config: {cause}", field="model")
    if "ignore_mismatched_sizes" in text:  # transformers 5 logs the tensors and raises only this
        return BadModel(
            f"model: {what}: the checkpoint does not match its config: tensors in its weights have other shapes "
            "than its config.json describes",
            field="model",
        )
    if names & {"SafetensorError", "UnpicklingError"}:
        return BadModel(f"model: {what}: a weights file cannot be read: {cause}", field="model")
    if "no file named" in text:  # a config.json without the weights it describes
        return BadModel(f"model: {what}: no weights file beside its config: {cause}", field="model")
    if isinstance(exc, ImportError):
        return MissingBackend(f"model: {what}: a library it needs is not installed: {cause}", field="model")
    return LoadFailed(f"model: {what}: {cause}", field="model")
