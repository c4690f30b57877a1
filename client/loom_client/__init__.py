"""The Loom's Python client: every endpoint, hidden states as numpy arrays, sync or async, TCP or Unix socket; and
``RemoteModel``, a model on the server that reads like TransformerLens's HookedTransformer."""

from loom_client.client import DEFAULT_URL, AsyncLoomClient, LoomClient
from loom_client.errors import (
    BackendMissing,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientMemory,
    InsufficientStorage,
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
from loom_client.remote import ActivationCache, RemoteModel, act_name, ops

__all__ = [
    "DEFAULT_URL",
    "ActivationCache",
    "AsyncLoomClient",
    "BackendMissing",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "InsufficientMemory",
    "InsufficientStorage",
    "InvalidField",
    "LoomClient",
    "LoomConnectionError",
    "LoomError",
    "NotFound",
    "PayloadTooLarge",
    "RemoteModel",
    "RequestTimeout",
    "ServerError",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "act_name",
    "ops",
]
