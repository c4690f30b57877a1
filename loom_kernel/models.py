"""The model manager: lazy load, preload, LRU by count, idle unload, one thread per model, admission (429).

Torch never runs on the event loop: loads and forward passes run on the model's own thread (where concurrent
requests' calls are merged: ``loom_kernel.batching``), each request's own work on a request thread (or, when it is
a few small tensor operations, on the model's thread after its pass: ``forward``), and the API awaits them. A model
with requests in flight is never unloaded, and a failed load evicts nothing (the new model is loaded first; LRU
eviction happens only once it is in memory).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
import pluggy

from loom_kernel.batching import BatchLimits, Cancelled, ModelThread, run_with_ticket
from loom_kernel.config import Settings
from loom_kernel.devices import DEVICE_MAPS, resolve_device
from loom_kernel.errors import (
    Conflict,
    Forbidden,
    InsufficientStorage,
    InvalidField,
    LoadFailed,
    LoomError,
    MissingBackend,
    ModelNotFound,
    RequestTimeout,
    TooManyRequests,
    Unsupported,
    load_error,
    out_of_memory,
)
from loom_kernel.memory import budget_bytes, device_total_bytes, estimate_bytes, release_memory
from loom_kernel.metrics import Metrics
from loom_kernel.openmp import one_torch_thread
from loom_kernel.plugins import describe_plugins, loader_names
from loom_kernel.resolve import resolve_model
from loom_kernel.types import Batch, Capture, ForwardOutput, LoadedModel, LoadOptions, ModelRef, ProbeResult

log = logging.getLogger("loom.models")
T = TypeVar("T")

# Which distribution to pip install for a quantization method nobody implements here.
QUANTIZATION_PACKAGES = {
    "4bit": "loom-plugin-bitsandbytes",
    "8bit": "loom-plugin-bitsandbytes",
    "gptq": "loom-plugin-gptq",
    "awq": "loom-plugin-gptq",
}
# Which distribution provides a loader that is not installed.
LOADER_PACKAGES = {
    "transformers": "loom-plugin-transformers",
    "sentence_transformers": "loom-plugin-sentence-transformers",
    "custom": "loom-plugin-custom",
    "gptq": "loom-plugin-gptq",
}


class State(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADED = "unloaded"


@attrs.define(eq=False)
class ModelEntry:
    model_id: str
    loader: str
    options: LoadOptions
    worker: ModelThread
    state: State = State.LOADING
    loaded: LoadedModel | None = None
    ready: asyncio.Future | None = None
    last_used: float = attrs.field(factory=time.monotonic)
    in_flight: int = 0

    def describe(self, auto_unload_s: float | None) -> dict[str, Any]:
        idle = 0.0 if self.in_flight else time.monotonic() - self.last_used
        row: dict[str, Any] = {
            "model_id": self.model_id,
            "loader": self.loader,
            "state": self.state,
            "in_flight": self.in_flight,
            "queued": self.worker.queued,
            # Cumulative for this model id, across reloads (the counters /metrics reports).
            "batches": self.worker.counters.batches,
            "batched_requests": self.worker.counters.batched_requests,
            "decode_steps": self.worker.counters.decode_steps,
            "joined_running": self.worker.counters.joined_running,
            "running_rows": self.worker.running_rows,
            "idle_seconds": round(idle, 3),
            "auto_unload_in": None if auto_unload_s is None else round(max(0.0, auto_unload_s - idle), 3),
            "device": self.options.device,
            "dtype": self.options.dtype,
            "quantization": self.options.quantization,
            "device_map": self.options.device_map,
        }
        if (m := self.loaded) is not None:
            row.update(
                device=m.device,
                dtype=m.dtype,
                kind=m.kind,
                num_layers=m.num_layers,
                hidden_size=m.hidden_size,
                size_bytes=m.size_bytes,
                load_seconds=round(m.load_seconds, 3),
                max_context=m.max_context,
                path=str(m.ref.path) if m.ref.path else None,
            )
        return row


class ModelManager:
    def __init__(self, pm: pluggy.PluginManager, settings: Settings) -> None:
        self.pm = pm
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {}
        self._reaper: asyncio.Task | None = None
        self.started = time.monotonic()
        self.metrics = Metrics()
        # Request threads: each request's own work runs here, its forward calls on its model's thread. Enough for
        # every admitted request of every model, so none waits for a thread behind another model's queue. Torch runs
        # single-threaded on them (loom_kernel.openmp: their OpenMP teams would slow the model threads' passes).
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, settings.max_queue * max(1, settings.max_models)),
            thread_name_prefix="loom-request",
            initializer=one_torch_thread,
        )

    # -- resolution and ranking -------------------------------------------------------------------------

    def resolve(self, model_id: str, revision: str | None = None) -> ModelRef:
        return resolve_model(
            model_id,
            revision,
            aliases=self.settings.aliases,
            allowed_paths=self.settings.allowed_paths,
            custom_models=self.settings.custom_models,
        )

    def rank(self, ref: ModelRef) -> list[ProbeResult]:
        results = [r for r in self.pm.hook.probe(model=ref) if r is not None]
        return sorted(results, key=lambda r: (-r.score, r.loader))

    def probe_report(self, model_id: str, revision: str | None = None) -> dict[str, Any]:
        """Every plugin's answer for a model, best first; the top loader with a score above 0 is selected."""
        ref = self.resolve(model_id, revision)
        ranking = self.rank(ref)
        selected = next((r.loader for r in ranking if r.score > 0), None)
        return {
            "model": ref.id,
            "path": str(ref.path) if ref.path else None,
            "source": ref.source,
            "selected": selected,
            "ranking": [
                {"loader": r.loader, "score": r.score, "reason": r.reason, "selected": r.loader == selected}
                for r in ranking
            ],
            "loaders_without_opinion": sorted(set(loader_names(self.pm)) - {r.loader for r in ranking}),
        }

    def choose_loader(self, ref: ModelRef, requested: str | None) -> str:
        known = loader_names(self.pm)
        if requested is not None:
            if requested not in known:
                if requested in LOADER_PACKAGES:
                    raise MissingBackend(
                        f"loader: {requested!r} is not installed; pip install {LOADER_PACKAGES[requested]}",
                        field="loader",
                        allowed=known,
                    )
                raise InvalidField(f"loader: unknown loader {requested!r}", field="loader", allowed=known)
            return requested
        method = str((ref.quantization_config or {}).get("quant_method", ""))
        owner = QUANTIZATION_PACKAGES.get(method)
        if owner is not None and owner not in self._installed_distributions():
            # The generic loader would take it (any config.json) and fail deep inside transformers: say what to add.
            raise MissingBackend(
                f"model: {ref.id!r} is a {method} checkpoint and no installed plugin reads it; pip install {owner}",
                field="model",
                allowed=known,
            )
        ranking = [r for r in self.rank(ref) if r.score > 0]
        if not ranking:
            raise Unsupported(f"model: no installed loader can load {ref.id!r}", field="model", allowed=known)
        return ranking[0].loader

    def _installed_distributions(self) -> set[str]:
        return {row["package"] for row in describe_plugins(self.pm) if row["package"]}

    def options(
        self,
        *,
        device: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
        device_map: str | None = None,
        trust_remote_code: bool | None = None,
    ) -> LoadOptions:
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise InvalidField(f"device_map: unknown placement {device_map!r}", field="device_map", allowed=DEVICE_MAPS)
        if trust_remote_code and not self.settings.allow_remote_code_requests:
            raise Forbidden(
                "trust_remote_code: this server does not let requests ask to run a model's code; its operator can "
                "trust models in the config file (models.trust_remote_code) or let requests ask "
                "(models.allow_remote_code_requests)",
                field="trust_remote_code",
                allowed=[False],
            )
        opts = LoadOptions(
            device=device or self.settings.device(),
            dtype=dtype or self.settings.default_dtype,
            quantization=quantization,
            device_map=device_map,
            trust_remote_code=bool(trust_remote_code or self.settings.trust_remote_code),
        )
        if quantization:
            plan = self.pm.hook.quantize(method=quantization, options=opts)
            if plan is None:
                package = QUANTIZATION_PACKAGES.get(quantization)
                if package is not None and package in self._installed_distributions():
                    raise InvalidField(
                        f"quantization: {package} serves {quantization} checkpoints that are already quantized; "
                        f"it does not quantize at load time (that needs calibration data): quantize offline and "
                        f"load the saved directory",
                        field="quantization",
                    )
                hint = f"; pip install {package}" if package else ""
                raise MissingBackend(
                    f"quantization: no installed plugin handles {quantization!r}{hint}",
                    field="quantization",
                    allowed=sorted(QUANTIZATION_PACKAGES),
                )
            opts = attrs.evolve(opts, quantization_plan=plan)
        return opts

    # -- loading -----------------------------------------------------------------------------------------

    async def get(
        self,
        model_id: str,
        *,
        loader: str | None = None,
        revision: str | None = None,
        explicit: dict[str, Any] | None = None,
    ) -> ModelEntry:
        """The ready entry for ``model_id``, loading it first if needed.

        ``explicit`` holds the load options the request named; a loaded model whose options or loader differ
        from them is reloaded rather than silently reused.
        """
        explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
        entry = self._pending(model_id) or self.entries.get(model_id)
        if entry is not None and not self._differs(entry, loader, explicit):
            return await self._wait_ready(entry)
        # Resolution may read the HF cache or ask the hub: keep it off the event loop.
        ref = await asyncio.to_thread(self.resolve, model_id, revision)
        chosen = self.choose_loader(ref, loader)
        opts = self.options(**explicit)
        # Another request may have started a load meanwhile. One load per model id at a time: the same options
        # wait for it, others are a 409 (ten requests with ten dtypes must not load ten copies at once).
        if (pending := self._pending(model_id)) is not None:
            if self._differs(pending, chosen, explicit):
                raise Conflict(
                    f"model: {model_id!r} is being loaded with other options (dtype={pending.options.dtype}, "
                    f"device={pending.options.device}, quantization={pending.options.quantization}); retry when "
                    "it has loaded",
                    field="model",
                )
            return await self._wait_ready(pending)
        entry = self.entries.get(model_id)
        if entry is not None and not self._differs(entry, chosen, explicit):
            return await self._wait_ready(entry)
        return await self._load(model_id, ref, chosen, opts, replacing=entry)

    def _pending(self, model_id: str) -> ModelEntry | None:
        """The load of ``model_id`` in progress, first or replacing a loaded one, if any."""
        for key in (model_id, f"{model_id} (reloading)"):
            entry = self.entries.get(key)
            if entry is not None and entry.state == State.LOADING:
                return entry
        return None

    def _differs(self, entry: ModelEntry, loader: str | None, explicit: dict[str, Any]) -> bool:
        """Whether the request names a loader or option the entry was not loaded with.

        Device and dtype also match what the loader resolved: "float32" is the same as an "auto" that became
        float32, so asking explicitly for what is loaded does not reload it."""
        if loader is not None and loader != entry.loader:
            return True
        current = attrs.asdict(entry.options, recurse=False)
        for key, value in explicit.items():
            actual = getattr(entry.loaded, key, None) if key in ("device", "dtype") else None
            if value not in (current.get(key), actual):
                return True
        return False

    async def _wait_ready(self, entry: ModelEntry) -> ModelEntry:
        if entry.ready is not None and not entry.ready.done():
            await asyncio.shield(entry.ready)
        if entry.ready is not None and entry.ready.done() and entry.ready.exception() is not None:
            raise entry.ready.exception()  # type: ignore[misc]
        return entry

    async def _load(
        self, model_id: str, ref: ModelRef, loader: str, opts: LoadOptions, *, replacing: ModelEntry | None
    ) -> ModelEntry:
        if replacing is not None and replacing.in_flight:
            raise Conflict(
                f"model: {model_id!r} is serving requests with other load options; retry when it is idle",
                field="model",
            )
        victims = self._make_room(model_id, ref, opts)
        thread = ModelThread(model_id, self.limits(), self.metrics.model(model_id))
        entry = ModelEntry(model_id=model_id, loader=loader, options=opts, worker=thread)
        entry.ready = asyncio.get_running_loop().create_future()
        # The old entry stays listed (and usable) until the new one is in memory.
        pending_key = model_id if replacing is None else f"{model_id} (reloading)"
        self.entries[pending_key] = entry
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
        self.entries[model_id] = entry
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

    def _make_room(self, model_id: str, ref: ModelRef, opts: LoadOptions) -> list[ModelEntry]:
        """The least recently used idle models to evict so that ``ref`` fits under ``memory_fraction`` of its
        device, estimated from its files. They are dropped only once the new model is loaded, so a load that fails
        evicts nothing. InsufficientStorage (507) when the model can never fit, or busy models hold the rest."""
        device = resolve_device(opts.device)
        need = estimate_bytes(ref, opts, device)
        budget = budget_bytes(device, self.settings.memory_fraction)
        if need is None or budget is None:
            return []
        fraction = self.settings.memory_fraction
        if need > budget:
            raise InsufficientStorage(
                f"model: {model_id!r} needs about {_mib(need)} MiB on {device}, more than the {_mib(budget)} MiB "
                f"that memory_fraction {fraction} of {_mib(device_total_bytes(device) or 0)} MiB allows",
                field="model",
                needed_bytes=need,
                budget_bytes=budget,
            )
        resident = [
            e for e in self.entries.values() if e.state == State.READY and e.loaded and e.loaded.device == device
        ]
        used = sum(e.loaded.size_bytes for e in resident if e.loaded)
        victims: list[ModelEntry] = []
        for e in sorted((e for e in resident if e.in_flight == 0), key=lambda e: e.last_used):
            if used + need <= budget:
                break
            victims.append(e)
            used -= e.loaded.size_bytes if e.loaded else 0
        if used + need > budget:
            raise InsufficientStorage(
                f"model: {model_id!r} needs about {_mib(need)} MiB on {device}; the models serving requests there "
                f"hold the rest of the {_mib(budget)} MiB budget; retry when they are idle",
                field="model",
                needed_bytes=need,
                budget_bytes=budget,
            )
        return victims

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
            loaded = self.pm.hook.load(model=ref, loader=loader, options=opts)
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
        return loaded

    def _evict_lru(self, keep: ModelEntry) -> None:
        while True:
            ready = [e for e in self.entries.values() if e.state == State.READY]
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
        if self.entries.get(entry.model_id) is entry:
            del self.entries[entry.model_id]
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
        if self._pending(model_id) is not None:
            raise Conflict(f"model: {model_id!r} is loading; unload it once it has loaded", field="model_id")
        entry = self.entries.get(model_id)
        if entry is None or entry.state != State.READY:
            raise ModelNotFound(
                f"model: {model_id!r} is not loaded", field="model_id", allowed=sorted(self.loaded_ids())
            )
        if entry.in_flight:
            raise Conflict(f"model: {model_id!r} has {entry.in_flight} request(s) in flight", field="model_id")
        self._remove(entry)
        log.info("unloaded %s", model_id)

    def memory_report(self) -> dict[str, Any]:
        """Per device that holds models (and the default one): the budget, what the loaded models take."""
        devices = {resolve_device(self.settings.device())}
        devices.update(e.loaded.device for e in self.entries.values() if e.state == State.READY and e.loaded)
        report = {}
        for device in sorted(devices):
            used = sum(
                e.loaded.size_bytes
                for e in self.entries.values()
                if e.state == State.READY and e.loaded and e.loaded.device == device
            )
            report[device] = {
                "total_bytes": device_total_bytes(device),
                "budget_bytes": budget_bytes(device, self.settings.memory_fraction),
                "used_by_models_bytes": used,
            }
        return {"memory_fraction": self.settings.memory_fraction, "devices": report}

    def loaded_ids(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.state == State.READY]

    # -- running -----------------------------------------------------------------------------------------

    def limits(self) -> BatchLimits:
        s = self.settings
        return BatchLimits(
            max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens, window_s=s.batch_window_ms / 1000.0
        )

    async def run(
        self, entry: ModelEntry, fn: Callable[[LoadedModel], T], until: Coroutine[Any, Any, None] | None = None
    ) -> T:
        """``fn(model)`` on a request thread, its forward calls batched on the model's thread.

        At most ``max_queue`` requests per model are admitted at once (queued or running); the next is a 429 with
        a Retry-After estimated from recent batches. The request is cancelled (dropped if still queued, its
        generated rows stopped) when ``until`` returns first (the client went away) and when it runs past
        ``request_timeout`` (a 504). The model stays in flight (never unloaded) until the request's thread is done
        with it.
        """
        loaded = self._admit(entry, until)
        ticket = entry.worker.ticket()
        entry.in_flight += 1
        job = self._threads.submit(run_with_ticket, ticket, lambda: fn(loaded))
        job.add_done_callback(self._release(entry))  # before the awaiting side's: in_flight drops before the answer

        def cancel() -> None:
            ticket.cancel()
            if job.cancel():  # never started: its thread will not report arriving
                ticket.arrive()

        return await self._wait(entry, job, cancel, until)

    async def forward(
        self,
        entry: ModelEntry,
        batch: Batch,
        capture: Capture,
        then: Callable[[ForwardOutput], Any] | None = None,
        until: Coroutine[Any, Any, None] | None = None,
    ) -> Any:
        """One forward call queued on the model's thread straight from the event loop, with no request thread: its
        rows, or ``then(rows)`` computed on the model's thread right after its pass (for a few small tensor
        operations). Admission, cancellation and timeout as in ``run``."""
        loaded = self._admit(entry, until)
        ticket = entry.worker.ticket()
        entry.in_flight += 1
        try:
            job = entry.worker.enqueue(ticket, self.pm, loaded, batch, capture, then)
        except BaseException:
            entry.in_flight -= 1
            if until is not None:
                until.close()
            raise
        job.add_done_callback(self._release(entry))
        return await self._wait(entry, job, ticket.cancel, until)

    async def on_request_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a request thread (torch single-threaded there), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def loaded(self, entry: ModelEntry) -> LoadedModel:
        if entry.loaded is None:
            raise ModelNotFound(f"model: {entry.model_id!r} was unloaded", field="model")
        return entry.loaded

    def _admit(self, entry: ModelEntry, until: Coroutine[Any, Any, None] | None) -> LoadedModel:
        """The model, if it is loaded and its queue has room (else ModelNotFound, or the 429)."""
        try:
            loaded = self.loaded(entry)
            limit = self.settings.max_queue
            if limit and entry.in_flight >= limit:
                wait = entry.worker.seconds_per_batch * entry.in_flight / max(1, self.settings.max_batch_size)
                retry = max(1, math.ceil(wait))
                raise TooManyRequests(
                    f"model: {entry.model_id!r} has {entry.in_flight} requests in flight, its queue limit "
                    f"(max_queue {limit}); retry after {retry} s",
                    field="model",
                    retry_after=retry,
                    max_queue=limit,
                )
        except LoomError:
            if until is not None:
                until.close()
            raise
        return loaded

    @staticmethod
    def _release(entry: ModelEntry) -> Callable[[concurrent.futures.Future], None]:
        """A done callback (on whichever thread finishes the job) that ends the request's hold on the model."""
        loop = asyncio.get_running_loop()

        def done(_: concurrent.futures.Future) -> None:
            def release() -> None:
                entry.in_flight -= 1
                entry.last_used = time.monotonic()

            loop.call_soon_threadsafe(release)

        return done

    async def _wait(
        self,
        entry: ModelEntry,
        job: concurrent.futures.Future[T],
        cancel: Callable[[], None],
        until: Coroutine[Any, Any, None] | None,
    ) -> T:
        """``job``'s result; ``cancel()`` and Cancelled when ``until`` returns first, RequestTimeout past the limit."""
        result = asyncio.wrap_future(job)
        watcher = asyncio.ensure_future(until) if until is not None else None
        timeout = self.settings.request_timeout or None
        try:
            finished, _ = await asyncio.wait(
                {result} if watcher is None else {result, watcher}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        except asyncio.CancelledError:
            cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if result in finished:
            return result.result()
        cancel()
        if watcher is not None and watcher in finished:
            log.info("%s: the client went away; its request was cancelled", entry.model_id)
            raise Cancelled("request: the client closed the connection")
        raise RequestTimeout(
            f"request: took longer than this server's request_timeout of {timeout:g} s; it was stopped",
            field="request_timeout",
            allowed=f"up to {timeout:g} s",
        )

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def auto_unload_seconds(self) -> float | None:
        minutes = self.settings.auto_unload_minutes
        return None if minutes <= 0 else minutes * 60.0

    def describe(self) -> list[dict[str, Any]]:
        return [e.describe(self.auto_unload_seconds) for e in self.entries.values()]

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
        self._threads.shutdown(wait=False, cancel_futures=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _ids(entries: list[ModelEntry]) -> str:
    return ", ".join(e.model_id for e in entries)


def gauges(manager: ModelManager) -> list[dict[str, Any]]:
    """What /metrics reports per ready model right now."""
    return [
        {"model": e.model_id, "in_flight": e.in_flight, "queued": e.worker.queued}
        for e in manager.entries.values()
        if e.state == State.READY
    ]
