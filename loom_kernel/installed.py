"""What plugins are installed: the ``loom`` entry points, the loaders among them and a description of each."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import pluggy

ENTRY_POINT_GROUP = "loom"
DEFAULT_PLUGINS = ("loom_kernel.default_plugins.pooling", "loom_kernel.default_plugins.running")


def entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def loader_names(pm: pluggy.PluginManager) -> list[str]:
    """Plugins that implement ``load``: the names a request's ``loader`` field may take."""
    return sorted(pm.get_name(impl.plugin) or "" for impl in pm.hook.load.get_hookimpls() if pm.get_name(impl.plugin))


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    dists = {p: (d.project_name, d.version) for p, d in pm.list_plugin_distinfo()}
    # create_plugin_manager registers entry points itself, so pluggy's distinfo is empty for them: ask the
    # entry point which distribution it came from.
    ep_dists = {ep.name: (ep.dist.name, ep.dist.version) for ep in entry_points() if ep.dist is not None}
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
