"""The Loom's Python client: every endpoint, hidden states as numpy arrays, sync or async, TCP or Unix socket."""

from loom_client.client import DEFAULT_URL, AsyncLoomClient, LoomClient
from loom_client.errors import (
    BackendMissing,
    BadRequest,
    Conflict,
    InsufficientMemory,
    InvalidField,
    LoomConnectionError,
    LoomError,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncLoomClient",
    "BackendMissing",
    "BadRequest",
    "Conflict",
    "InsufficientMemory",
    "InvalidField",
    "LoomClient",
    "LoomConnectionError",
    "LoomError",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServerError",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
]
