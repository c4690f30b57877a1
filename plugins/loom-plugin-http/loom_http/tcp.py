"""A TCP listening socket for IPv4 or IPv6 hosts."""

from __future__ import annotations

import socket

from loom_kernel import LoomError

BACKLOG = 2048  # uvicorn's default


def format_url(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class TcpListener:
    """Binds ``host:port`` on demand; ``url`` reports the real port once bound (port 0 asks the OS for one)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host.strip("[]")  # "[::1]" is how people write IPv6 hosts in URLs; bind wants "::1"
        self.port = port
        self.sock: socket.socket | None = None

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def url(self) -> str:
        port = self.sock.getsockname()[1] if self.sock is not None else self.port
        return format_url(self.host, port)

    def bind(self) -> list[socket.socket]:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it every
        # response whose headers and body go out in two writes waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(self.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            # A restarted server must not wait out TIME_WAIT connections of the previous one.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
        except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0..65535
            sock.close()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise LoomError(f"http: cannot listen on {format_url(self.host, self.port)}: {reason}") from None
        self.sock = sock
        return [sock]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
