"""What stands between a web page and the server: the request guard, and the optional API key.

The threat is a server on loopback that any page the user's browser opens can reach. A page may send "simple"
cross-origin requests (a POST with a ``text/plain`` body, no preflight) and, by rebinding a name of its own to
127.0.0.1, even read the answers. ``Guard`` refuses, before any routing:

- a ``Host`` that is not one of the server's own names (loopback names, the address the connection came in on, the
  configured ``host``, ``server.allowed_hosts``): a rebound name is the attacker's, never ours (403, field ``host``);
- whatever the method, a browser ``Origin`` that is neither the server's own origin nor one of
  ``server.cors_origins`` (403, field ``origin``): a GET does work too (``/loaders/probe`` reads the disk and may
  ask the hub), and a page need not read an answer to make the server do it;
- without an ``Origin``, a request the browser marks as sent by another site's page (``Sec-Fetch-Site:
  cross-site`` or ``same-site``), unless it opens a page in the user's window (403, field ``sec-fetch-site``): an
  image, a script, a frame or a ``no-cors`` fetch sends no ``Origin`` on a GET;
- a body that is not ``application/json`` (or a safetensors file's type, for ``POST /probes/{name}``): types a
  cross-origin page cannot send without a preflight that CORS then refuses (415, field ``content-type``).

A Unix socket is exempt from the ``Host`` rule: no browser can open one.

With ``api_key`` set, every endpoint but /health needs ``Authorization: Bearer <key>``. The key is compared in
constant time (``hmac.compare_digest``) so that response timing does not reveal how much of a guess was right.
/health stays open so that a load balancer or a supervisor can check the process, and so does a route handler whose
``opt`` has ``"public": True``: files that hold no data, such as the viewer's page, which a browser opens without
sending a key (the page then asks for it and sends it on every request it makes).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from litestar import Litestar, Request
from litestar.types import ASGIApp, Receive, Scope, Send

from loom_kernel.api.problems import begin_request, error_response, with_request_id
from loom_kernel.calls import CALLER
from loom_kernel.errors import Forbidden, LoomError

OPEN_PATHS = frozenset({"/health"})
WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# None of them is a CORS "simple" type (text/plain, a form): a page must ask first, and CORS refuses it.
BODY_TYPES = frozenset({b"application/json", b"application/vnd.loom.safetensors", b"application/octet-stream"})
# Fetch Metadata: the browser's word on whose page sent a request, on every request to a loopback or https address.
OTHER_SITES = frozenset({b"cross-site", b"same-site"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


class UnsupportedMediaType(LoomError):
    status = 415
    title = "Unsupported media type"


@attrs.define(frozen=True)
class Guard:
    """The Host, Origin and Content-Type rules; ``refusal(scope)`` is the error for a request they refuse."""

    hosts: frozenset[str]
    origins: frozenset[str]

    @classmethod
    def of(cls, host: str, allowed_hosts: Iterable[str], cors_origins: Iterable[str] | None) -> Guard:
        names = set(LOOPBACK_NAMES) | {_bare(h) for h in allowed_hosts}
        if host not in ANY_ADDRESS:
            names.add(_bare(host))
        return cls(hosts=frozenset(names), origins=frozenset(o.rstrip("/").lower() for o in cors_origins or ()))

    def refusal(self, scope: Scope) -> LoomError | None:
        host = origin = content_type = None
        fetch: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
            elif name.startswith(b"sec-fetch-"):
                fetch[name] = value.lower()
        server = scope.get("server")
        over_socket = server is not None and server[1] is None  # a Unix socket: (path, None)
        if host is not None and not over_socket and not self._own_host(host, server):
            return Forbidden(
                f"host: {host!r} is not a name of this server; a browser sends a name it does not own after DNS "
                "rebinding. Add it to server.allowed_hosts (LOOM_ALLOWED_HOSTS) if it is really this server's",
                field="host",
                allowed=sorted(self.hosts),
            )
        method = scope["method"]
        if origin is not None and not self._own_origin(origin, host):
            return Forbidden(
                f"origin: requests from {origin!r} are not accepted here; allow the page's origin with "
                "server.cors_origins (LOOM_CORS_ORIGINS)",
                field="origin",
                allowed=sorted(self.origins),
            )
        site = fetch.get(b"sec-fetch-site", b"")
        # A page of server.cors_origins sends its Origin (CORS mode), checked above. A page opened in the user's own
        # window (a link to /viewer followed from elsewhere) is in plain sight, and the user's to open.
        opens_a_page = fetch.get(b"sec-fetch-mode") == b"navigate" and fetch.get(b"sec-fetch-dest") == b"document"
        if origin is None and site in OTHER_SITES and not (opens_a_page and method in ("GET", "HEAD")):
            return Forbidden(
                f"sec-fetch-site: {site.decode('latin-1')!r}: the browser says another site's page sent this "
                "request; a page allowed by server.cors_origins sends its requests with fetch() in CORS mode",
                field="sec-fetch-site",
                allowed=["none", "same-origin"],
            )
        if method in WITH_BODY:
            media = (content_type or b"").split(b";")[0].strip().lower()
            if media not in BODY_TYPES:
                return UnsupportedMediaType(
                    f"content-type: {media.decode('latin-1') or 'none'!r} is not accepted; send the body as JSON "
                    "with Content-Type: application/json",
                    field="content-type",
                    allowed=sorted(t.decode() for t in BODY_TYPES),
                )
        return None

    def _own_host(self, host: str, server: tuple[str, int | None] | None) -> bool:
        name = _bare(host)
        return "*" in self.hosts or name in self.hosts or (server is not None and name == _bare(server[0]))

    def _own_origin(self, origin: str, host: str | None) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        scheme, _, netloc = origin.partition("://")
        return host is not None and scheme in ("http", "https") and netloc == host.lower()


def guarded(handler: ASGIApp, guard: Guard) -> ASGIApp:
    """The app's ASGI handler behind ``guard``: every HTTP request gets its id here (so a 404 or 405 from the router
    carries it too), and a refused request gets the app's own problem response before any routing (so an unknown
    path is refused alike)."""

    async def guarded_handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await handler(scope, receive, send)
            return
        send = with_request_id(send, begin_request(scope))
        refused = guard.refusal(scope)
        if refused is None:
            await handler(scope, receive, send)
            return
        await refuse(scope, receive, send, refused)

    return guarded_handler


async def refuse(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    """The app's own problem response for ``exc`` (an OpenAI error object on /v1 included), sent without routing:
    what the guard answers here, and what a front end (the Ray router) answers for the app."""
    request: Request = Request(scope, receive, send)
    response = error_response(request, exc).to_asgi_response(app=None, request=request)
    await response(scope, receive, send)


def route_of(app: Litestar, method: str, path: str) -> Any:
    """The route handler ``method`` and ``path`` reach in ``app``, found as the app's router finds it; None for no
    route (the app answers 404 or 405). What a front end that runs before the app (the Ray router) asks of it."""
    try:
        return app.asgi_router.handle_routing(path, method)[1]
    except Exception:
        return None


def body_limit(app: Litestar, handler: Any) -> int:
    """The most bytes a request's body may have on the route of ``handler``: the route's own
    ``opt["max_body"](settings)`` where it declares one (a file upload), else ``max_body_mb``."""
    settings = app.state.settings
    limit = handler.opt.get("max_body") if handler is not None else None
    return int(limit(settings)) if callable(limit) else int(settings.max_body_mb * 2**20)


def _bare(host: str) -> str:
    """A Host header's name, without port, brackets or a trailing dot, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class Unauthorized(LoomError):
    status = 401
    title = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="loom"'}


