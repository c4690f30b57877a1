"""Ray Serve's one socket that ignores the node's address, kept on loopback in Loom's local cluster."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loom")


def keep_serve_on_loopback() -> None:
    """In a deployment's process, before Ray Serve finishes starting it: where the node's address is 127.0.0.1
    (the local cluster Loom starts), Ray Serve's inter-deployment gRPC server binds 127.0.0.1 instead of ``[::]``,
    which Ray 2.60 hard-codes whatever the node's address. That server checks Ray's token, but a local cluster's
    sockets stay on loopback. A cluster joined with ``--ray-address`` is left as Ray makes it."""
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    from ray.serve._private import replica as serve_replica

    bind = getattr(serve_replica, "add_port_to_grpc_server", None)
    if bind is None:
        log.warning("Ray Serve no longer has add_port_to_grpc_server: its replicas' gRPC port may not be on loopback")
        return
    if getattr(bind, "loom_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> Any:
        return bind(server, address.replace("[::]:", "127.0.0.1:", 1))

    on_loopback.loom_loopback = True  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = on_loopback
