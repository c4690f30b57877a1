"""LoomClient (sync) and AsyncLoomClient: one httpx client each, over TCP or a Unix socket."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import httpx

from loom_client.endpoints import Call, Endpoints, request_args
from loom_client.errors import LoomConnectionError, response_error
from loom_client.sse import DONE, EventParser

DEFAULT_URL = "http://127.0.0.1:8080"


def connection(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    """httpx client arguments for ``url``: ``http(s)://host:port`` or ``unix:///path/to/socket``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A long read timeout: a generation may queue behind others (the server's own request_timeout is 600 s).
    args: dict[str, Any] = {"headers": headers, "timeout": httpx.Timeout(timeout, connect=10.0)}
    if url.startswith("unix://"):
        path = url.removeprefix("unix://")
        if not path.startswith("/"):
            raise ValueError(f"a unix URL names an absolute socket path, unix:///path/to/socket; got {url!r}")
        return {**args, "base_url": "http://loom", "uds": path}
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"expected http://host:port, https://... or unix:///path/to/socket; got {url!r}")
    return {**args, "base_url": url.rstrip("/")}


def transport_error(exc: httpx.TransportError, url: str) -> LoomConnectionError:
    detail = f"{url}: {exc!r}"
    if url.startswith("unix://") and not os.path.exists(url.removeprefix("unix://")):
        detail = (
            f"{url}: no such socket; is a server listening there? (`loom serve --transport both --unix-socket "
            f"{url.removeprefix('unix://')}`; a plain `loom serve` listens on TCP only)"
        )
    error = LoomConnectionError({"status": None, "title": "Connection error", "detail": detail})
    error.__cause__ = exc
    return error


class LoomClient(Endpoints):
    """A client for a Loom server: ``LoomClient("http://127.0.0.1:8080")`` or ``LoomClient("unix:///path/loom.sock")``.

    ``hidden_state_format`` is what the client asks for when a call names none (base64: exact and compact; every
    format decodes to the same arrays). Use as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 660.0,
        hidden_state_format: str = "base64",
    ) -> None:
        self.url = url
        self.hidden_state_format = hidden_state_format
        args = connection(url, api_key, timeout)
        uds = args.pop("uds", None)
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=uds) if uds else None, **args)

    def _call(self, call: Call) -> Any:
        try:
            response = self._http.request(call.method, call.path, **request_args(call))
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc
        if response.status_code >= 400:
            raise response_error(response)
        return call.read(response)

    def _stream(self, call: Call) -> Iterator[Any]:
        try:
            with self._http.stream(call.method, call.path, **request_args(call)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise response_error(response)
                parser = EventParser()
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is DONE:
                        return
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLoomClient(Endpoints):
    """The same API as LoomClient, for asyncio: ``await c.extract(...)``, ``async for ev in c.stream(...)``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 660.0,
        hidden_state_format: str = "base64",
    ) -> None:
        self.url = url
        self.hidden_state_format = hidden_state_format
        args = connection(url, api_key, timeout)
        uds = args.pop("uds", None)
        self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=uds) if uds else None, **args)

    async def _call(self, call: Call) -> Any:
        try:
            response = await self._http.request(call.method, call.path, **request_args(call))
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc
        if response.status_code >= 400:
            raise response_error(response)
        return call.read(response)

    async def _stream(self, call: Call) -> AsyncIterator[Any]:
        try:
            async with self._http.stream(call.method, call.path, **request_args(call)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise response_error(response)
                parser = EventParser()
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is DONE:
                        return
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise transport_error(exc, self.url) from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
