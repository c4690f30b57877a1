"""Importing the code a manifest names, and the trust rule that decides whether it may run.

The rule, by who wrote the "module:function" string and where the module is found:

- the module lives in the model directory (``<dir>/module.py`` or ``<dir>/module/__init__.py``, judged by the
  first dotted part): code shipped with the checkpoint. It runs only with ``trust_remote_code`` (the request's
  field or the server's ``models.trust_remote_code``), whoever names it.
- the module is an installed package, named by the server config's ``custom_models``: the operator chose it, so it
  runs without ``trust_remote_code``.
- the module is an installed package, named by a checkpoint's loom.json: calling whatever a downloaded file names
  (``os:system`` with its ``kwargs``...) is running remote instructions, so it too needs ``trust_remote_code``.

Refusal is a 403 ``Forbidden`` naming ``trust_remote_code``, before anything is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from loom_custom.manifest import Manifest
from loom_kernel import Forbidden

# Modules from a model directory are imported under this prefix plus a hash of the directory: never under their own
# name, so that a checkpoint's "utils.py" shadows nothing installed and two checkpoints' "modeling.py" do not meet.
PACKAGE_PREFIX = "_loom_custom_code_"


def lives_in(directory: Path, module: str) -> bool:
    """Whether ``module`` would be found in ``directory`` (a .py file or a package there)."""
    top = module.split(".")[0]
    return (directory / f"{top}.py").is_file() or (directory / top / "__init__.py").is_file()


def check_trust(manifest: Manifest, field: str, target: str, in_directory: bool, trusted: bool) -> None:
    if trusted:
        return
    how = (
        "models.trust_remote_code: true in the server config (or trust_remote_code: true in the request, where the "
        "config's models.allow_remote_code_requests lets requests ask)"
    )
    if in_directory:
        raise Forbidden(
            f"model: {manifest.where}: {field} {target!r} is code shipped in the model directory "
            f"{manifest.directory}; running it needs {how}",
            field="trust_remote_code",
            manifest=manifest.where,
        )
    raise Forbidden(
        f"model: {manifest.where}: {field} {target!r} is named by the checkpoint's loom.json; calling code a "
        f"checkpoint names needs {how} (or name the model in the server config's custom_models, which trusts "
        "installed factories)",
        field="trust_remote_code",
        manifest=manifest.where,
    )


def import_from_directory(directory: Path, module: str) -> ModuleType:
    """Import ``module`` from ``directory`` as a submodule of a synthetic package rooted there, so that the
    checkpoint's relative imports ("from .blocks import Block") resolve inside the directory only."""
    package = PACKAGE_PREFIX + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    # Every load imports afresh: a reload after the checkpoint's code changed must not get the cached old module.
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
    assert spec.submodule_search_locations is not None
    spec.submodule_search_locations.append(str(directory))
    sys.modules[package] = importlib.util.module_from_spec(spec)
    importlib.invalidate_caches()
    return importlib.import_module(f"{package}.{module}")


def load_callable(manifest: Manifest, field: str, target: str, trusted: bool) -> Callable[..., Any]:
    """The callable ``target`` ("module:attr.path") names, after the trust rule; BadModel naming ``field`` when
    it cannot be imported or is not callable."""
    module_name, _, attr_path = target.partition(":")
    in_directory = manifest.directory is not None and lives_in(manifest.directory, module_name)
    if in_directory or manifest.origin == "checkpoint":
        check_trust(manifest, field, target, in_directory, trusted)
    try:
        if in_directory:
            assert manifest.directory is not None
            module = import_from_directory(manifest.directory, module_name)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, or whatever the module raises at import time
        if in_directory:
            where = f"from {manifest.directory}"
        else:
            where = "from the installed packages" + (
                " (nor is it a file of the model directory)" if manifest.directory else ""
            )
        raise manifest.error(
            field, f"{target!r}: cannot import {module_name!r} {where}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise manifest.error(field, f"{target!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise manifest.error(field, f"{target!r} is a {type(obj).__name__}, not a callable")
    return obj
