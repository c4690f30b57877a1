"""Dependencies the controllers receive through ``Provide``: the model manager and the plugin manager.

The plugin manager is provided from the model manager (and handlers read ``manager.settings``) rather than each
from the app state: Litestar resolves a handler's independent dependencies concurrently, one anyio task each,
which cost a /embed request (manager + pm) about 3% of the event loop's time under load; chained, they resolve
inline, one after the other.
"""

from __future__ import annotations

import pluggy
from litestar.datastructures import State
from litestar.di import NamedDependency

from loom_kernel.models import Kernel, ModelManager

# Handler parameters are injected by name; the aliases say so explicitly (Litestar 3 requires it).
Manager = NamedDependency[ModelManager]
Plugins = NamedDependency[pluggy.PluginManager]
KernelDep = NamedDependency[Kernel]


def provide_manager(state: State) -> ModelManager:
    return state.manager


def provide_pm(manager: Manager) -> pluggy.PluginManager:
    return manager.pm


def provide_kernel(manager: Manager) -> Kernel:
    return manager.kernel
