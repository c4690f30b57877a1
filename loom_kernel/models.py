"""The model manager: the registry of models and their lifecycle. Lazy load, preload, one loaded copy per model
whatever name reaches it (the registry is keyed by the model's source, ``resolve.source_key``), LRU by count,
eviction under the memory budget (``loom_kernel.budget``), idle unload. Which loader and options a load
gets is ``loom_kernel.choosing``'s; how requests reach a loaded model, ``loom_kernel.admission``'s.

Torch never runs on the event loop: loads and forward passes run on the model's own thread (``loom_kernel.batching``),
and the API awaits them. A model with requests in flight is never unloaded, and a failed load evicts nothing (the new
model is loaded first; eviction happens only once it is in memory). A request is in flight from the moment ``get``
gives it its model until it ends (``loom_kernel.admission``): a reload refused for requests in flight when it starts
finds none on the old model when it ends, since every request that comes meanwhile is given the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import pluggy

from loom_kernel import choosing
from loom_kernel.admission import Admission
from loom_kernel.batching import ModelThread
from loom_kernel.budget import make_room, memory_report
from loom_kernel.config import Settings
from loom_kernel.devices import resolve_device, resolve_dtype
from loom_kernel.entry import ModelEntry, State
from loom_kernel.errors import Conflict, LoadFailed, LoomError, ModelNotFound, Unsupported, load_error, out_of_memory
from loom_kernel.fields import Fields
from loom_kernel.generic import declared
from loom_kernel.inputs import char_limit
from loom_kernel.memory import release_memory
from loom_kernel.metrics import Metrics
from loom_kernel.reports import describe
from loom_kernel.resolve import resolve_model, source_key
from loom_kernel.scheduler import BatchLimits
from loom_kernel.types import LoadedModel, LoadOptions, ModelRef, Reading, RequestField

if TYPE_CHECKING:
    from loom_kernel.api.schemas import ModelRequest

log = logging.getLogger("loom.models")
# One load at a time in the process: two model threads importing a library's lazy modules at once race inside it
# (transformers: "module 'transformers' has no attribute 'AutoConfig'"), and two loads at once would also peak
# above the memory budget that each was checked against alone.
LOADING = threading.Lock()
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

    @property
    def fields(self) -> Fields:
        """The plugins' request fields (``request_fields``), and what resolves them (``readouts``)."""
        return self.state("kernel.fields", lambda kernel: Fields(kernel.pm))

    def request_fields(self) -> list[RequestField]:
        """The fields plugins add to the capture requests; two may not declare one name."""
        return self.fields.fields

    def request_type(self, base: type[T], generation: bool, reads: bool = True) -> type[T]:
        """``base``, a capture request's Struct, with the plugins' request fields (a handler's ``data`` type:
        name it in its controller's ``signature_namespace``); ``reads`` False leaves out the fields that answer at
        positions (a request whose answer has none: ``/embed`` takes edits only)."""
        from loom_kernel.api.schemas import with_fields

        fields = [f for f in self.request_fields() if reads or not f.reads]
        types = self.state("kernel.request_types", lambda kernel: {})
        with self._lock:
            if (base, generation, reads) not in types:
                types[base, generation, reads] = with_fields(base, fields, generation)
            return types[base, generation, reads]


