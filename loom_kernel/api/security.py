"""The optional API key: with ``api_key`` set, every endpoint but /health needs ``Authorization: Bearer <key>``.

The key is compared in constant time (``hmac.compare_digest``) so that response timing does not reveal how much
of a guess was right. /health stays open so that a load balancer or a supervisor can check the process.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from litestar.types import ASGIApp, Receive, Scope, Send

from loom_kernel.errors import LoomError

OPEN_PATHS = frozenset({"/health"})


class Unauthorized(LoomError):
    status = 401
    title = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="loom"'}


def authorized(header: bytes, key: bytes) -> bool:
    scheme, _, token = header.partition(b" ")
    # compare_digest runs the same time for any token of a given length, and always when the lengths differ.
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def api_key_middleware(key: str) -> Callable[[ASGIApp], ASGIApp]:
    expected = key.encode()

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
                header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                if not authorized(header, expected):
                    raise Unauthorized(
                        "authorization: this server needs an API key: send Authorization: Bearer <key>"
                        if not header
                        else "authorization: the API key is not valid",
                        field="authorization",
                    )
            await app(scope, receive, send)

        return middleware

    return factory
