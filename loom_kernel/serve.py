"""Collect the transports plugins offer, bind the selected ones, and run ONE uvicorn server over all sockets.

One server means one app and one lifespan: a model loaded through the Unix socket is the same model the TCP
clients see. Transports are cleaned up (socket files removed) however the server stops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator

import pluggy

from loom_kernel.config import ConfigError, Settings
from loom_kernel.errors import InvalidField, LoomError
from loom_kernel.logs import LEVELS, configure_logging
from loom_kernel.types import Transport

log = logging.getLogger("loom")


def offered_transports(settings: Settings, pm: pluggy.PluginManager) -> dict[str, Transport]:
    offered: dict[str, Transport] = {}
    for t in pm.hook.transport(settings=settings):
        if t is not None:
            offered.setdefault(t.name, t)  # pluggy calls the last registered first: it wins a name clash
    return offered


def select_transports(settings: Settings, pm: pluggy.PluginManager) -> list[Transport]:
    """The transports named in ``settings.transports``, in that order; an unknown name lists the known ones."""
    offered = offered_transports(settings, pm)
    known = ", ".join(sorted(offered)) or "none installed (docs/transports.md lists the transport plugins)"
    wanted = list(dict.fromkeys(settings.transports))  # "both" plus "http" must not bind the port twice
    if not wanted:
        raise ConfigError(f"no transport selected; known transports: {known}", field="transports")
    for name in wanted:
        if name not in offered:
            raise ConfigError(
                f"unknown transport {name!r}; known transports: {known}", field="transports", allowed=sorted(offered)
            )
    return [offered[name] for name in wanted]


def listen_url(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def bind_all(transports: list[Transport]) -> tuple[list[socket.socket], list[Transport]]:
    """Bind every transport; when one fails, undo the ones already bound before raising."""
    sockets: list[socket.socket] = []
    bound: list[Transport] = []
    try:
        for t in transports:
            try:
                got = list(t.bind())
            except OSError as exc:  # a third-party transport that lets the OS error escape
                raise LoomError(f"{t.name}: cannot bind: {exc}") from None
            bound.append(t)
            for sock in got:
                log.info("listening on %s (%s transport)", listen_url(sock), t.name)
            sockets.extend(got)
    except BaseException:
        cleanup_all(bound)
        raise
    return sockets, bound


def cleanup_all(transports: list[Transport]) -> None:
    for t in reversed(transports):
        if t.cleanup is None:
            continue
        try:
            t.cleanup()
        except Exception:  # one transport failing to clean up must not keep the others' files around
            log.exception("cleanup of transport %s failed", t.name)


class _Signals:
    """SIGTERM/SIGINT before uvicorn runs exit at once; while it runs, uvicorn shuts down gracefully and then
    re-raises the signal to the handler it found, which is this one: it records it instead of killing the
    process, so the ``finally`` that removes socket files still runs."""

    def __init__(self) -> None:
        self.deferred = False
        self.received: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        self.received = signum
        if not self.deferred:
            raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def check_device(settings: Settings) -> None:
    """The default device exists on this machine: every load that names none would be a 422 otherwise. Checked
    here, not in Settings: a config file may be shared by machines with and without GPUs, and a transport that
    runs the app elsewhere (Ray) checks on its replicas' machines."""
    from loom_kernel.devices import resolve_device

    try:
        resolve_device(settings.device())
    except InvalidField as exc:
        raise ConfigError(
            f"default_device: {exc.detail.removeprefix('device: ')}", field="default_device", allowed=exc.allowed
        ) from None


def serve(settings: Settings, pm: pluggy.PluginManager | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status (0 after a graceful shutdown)."""
    import uvicorn

    from loom_kernel.api import create_app
    from loom_kernel.plugins import create_plugin_manager

    if settings.log_level not in LEVELS:
        raise ConfigError(f"log_level: {settings.log_level!r} is not one of {', '.join(LEVELS)}", field="log_level")
    configure_logging(settings.log_level)
    pm = pm or create_plugin_manager()
    transports = select_transports(settings, pm)
    elsewhere = [t.name for t in transports if t.serve is not None]
    if elsewhere:
        if len(transports) > 1:
            raise ConfigError(
                f"transports: {elsewhere[0]} runs the app on its own and cannot be combined with others",
                field="transports",
                allowed=elsewhere[:1],
            )
        return int(transports[0].serve() or 0)
    check_device(settings)
    bound: list[Transport] = []
    with _Signals().installed() as signals:
        try:
            sockets, bound = bind_all(transports)
            app = create_app(pm=pm, settings=settings)
            server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level=settings.log_level))
            signals.deferred = True
            server.run(sockets=sockets)
        finally:
            cleanup_all(bound)
    return 0
