"""``loom serve --transport ray``: join (or start) Ray, deploy the router and the replicas, wait for a signal."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs

from loom_kernel import ConfigError, LoomError

log = logging.getLogger("loom")


def application(settings: Any) -> Any:
    """The Ray Serve application: ``ray.replicas`` replicas of The Loom behind one router."""
    import ray
    from ray import serve

    from loom_ray import CPUS, GPUS, MAX_REPLICAS, REPLICAS
    from loom_ray.replica import replica_class
    from loom_ray.router import LoomRouter, Registry

    # One actor: restarted by Ray when it dies (the replicas report every few seconds, so it refills), else /health,
    # /models and /metrics would fail for as long as the application runs.
    registry = (
        ray.remote(Registry)
        .options(name="loom-registry", get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1)
        .remote()
    )
    fields = attrs.asdict(settings)
    replicas, most = REPLICAS.of(settings), MAX_REPLICAS.of(settings)
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if most > replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": most,
                "target_ongoing_requests": max(2, settings.max_batch_size // 2),
            }
        }
    loom = serve.deployment(
        replica_class(settings.max_models),
        name="LoomReplica",
        **scaling,
        ray_actor_options={"num_cpus": CPUS.of(settings), "num_gpus": GPUS.of(settings)},
        # The replica's own admission (max_queue, 429) decides; Ray's default of 5 would queue in front of it.
        max_ongoing_requests=max(settings.max_queue, 1) if settings.max_queue else 1024,
        health_check_period_s=2.0,
        **GRACE,
    ).bind(fields, registry)
    router = serve.deployment(
        LoomRouter,
        name="LoomRouter",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4096,
        **GRACE,
    )
    return router.bind(loom, registry, fields)


LOOPBACK = "127.0.0.1"
# A stopping replica checks for requests in flight this often, the first time only after one period: Ray's 2 s made
# every idle deployment wait 2 s, one deployment after another. Its timeout stays Ray's (20 s), for a replica that
# autoscaling retires under a request.
GRACE = {"graceful_shutdown_wait_loop_s": 0.05}
# How long ``loom serve`` waits, once told to stop, for the requests in flight to finish (a second signal: no
# longer) before Ray Serve's shutdown, which ends Ray's proxy and every connection through it at once.
DRAIN_S = 60.0


def private_local_cluster() -> None:
    """Before Ray is imported: the local cluster Loom starts listens on loopback only and requires Ray's token.

    Ray's GCS, raylet, workers, agents and metrics exporter bind the node's address, and Ray on Linux makes a
    loopback address the machine's outward one; with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-machine
    mode, the default on macOS and Windows) it keeps 127.0.0.1, and every one of them listens there alone. Token
    authentication is required explicitly (``RAY_AUTH_MODE=token``), and the token file is written (or made) mode
    0600: Ray writes it 0644, readable by every local user."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def can_listen(host: str, port: int) -> None:
    """Before Ray starts: whether Ray's proxy can listen on ``host``:``port`` here, as the http transport would (its
    error, exit 2). Ray's proxy finds out only after Ray has started, and ``serve.start`` then raises the proxy's
    failure, a traceback."""
    host = host.strip("[]")
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's own socket: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0..65535
            raise LoomError(f"ray: cannot listen on {url}: {getattr(exc, 'strerror', None) or exc}") from None


def start(settings: Any) -> None:
    """Ray up (joined or local) and the application deployed, Ray's proxy on ``host``:``port``."""
    from loom_ray import ADDRESS, REPLICAS

    address = ADDRESS.of(settings)
    if address is None:
        can_listen(settings.host, settings.port)  # a joined cluster's proxies listen on its nodes, maybe not here
        private_local_cluster()  # a cluster that --ray-address joins is the operator's network
    import ray
    from ray import serve

    from loom_ray.router import APP

    local = {"_node_ip_address": LOOPBACK} if address is None else {}
    try:
        ray.init(address=address, namespace="loom", ignore_reinit_error=True, include_dashboard=False, **local)
    except (ConnectionError, ValueError) as exc:  # an address Ray cannot parse, or no cluster answering there
        if address is None:
            raise
        raise ConfigError(
            f"ray.address (--ray-address, LOOM_RAY_ADDRESS): cannot join the Ray cluster at {address!r}: "
            f"{str(exc).splitlines()[0]}",
            field="ray_address",
        ) from None
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name=APP, route_prefix="/")
    log.info("serving on Ray at http://%s:%d (%d replica(s))", settings.host, settings.port, REPLICAS.of(settings))


def drain(forced: threading.Event) -> None:
    """The router answers new requests 503 and the requests in flight finish, for up to ``DRAIN_S`` or until
    ``forced``; then Ray Serve may shut down."""
    from ray import serve

    from loom_ray.router import APP

    try:
        router = serve.get_app_handle(APP)
        left = router.drain.remote().result(timeout_s=DRAIN_S)
        deadline = time.monotonic() + DRAIN_S
        if left:
            log.info("stopping: waiting for %d request(s) in flight (a second signal stops at once)", left)
        while left and not forced.wait(0.05) and time.monotonic() < deadline:
            left = router.in_flight.remote().result(timeout_s=DRAIN_S)
        if left:
            log.warning("stopping with %d request(s) still in flight", left)
    except Exception as exc:  # the router gone: nothing of it to wait for
        log.warning("stopping: the router did not drain (%s)", type(exc).__name__)


def stop() -> None:
    import ray
    from ray import serve

    # Only a Ray this process joined: serve.shutdown() without one would start a local cluster just to stop it (on
    # the machine's outward address, and for a minute on a busy machine) after a start that failed.
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def run(settings: Any) -> int:
    """The transport's ``serve``: deploy, then hold until SIGTERM or SIGINT."""
    from loom_kernel import configure_logging

    configure_logging(settings.log_level)
    if not sys.stderr.isatty():
        # Ray colours what it forwards from the replicas whatever its stream is: each line's prefix (unless
        # RAY_COLOR_PREFIX is 0) and the note that folds repeated lines (always). A log file gets every line, plain.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    done, forced = threading.Event(), threading.Event()
    previous: dict[int, Any] = {}

    def signalled(*_: Any) -> None:
        (forced if done.is_set() else done).set()

    try:
        start(settings)
        # After ray.init, which installs handlers of its own: these must be the ones that answer.
        previous = {sig: signal.signal(sig, signalled) for sig in (signal.SIGTERM, signal.SIGINT)}
        done.wait()
        drain(forced)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop()
    return 0
