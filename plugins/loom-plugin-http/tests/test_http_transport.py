"""The http transport binds a real TCP socket that a client can connect to."""

from __future__ import annotations

import socket

import loom_http
import pytest
from loom_http.tcp import TcpListener, format_url

from loom_kernel import LoomError, Transport
from loom_kernel.config import Settings


def connect_and_close(family: socket.AddressFamily, address: tuple) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(address)


def test_hook_offers_http_without_binding() -> None:
    t = loom_http.transport(settings=Settings(host="127.0.0.1", port=0))
    assert isinstance(t, Transport)
    assert t.name == "http"
    assert "127.0.0.1" in t.describe
    assert callable(t.bind) and callable(t.cleanup)


def test_binds_port_zero_to_a_real_listening_port() -> None:
    t = loom_http.transport(settings=Settings(host="127.0.0.1", port=0))
    sockets = t.bind()
    try:
        assert len(sockets) == 1
        host, port = sockets[0].getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        connect_and_close(socket.AF_INET, ("127.0.0.1", port))  # listening: the backlog accepts the connection
    finally:
        t.cleanup()
    assert sockets[0].fileno() == -1  # cleanup closed it


def test_ipv6_host() -> None:
    for host in ("::1", "[::1]"):
        listener = TcpListener(host, 0)
        (sock,) = listener.bind()
        try:
            assert sock.family == socket.AF_INET6
            port = sock.getsockname()[1]
            assert listener.url == f"http://[::1]:{port}"
            connect_and_close(socket.AF_INET6, ("::1", port))
        finally:
            listener.close()


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LoomError, match=rf"http: cannot listen on http://127.0.0.1:{port}: .*in use"):
            TcpListener("127.0.0.1", port).bind()


def test_port_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(LoomError, match=r"cannot listen on http://127\.0\.0\.1:70000"):
        TcpListener("127.0.0.1", 70000).bind()


def test_format_url() -> None:
    assert format_url("0.0.0.0", 8080) == "http://0.0.0.0:8080"
    assert format_url("::", 8080) == "http://[::]:8080"


async def test_accepted_connections_get_tcp_nodelay() -> None:
    """asyncio turns Nagle off only for sockets that say they are TCP; with Nagle on, a response written as headers
    then body waits ~40 ms for the client's delayed ACK on every request."""
    import asyncio

    t = loom_http.transport(settings=Settings(host="127.0.0.1", port=0))
    (sock,) = t.bind()
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname())
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        t.cleanup()
