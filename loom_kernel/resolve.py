"""Build a ``ModelRef`` from a model id: a local directory, an alias, a hub id in the local HF cache, or a
``custom_models`` entry of the server config.

Only small JSON files are read (config.json, modules.json, loom.json); weights are never touched.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loom_kernel.errors import Forbidden, InvalidField, ModelNotFound
from loom_kernel.types import ModelRef

SMALL_FILES = ("config.json", "modules.json", "loom.json", "config_sentence_transformers.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
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


def _inside(path: Path, allowed: list[str] | None) -> bool:
    if allowed is None:
        return True
    real = path.resolve()
    return any(real.is_relative_to(Path(root).expanduser().resolve()) for root in allowed)


def _outside(path: Path | str, allowed: list[str]) -> Forbidden:
    return Forbidden(f"model: {path} is outside models.allowed_paths", field="model", allowed=[str(a) for a in allowed])


def check_allowed(path: Path, allowed: list[str] | None, sent: str) -> None:
    """403 unless ``path`` lies under one of ``allowed`` (None: anywhere), naming the id as ``sent`` (an expanded
    ``~user`` would say whose home exists). Callers check this before they look at the disk, so that a caller outside
    the allowed paths learns nothing about what exists there."""
    if allowed is not None and not _inside(path, allowed):
        raise _outside(sent, allowed)


def _expand(target: str, allowed: list[str] | None) -> Path:
    """``target`` as a path, ``~user`` expanded. A user that does not exist names no directory: a 404, or, under
    ``allowed_paths``, the same 403 as an existing home outside them (which users exist is not for callers to learn)."""
    try:
        return Path(target).expanduser()
    except RuntimeError:  # no such user, or no home directory to expand "~" to
        if allowed is not None:
            raise _outside(target, allowed) from None
        raise ModelNotFound(f"model: no directory {target} (its ~ names no home directory)", field="model") from None


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory. A name longer than the file system accepts is a 422, not a 404: no directory
    or hub repository can ever have it, so the id itself is malformed. Other errors (no permission to look) read as
    no directory."""
    try:
        return path.is_dir()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidField(
                f"model: a model id of {len(str(path))} characters is longer than any path this system accepts",
                field="model",
            ) from None
        return False


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
        path = _expand(str(where), allowed_paths)
        check_allowed(path, allowed_paths, str(where))
        if not _is_dir(path):
            raise ModelNotFound(f"model: custom_models.{model_id}.path: no directory {where}", field="model")
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


def source_key(ref: ModelRef) -> str:
    """What a model is, whatever name reached it (an alias, the embedded model's three names, a path with a trailing
    slash or through a symlink): the directory it loads from, fully resolved (a hub snapshot's directory names its
    revision), or a ``custom_models`` entry's name, its manifest being the config's. Reads the disk."""
    if ref.source == "config":
        return f"custom_models:{ref.id}"
    if ref.path is not None:
        return str(ref.path.resolve())
    return f"{ref.hub_id or ref.id}@{ref.revision or ''}"


def resolve_model(
    model_id: str,
    revision: str | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
    allowed_paths: list[str] | None = None,
    custom_models: Mapping[str, Mapping[str, Any]] | None = None,
    shipped: Mapping[str, str] | None = None,
) -> ModelRef:
    """``aliases`` maps an id to a directory or hub id; ``custom_models`` an id to a manifest (the config file's
    section of that name); ``shipped`` a name to the directory of a model a plugin ships (the ``model_sources``
    hook).

    An id that is a path (absolute, or starting with "." or "~") is checked against ``allowed_paths`` before the
    disk is, so outside them it is a 403 whether or not it exists. A bare relative id ("org/name") is a local
    directory only when it lies inside them; elsewhere it is read as a hub id."""
    if not model_id or not model_id.strip():
        raise ModelNotFound("model: an empty model id", field="model")
    if custom_models and model_id in custom_models:
        return custom_model_ref(model_id, custom_models[model_id], revision, allowed_paths)
    target = (aliases or {}).get(model_id, model_id)
    path: Path | None = None
    source = "local"
    if Path(target).is_absolute() or target.startswith((".", "~")):
        local = _expand(target, allowed_paths)
        check_allowed(local, allowed_paths, target)
        if not _is_dir(local):
            raise ModelNotFound(f"model: no directory {target}", field="model")
        path = local
    elif shipped and target in shipped:
        path, source = Path(shipped[target]), "shipped"
    elif _inside(local := Path(target), allowed_paths) and _is_dir(local) and (local / "config.json").exists():
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