class ModelManager:
    def __init__(self, pm: pluggy.PluginManager, settings: Settings) -> None:
        self.pm = pm
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {}
        self._reaper: asyncio.Task | None = None
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.admission = Admission(pm, settings)
        self.kernel = Kernel(pm, settings, self)  # what plugins' hooks and handlers are given
        self.run = self.admission.run  # the one way a request reaches a model: run(entry, work, until)

    # -- resolution and ranking -------------------------------------------------------------------------

    @functools.cached_property
    def shipped(self) -> dict[str, str]:
        """The models plugins ship (``model_sources``), by name; asked once, on first use."""
        return {name: path for found in self.pm.hook.model_sources() for name, path in (found or {}).items()}

    def resolve(self, model_id: str, revision: str | None = None) -> ModelRef:
        return resolve_model(
            model_id,
            revision,
            aliases=self.settings.aliases,
            allowed_paths=self.settings.allowed_paths,
            custom_models=self.settings.custom_models,
            shipped=self.shipped,
        )

    def source(self, model_id: str, revision: str | None = None) -> tuple[ModelRef, str]:
        """The model ``model_id`` names and its registry key (reads the disk: call it off the event loop)."""
        ref = self.resolve(model_id, revision)
        return ref, source_key(ref)

    def probe_report(self, model_id: str, revision: str | None = None) -> dict[str, Any]:
        return choosing.probe_report(self.pm, self.resolve(model_id, revision))

    def options(self, **explicit: Any) -> LoadOptions:
        return choosing.load_options(self.pm, self.settings, **explicit)

    def reading(self, model: LoadedModel, fields: dict[str, Any], caller: str = "") -> Reading | None:
        """A request's plugin fields resolved on ``model`` by the plugins that declared them."""
        return self.kernel.fields.reading(model, fields, self.kernel, caller)

    # -- loading -----------------------------------------------------------------------------------------

    async def get_for(self, request: ModelRequest, *, hold: bool = True) -> ModelEntry:
        """``get`` for a request's ``model`` and load fields: the one way a route reaches its model."""
        return await self.get(
            request.model, loader=request.loader, revision=request.revision, explicit=request.explicit(), hold=hold
        )

    async def get(
        self,
        model_id: str,
        *,
        loader: str | None = None,
        revision: str | None = None,
        explicit: dict[str, Any] | None = None,
        hold: bool = True,
    ) -> ModelEntry:
        """The ready entry for the model ``model_id`` names, loading it first if needed.

        Every name of one model (an alias, a path with a trailing slash, the embedded model's three names) reaches
        the same entry: names resolve to the model's source, which keys the registry. ``explicit`` holds the load
        options the request named; a loaded model whose options or loader differ from them is reloaded rather than
        silently reused.

        In an HTTP request, ``hold`` admits the request to the model (``Admission.hold``: a 429 when its queue is
        full) as it is chosen, before any wait for its load: from then until the request ends the model counts it
        in flight, and is not evicted, unloaded or replaced by a reload under it. A route that only reports on the
        model passes False.
        """
        explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
        entry = self._named(model_id, revision)
        if entry is not None and not self._differs(entry, loader, explicit):
            return await self._wait_ready(self._given(entry, hold))
        # Resolution may read the HF cache or ask the hub: keep it off the event loop.
        ref, key = await asyncio.to_thread(self.source, model_id, revision)
        chosen = choosing.choose_loader(self.pm, ref, loader)
        opts = self.options(**explicit)
        # Another request may have started a load meanwhile. One load per model at a time: the same options wait
        # for it, others are a 409 (ten requests with ten dtypes must not load ten copies at once).
        if (pending := self._pending(key)) is not None:
            if self._differs(pending, chosen, explicit):
                raise Conflict(
                    f"model: {model_id!r} is being loaded with other options (dtype={pending.options.dtype}, "
                    f"device={pending.options.device}, quantization={pending.options.quantization}); retry when "
                    "it has loaded",
                    field="model",
                )
            pending.answer(model_id, revision)
            return await self._wait_ready(self._given(pending, hold))
        entry = self.entries.get(key)
        if entry is not None and not self._differs(entry, chosen, explicit):
            entry.answer(model_id, revision)
            return await self._wait_ready(self._given(entry, hold))
        return await self._load(key, (model_id, revision), ref, chosen, opts, replacing=entry, hold=hold)

    def _given(self, entry: ModelEntry, hold: bool) -> ModelEntry:
        if hold:
            self.admission.hold(entry)
        return entry

    def _named(self, name: str, revision: str | None) -> ModelEntry | None:
        """The entry a request already reached by ``name`` (and ``revision``): its load in progress first."""
        hits = [e for e in self.entries.values() if (name, revision) in e.answers and e.state != State.UNLOADED]
        return next((e for e in hits if e.state == State.LOADING), None) or next(iter(hits), None)

    def find(self, name: str) -> ModelEntry | None:
        """The ready model that answered to ``name``, if any."""
        return next((e for e in self.ready() if name in e.names), None)

    def _pending(self, key: str) -> ModelEntry | None:
        """The load of the model ``key`` in progress, first or replacing a loaded one, if any."""
        for k in (key, f"{key} (reloading)"):
            entry = self.entries.get(k)
            if entry is not None and entry.state == State.LOADING:
                return entry
        return None

    def _differs(self, entry: ModelEntry, loader: str | None, explicit: dict[str, Any]) -> bool:
        """Whether the request names a loader or option the entry was not loaded with.

        Options compare resolved: ``device: auto`` is the device it stands for here, ``dtype: auto`` the dtype it
        picks on that device, so asking for what is loaded does not reload it; a value no load could take (an
        empty ``quantization``, CUDA on a machine without it) is refused here (422)."""
        if loader is not None and loader != entry.loader:
            return True
        if not explicit:
            return False
        asked = self.options(**explicit)
        loaded = entry.options
        for key in explicit:
            if key == "device":
                have = entry.loaded.device if entry.loaded is not None else resolve_device(loaded.device)
                if resolve_device(asked.device) not in (have, loaded.device):
                    return True
            elif key == "dtype":
                device = resolve_device(asked.device)
                picked = str(resolve_dtype(asked.dtype, device)).removeprefix("torch.")
                have = entry.loaded.dtype if entry.loaded is not None else None
                if asked.dtype != loaded.dtype and picked != have:
                    return True
            elif getattr(asked, key) != getattr(loaded, key):
                return True
        return False

    async def _wait_ready(self, entry: ModelEntry) -> ModelEntry:
        if entry.ready is not None and not entry.ready.done():
            await asyncio.shield(entry.ready)
        if entry.ready is not None and entry.ready.done() and entry.ready.exception() is not None:
            raise entry.ready.exception()  # type: ignore[misc]
        return entry

    async def _load(
        self,
        key: str,
        name: tuple[str, str | None],
        ref: ModelRef,
        loader: str,
        opts: LoadOptions,
        *,
        replacing: ModelEntry | None,
        hold: bool = False,
    ) -> ModelEntry:
        """Load the model ``key`` (reached by ``name``, with its revision), or reload ``replacing`` with other
        options; a reload keeps the names and the id it was listed under. ``hold``: the request is given the new
        model (``get``)."""
        model_id = replacing.model_id if replacing is not None else name[0]
        if replacing is not None and replacing.in_flight:
            raise Conflict(
                f"model: {model_id!r} is serving requests with other load options; retry when it is idle",
                field="model",
            )
        victims, reserved = make_room(self.entries.values(), model_id, ref, opts, self.settings.memory_fraction)
        thread = ModelThread(model_id, self.limits(), self.metrics.model(model_id))
        answers = dict(replacing.answers) if replacing is not None else {}
        entry = ModelEntry(
            model_id=model_id, loader=loader, options=opts, worker=thread, key=key, answers=answers, reserved=reserved
        )
        entry.answer(*name)
        entry.ready = asyncio.get_running_loop().create_future()
        # The old entry stays listed (and usable) until the new one is in memory.
        pending_key = key if replacing is None else f"{key} (reloading)"
        self.entries[pending_key] = entry
        self._given(entry, hold)
        log.info(
            "loading %s with loader %s (device=%s dtype=%s quantization=%s) from %s",
            model_id,
            loader,
            opts.device,
            opts.dtype,
            opts.quantization,
            ref.path or ref.id,
        )
        try:
            try:
                loaded = await asyncio.wrap_future(entry.worker.submit(lambda: self._call_load(ref, loader, opts)))
            except LoadFailed as exc:
                if not (victims and out_of_memory(exc)):
                    raise
                # The estimate kept the victims while loading; the device disagreed. Free them and try once more.
                log.warning("loading %s ran out of memory; evicting %s and retrying", model_id, _ids(victims))
                self._drop_victims(victims)
                victims = []
                loaded = await asyncio.wrap_future(entry.worker.submit(lambda: self._call_load(ref, loader, opts)))
        except BaseException as exc:
            self.metrics.model(model_id).load_failures += 1
            self.entries.pop(pending_key, None)
            entry.worker.stop()
            entry.ready.set_exception(exc)
            entry.ready.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        self.metrics.model(model_id).loads += 1
        entry.loaded = loaded
        entry.state = State.READY
        entry.last_used = time.monotonic()
        if replacing is not None:
            self.entries.pop(pending_key, None)
            self._drop(replacing)
        self.entries[key] = entry
        entry.ready.set_result(entry)
        log.info(
            "loaded %s: %s on %s as %s, %.1f MiB, %.2f s",
            model_id,
            loaded.kind,
            loaded.device,
            loaded.dtype,
            loaded.size_bytes / 2**20,
            loaded.load_seconds,
        )
        self._drop_victims(victims)
        self._evict_lru(keep=entry)
        return entry

    def _drop_victims(self, victims: list[ModelEntry]) -> None:
        for victim in victims:
            if victim.state != State.READY or victim.in_flight:
                continue  # a request took it up during the load: it stays, and the budget is exceeded for now
            log.info("evicting %s to make room (memory_fraction %s)", victim.model_id, self.settings.memory_fraction)
            self._remove(victim)

    def _call_load(self, ref: ModelRef, loader: str, opts: LoadOptions) -> LoadedModel:
        """Run the loader (on the model's thread). A failure is classified once, here or by the loader through
        ``load_error`` (what the model's files cause is a 4xx, the server's own faults a 500), and everything the
        failed load allocated is released before the error leaves this thread: its traceback would otherwise keep
        the half-built model alive for as long as anyone holds the error."""
        start = time.perf_counter()
        try:
            with LOADING:
                loaded = self.pm.hook.load(model=ref, loader=loader, options=opts, kernel=self.kernel)
        except Exception as exc:
            what = f"loader {loader!r} could not load {ref.id!r}"
            error = exc if isinstance(exc, LoomError) else load_error(exc, what)
            if error.status < 500:
                log.warning("loader %s could not load %s: %s", loader, ref.id, error.detail)
            elif error is not exc:  # a loader's own LoomError is logged where the request fails
                log.error("loader %s failed on %s", loader, ref.id, exc_info=exc)
            release_memory(exc)
            if error is exc:
                raise
            raise error from exc
        if loaded is None:
            raise Unsupported(f"loader: {loader!r} declined to load {ref.id!r}", field="loader")
        if not loaded.load_seconds:
            loaded.load_seconds = time.perf_counter() - start
        char_limit(loaded)  # read the vocabulary here, once, not on the event loop of the first request
        declared(loaded)  # a model whose loader declared its parts gets the kernel's runner
        return loaded

    def _evict_lru(self, keep: ModelEntry) -> None:
        while True:
            ready = self.ready()
            if len(ready) <= self.settings.max_models:
                return
            idle = [e for e in ready if e is not keep and e.in_flight == 0]
            if not idle:
                log.warning("over max_models (%d) but every other model is busy", self.settings.max_models)
                return
            victim = min(idle, key=lambda e: e.last_used)
            log.info("evicting least recently used model %s", victim.model_id)
            self._remove(victim)

    def _remove(self, entry: ModelEntry) -> None:
        """Forget ``entry`` (if it is still the one listed under its id) and free its model."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        self._drop(entry)

    def _drop(self, entry: ModelEntry) -> None:
        """Free ``entry``'s model on its own thread, then end that thread."""
        loaded, entry.loaded = entry.loaded, None
        entry.state = State.UNLOADED

        def release() -> None:
            nonlocal loaded
            loaded = None
            release_memory()

        entry.worker.submit(release)
        entry.worker.stop()

    async def unload(self, model_id: str) -> None:
        """Unload the model ``model_id`` names: a name it answered to, or any other name of it (resolved)."""
        key = await self._key_of(model_id)
        if key is not None and self._pending(key) is not None:
            raise Conflict(f"model: {model_id!r} is loading; unload it once it has loaded", field="model_id")
        entry = self.entries.get(key) if key is not None else None
        if entry is None or entry.state != State.READY:
            raise ModelNotFound(
                f"model: {model_id!r} is not loaded", field="model_id", allowed=sorted(self.loaded_ids())
            )
        if entry.in_flight:
            raise Conflict(f"model: {model_id!r} has {entry.in_flight} request(s) in flight", field="model_id")
        self._remove(entry)
        log.info("unloaded %s", entry.model_id)

    async def _key_of(self, name: str) -> str | None:
        """The key of the model ``name`` reaches: an entry's that answered to it, else what it resolves to (None
        when it names no model)."""
        for entry in self.entries.values():
            if name in entry.names:
                return entry.key
        try:
            return (await asyncio.to_thread(self.source, name))[1]
        except LoomError:
            return None

    def memory_report(self) -> dict[str, Any]:
        return memory_report(self.ready(), self.settings)

    def ready(self) -> list[ModelEntry]:
        return [e for e in self.entries.values() if e.state == State.READY]

    def loaded_ids(self) -> list[str]:
        return [e.model_id for e in self.ready()]

    # -- running -----------------------------------------------------------------------------------------

    def limits(self) -> BatchLimits:
        s = self.settings
        return BatchLimits(max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens)

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def auto_unload_seconds(self) -> float | None:
        minutes = self.settings.auto_unload_minutes
        return None if minutes <= 0 else minutes * 60.0

    def describe(self) -> list[dict[str, Any]]:
        return [describe(e, self.auto_unload_seconds) for e in self.entries.values()]

    async def preload(self, model_ids: list[str]) -> None:
        for model_id in model_ids:
            try:
                await self.get(model_id)
            except LoomError as exc:
                log.error("preload of %s failed: %s", model_id, exc.detail)

    async def _reap_idle(self) -> None:
        while True:
            limit = self.auto_unload_seconds
            await asyncio.sleep(1.0 if limit is None else min(30.0, max(0.2, limit / 5)))
            if limit is None:
                continue
            now = time.monotonic()
            for entry in list(self.entries.values()):
                if entry.state == State.READY and entry.in_flight == 0 and now - entry.last_used >= limit:
                    log.info("auto-unloading %s after %.0f s idle", entry.model_id, now - entry.last_used)
                    self._remove(entry)
            self.metrics.idle_checks += 1

    async def start(self) -> None:
        await asyncio.to_thread(self._cap_gpu_memory)
        self._reaper = asyncio.create_task(self._reap_idle())

    def _cap_gpu_memory(self) -> None:
        """LOOM_MEMORY_FRACTION caps what this process may allocate on each GPU (a CPU has no such cap)."""
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available() and 0 < self.settings.memory_fraction < 1:
            for i in range(torch.cuda.device_count()):
                torch.cuda.set_per_process_memory_fraction(self.settings.memory_fraction, i)

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for entry in list(self.entries.values()):
            self._drop(entry)
        self.entries.clear()
        self.admission.threads.shutdown(wait=False, cancel_futures=True)


def _ids(entries: list[ModelEntry]) -> str:
    return ", ".join(e.model_id for e in entries)
