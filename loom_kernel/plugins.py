"""The plugin manager: default plugins, then every entry point in the ``loom`` group.

``LOOM_LOAD_PLUGINS=a,b`` loads only the named entry points (empty: none); ``LOOM_TRACE_PLUGINS=1``
prints every hook call to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata
from typing import Any

import pluggy

from loom_kernel import hookspecs

ENTRY_POINT_GROUP = "loom"
DEFAULT_PLUGINS = ("loom_kernel.default_plugins.pooling",)


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def create_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("loom")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        only = os.environ.get("LOOM_LOAD_PLUGINS")
        wanted = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
        for ep in _entry_points():
            if wanted is not None and ep.name not in wanted:
                continue
            if pm.get_plugin(ep.name) is None:
                pm.register(ep.load(), name=ep.name)
    if os.environ.get("LOOM_TRACE_PLUGINS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


def loader_names(pm: pluggy.PluginManager) -> list[str]:
    """Plugins that implement ``load``: the names a request's ``loader`` field may take."""
    return sorted(pm.get_name(impl.plugin) or "" for impl in pm.hook.load.get_hookimpls() if pm.get_name(impl.plugin))


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    dists = {p: (d.project_name, d.version) for p, d in pm.list_plugin_distinfo()}
    # create_plugin_manager registers entry points itself, so pluggy's distinfo is empty for them: ask the
    # entry point which distribution it came from.
    ep_dists = {ep.name: (ep.dist.name, ep.dist.version) for ep in _entry_points() if ep.dist is not None}
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or repr(plugin)
        package, version = dists.get(plugin) or ep_dists.get(name) or (None, None)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append(
            {
                "name": name,
                "hooks": hooks,
                "package": package,
                "version": version,
                "default": name in DEFAULT_PLUGINS,
                "pooling_strategies": list(getattr(plugin, "POOLING_STRATEGIES", ())),
            }
        )
    return sorted(rows, key=lambda r: r["name"])