def authorized(header: bytes, key: bytes) -> bool:
    scheme, _, token = header.partition(b" ")
    # compare_digest runs the same time for any token of a given length, and always when the lengths differ.
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def public(handler: Any) -> bool:
    """Whether a route handler is marked ``opt={"public": True}`` (served without the key)."""
    return handler is not None and handler.opt.get("public") is True


def key_owner(key: str) -> str:
    """The name a key's stored entries go under: a digest, so that the store never holds the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def caller(request: Any) -> str:
    """Who sent ``request``: its API key's owner name (``key_owner``), or "" on a server without keys."""
    return request.scope.get("state", {}).get("caller", "")


def key_refusal(scope: Scope, keys: Sequence[str] | str | None, handler: Any = None) -> Unauthorized | None:
    """The 401 for a request without one of the API ``keys`` (None: no key, nothing refused) to a route that needs
    it (every one but /health and those ``public``; ``handler``: the route's, where it is known). A request with a
    key is marked with its owner (``caller``)."""
    keys = [keys] if isinstance(keys, str) else list(keys or ())
    if not keys:
        return None
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
    # Every key compared, whichever matches: the time taken says nothing about which one, or how many there are.
    matched = [key for key in keys if authorized(header, key.encode())]
    if matched:
        owner = key_owner(matched[0])
        scope.setdefault("state", {})["caller"] = owner  # type: ignore[typeddict-item]
        CALLER.set(owner)  # for the scheduler, which gives owners turns (the request's own task and what it starts)
    if scope["path"] in OPEN_PATHS or public(handler or scope.get("route_handler")) or matched:
        return None
    return Unauthorized(
        "authorization: this server needs an API key: send Authorization: Bearer <key>"
        if not header
        else "authorization: the API key is not valid",
        field="authorization",
    )


def api_key_middleware(keys: Sequence[str]) -> Callable[[ASGIApp], ASGIApp]:
    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and (refused := key_refusal(scope, keys)) is not None:
                raise refused
            await app(scope, receive, send)

        return middleware

    return factory
