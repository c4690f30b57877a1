"""The plugin manager: default plugins, every entry point in the ``loom`` group, then a plugins directory.

``LOOM_LOAD_PLUGINS=a,b`` loads only the named entry points (empty: none); ``LOOM_TRACE_PLUGINS=1``
prints every hook call to stderr. ``loom serve --plugins-dir DIR`` (or ``LOOM_PLUGINS_DIR``) also registers every
``*.py`` file in DIR as a plugin module named after the file (``DIR/faulty.py`` is the plugin, and the loader,
``faulty``), as datasette's ``--plugins-dir`` does: hooks for one deployment or one test, without packaging.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pluggy

from loom_kernel import hookspecs
from loom_kernel.config import ConfigError, Option
from loom_kernel.installed import DEFAULT_PLUGINS, entry_points


def create_plugin_manager(
    *, load_entry_points: bool = True, plugins_dir: str | os.PathLike[str] | None = None
) -> pluggy.PluginManager:
    """``plugins_dir`` defaults to ``LOOM_PLUGINS_DIR``; its files are registered after the entry points."""
    pm = pluggy.PluginManager("loom")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        only = os.environ.get("LOOM_LOAD_PLUGINS")
        wanted = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
        for ep in entry_points():
            if wanted is not None and ep.name not in wanted:
                continue
            if pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
    plugins_dir = plugins_dir or os.environ.get("LOOM_PLUGINS_DIR") or None
    if plugins_dir is not None:
        load_plugins_dir(pm, Path(plugins_dir))
    if os.environ.get("LOOM_TRACE_PLUGINS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def load_plugins_dir(pm: pluggy.PluginManager, directory: Path) -> list[str]:
    """Import every ``*.py`` file in ``directory`` (sorted by name) and register it under its file's stem.

    A missing directory, a file that fails to import, or a name another plugin already has is a ConfigError
    naming the path: the server must not start without a plugin its operator asked for.
    """
    if not directory.is_dir():
        raise ConfigError(f"plugins_dir: {str(directory)!r} is not a directory", field="plugins_dir")
    names = []
    for path in sorted(directory.glob("*.py")):
        name = path.stem
        if pm.has_plugin(name):
            raise ConfigError(f"plugins_dir: {str(path)!r}: a plugin named {name!r} is already registered")
        module_name = f"loom_plugins_dir.{name}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"plugins_dir: cannot import {str(path)!r}", field="plugins_dir")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before running it: dataclasses, pickling and the like look it up
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise ConfigError(
                f"plugins_dir: {str(path)!r} failed to import: {type(exc).__name__}: {exc}", field="plugins_dir"
            ) from exc
        try:
            pm.register(module, name=name)
        except Exception as exc:  # pluggy's validation: a hookimpl with arguments its hookspec does not have
            sys.modules.pop(module_name, None)
            raise ConfigError(f"plugins_dir: {str(path)!r} is not a valid plugin: {exc}", field="plugins_dir") from exc
        names.append(name)
    return names


def plugin_options(pm: pluggy.PluginManager) -> list[Option]:
    """Every plugin's own settings; two plugins may not claim one name."""
    out: dict[str, Option] = {}
    for option in (o for declared in pm.hook.options() for o in declared or []):
        if out.setdefault(option.name, option) is not option:
            raise ConfigError(f"two plugins declare the setting {option.name}", field=option.name)
    return list(out.values())
