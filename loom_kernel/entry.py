"""A model in the registry (``ModelEntry``) and its state."""

from __future__ import annotations

import asyncio
import enum
import time

import attrs

from loom_kernel.batching import ModelThread
from loom_kernel.errors import ModelNotFound
from loom_kernel.types import LoadedModel, LoadOptions

MAX_NAMES = 16  # names (with their revision) an entry remembers; a name past them is resolved again each time


class State(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADED = "unloaded"


@attrs.define(eq=False)
class ModelEntry:
    """One model in the registry. ``model_id`` is the first name it was loaded by (the one /models, the log and the
    metrics show); ``key`` is its source; ``answers`` the (name, revision) pairs requests reached it by."""

    model_id: str
    loader: str
    options: LoadOptions
    worker: ModelThread
    key: str = ""
    answers: dict[tuple[str, str | None], None] = attrs.field(factory=dict)
    state: State = State.LOADING
    loaded: LoadedModel | None = None
    ready: asyncio.Future | None = None
    last_used: float = attrs.field(factory=time.monotonic)
    in_flight: int = 0
    flights: dict[str, int] = attrs.field(factory=dict)  # in_flight by API key owner ("" without keys)
    # While loading: the bytes its load was estimated to take, held against the memory budget (loom_kernel.budget).
    reserved: int = 0

    @property
    def names(self) -> list[str]:
        """Every name this model answered to, first the one it was loaded by."""
        return list(dict.fromkeys([self.model_id, *(name for name, _ in self.answers)]))

    def answer(self, name: str, revision: str | None) -> None:
        if len(self.answers) < MAX_NAMES:
            self.answers.setdefault((name, revision), None)

    def model(self) -> LoadedModel:
        """The loaded model (ModelNotFound once it is unloaded)."""
        if self.loaded is None:
            raise ModelNotFound(f"model: {self.model_id!r} was unloaded", field="model")
        return self.loaded
