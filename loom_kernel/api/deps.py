"""Dependencies the controllers receive through ``Provide``: the plugin manager, settings, model manager."""

from __future__ import annotations

import pluggy
from litestar.datastructures import State
from litestar.di import NamedDependency

from loom_kernel.config import Settings
from loom_kernel.models import ModelManager

# Handler parameters are injected by name; the aliases say so explicitly (Litestar 3 requires it).
Manager = NamedDependency[ModelManager]
Plugins = NamedDependency[pluggy.PluginManager]
Config = NamedDependency[Settings]


def provide_manager(state: State) -> ModelManager:
    return state.manager


def provide_pm(state: State) -> pluggy.PluginManager:
    return state.pm


def provide_settings(state: State) -> Settings:
    return state.settings
