"""The kernel object: what a plugin's hooks and handlers are given (datasette hands its hooks the ``datasette``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

if TYPE_CHECKING:
    import pluggy

    from loom_kernel.config import Settings
    from loom_kernel.models import ModelManager

T = TypeVar("T")


@attrs.define(eq=False)
class Kernel:
    """One server: its plugin manager, settings, model manager and Litestar app, and a place for each plugin's
    per-server state (``state(name, make)``), so that a plugin keeps what it builds on the server it serves and two
    servers in one process (tests, Ray replicas) never share it through module globals."""

    pm: pluggy.PluginManager
    settings: Settings
    manager: ModelManager
    app: Any = None
    _state: dict[str, Any] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def state(self, name: str, make: Callable[[Kernel], T]) -> T:
        """The plugin state kept under ``name``, made by ``make(kernel)`` on first use (from any thread)."""
        with self._lock:
            if name not in self._state:
                self._state[name] = make(self)
            return self._state[name]

    def states(self) -> dict[str, Any]:
        """Every plugin state made so far (a shutdown hook may close its own)."""
        with self._lock:
            return dict(self._state)
