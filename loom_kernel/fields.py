"""Plugins' request fields (``request_fields``) and their resolution on a model (``readouts``): each plugin is asked
about its own fields only, and the answers merge into one ``Reading``."""

from __future__ import annotations

from typing import Any

import pluggy

from loom_kernel.config import ConfigError
from loom_kernel.types import Reading, RequestField


class Fields:
    """The request fields of one server's plugins, and which plugin reads each."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.owners: dict[str, object] = {}
        self.fields: list[RequestField] = []
        # Called one plugin at a time: which plugin declared a field is what routes its values to its readouts.
        for impl in pm.hook.request_fields.get_hookimpls():
            for field in impl.function() or ():
                if field.name in self.owners:
                    raise ConfigError(f"two plugins declare the request field {field.name}", field=field.name)
                self.owners[field.name] = impl.plugin
                self.fields.append(field)
        self._callers: dict[int, Any] = {}

    def reading(self, model: Any, given: dict[str, Any], kernel: Any, caller: str) -> Reading | None:
        """``given`` (field name -> value) resolved on ``model``: each plugin's ``readouts`` with its own fields; None
        when a field's plugin resolves nothing."""
        by_plugin: dict[int, tuple[object, dict[str, Any]]] = {}
        for name, value in given.items():
            plugin = self.owners[name]
            by_plugin.setdefault(id(plugin), (plugin, {}))[1][name] = value
        parts = []
        for plugin, mine in by_plugin.values():
            found = [r for r in self._caller(plugin)(model=model, fields=mine, kernel=kernel, caller=caller) if r]
            if not found:
                return None
            parts.append(found[0])
        return merged(parts)

    def _caller(self, plugin: object) -> Any:
        if id(plugin) not in self._callers:
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            self._callers[id(plugin)] = self.pm.subset_hook_caller("readouts", remove_plugins=others)
        return self._callers[id(plugin)]


def merged(parts: list[Reading]) -> Reading:
    """Several plugins' readings as one: every edit, the union of the states they read, every answer field, the
    first stop rule that fires."""
    if len(parts) == 1:
        return parts[0]
    reads = [r.read for r in parts if r.read is not None]
    stops = [r.stop for r in parts if r.stop is not None]

    def read(states: dict[str, Any], positions: list[int] | None) -> dict[str, Any]:
        return {k: v for one in reads for k, v in one(states, positions).items()}

    def stop(states: dict[str, Any]) -> dict[str, Any] | None:
        return next((fired for one in stops if (fired := one(states)) is not None), None)

    layers = {sel.key: sel for r in parts for sel in r.layers}
    return Reading(
        edits=tuple(e for r in parts for e in r.edits),
        layers=tuple(layers.values()),
        sites=tuple(dict.fromkeys(s for r in parts for s in r.sites)),
        read=read if reads else None,
        stop=stop if stops else None,
        bytes_per_position=sum(r.bytes_per_position for r in parts),
    )
