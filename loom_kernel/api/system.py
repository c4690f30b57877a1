"""Health, plugins and loader ranking: what the server is and what it could load."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

from litestar import Controller, Request, get
from litestar.params import FromPath

from loom_kernel.api.deps import Manager, Plugins
from loom_kernel.entry import State
from loom_kernel.installed import describe_plugins, loader_names
from loom_kernel.version import __version__


def path_model_id(request: Request, prefix: str, model_id: str) -> str:
    """Everything after ``prefix`` in the raw path: ``/models/org/name`` is ``org/name`` and an absolute path
    arrives with its slash doubled, ``/models//data/ckpt`` is ``/data/ckpt`` (the router collapses ``//``, so
    the path parameter alone cannot tell them apart)."""
    raw = request.scope.get("raw_path")
    if raw:
        path = unquote(raw.decode("latin-1").partition("?")[0])
        if path.startswith(prefix):
            return path[len(prefix) :]
    return model_id[1:] if model_id.startswith("/") else model_id


def gpu_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False, "count": 0, "devices": []}
    if not torch.cuda.is_available():
        return {"available": False, "count": 0, "devices": []}
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": props.name,
                "memory_total_bytes": props.total_memory,
                "memory_allocated_bytes": torch.cuda.memory_allocated(i),
                "memory_reserved_bytes": torch.cuda.memory_reserved(i),
            }
        )
    return {"available": True, "count": len(devices), "devices": devices}


class SystemController(Controller):
    tags = ["system"]

    @get("/health", sync_to_thread=False)
    def health(self, manager: Manager) -> dict[str, Any]:
        settings = manager.settings
        gpu = gpu_info()
        notes = []
        if settings.default_device == "auto" and not gpu["available"]:
            notes.append("default_device is auto and no CUDA device is available: models load on cpu")
        return {
            "status": "ok",
            "version": __version__,
            "default_device": settings.device(),
            "notes": notes,
            "gpu": gpu,
            "memory": manager.memory_report(),
            "loaded_models": manager.loaded_ids(),
            "loading_models": [e.model_id for e in manager.entries.values() if e.state == State.LOADING],
            "uptime_seconds": round(time.monotonic() - manager.started, 3),
        }

    @get("/plugins", sync_to_thread=False)
    def plugins(self, pm: Plugins) -> dict[str, Any]:
        return {"plugins": describe_plugins(pm)}

    @get("/loaders", sync_to_thread=False)
    def loaders(self, pm: Plugins) -> dict[str, Any]:
        rows = {r["name"]: r for r in describe_plugins(pm)}
        return {
            "loaders": [
                {"name": name, "package": rows[name]["package"], "version": rows[name]["version"]}
                for name in loader_names(pm)
            ],
            "selection": "each plugin's probe scores a model 0..1; the highest score wins, ties by loader name; "
            "a request's `loader` field overrides the ranking",
        }

    @get("/loaders/probe/{model_id:path}", sync_to_thread=True)
    def probe(self, model_id: FromPath[str], request: Request, manager: Manager) -> dict[str, Any]:
        return manager.probe_report(path_model_id(request, "/loaders/probe/", model_id))
