"""The memory budget: which idle models to evict so that a new one fits under ``memory_fraction`` of its device,
and what the loaded models take (GET /health's memory report)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loom_kernel.config import Settings
from loom_kernel.devices import resolve_device
from loom_kernel.entry import State
from loom_kernel.errors import InsufficientStorage
from loom_kernel.memory import budget_bytes, device_total_bytes, estimate_bytes
from loom_kernel.types import LoadOptions, ModelRef

if TYPE_CHECKING:
    from loom_kernel.entry import ModelEntry


def make_room(
    entries: Iterable[ModelEntry], model_id: str, ref: ModelRef, opts: LoadOptions, fraction: float
) -> tuple[list[ModelEntry], int]:
    """The least recently used idle models to evict so that ``ref`` fits under ``memory_fraction`` of its
    device, estimated from its files, and that estimate (0 when there is none): the load holds it against the budget
    until it ends (``ModelEntry.reserved``). Victims are dropped only once the new model is loaded, so a load that
    fails evicts nothing. InsufficientStorage (507) when the model can never fit, or busy or loading models hold the
    rest."""
    device = resolve_device(opts.device)
    need = estimate_bytes(ref, opts, device)
    budget = budget_bytes(device, fraction)
    if need is None or budget is None:
        return [], 0
    if need > budget:
        raise InsufficientStorage(
            f"model: {model_id!r} needs about {_mib(need)} MiB on {device}, more than the {_mib(budget)} MiB "
            f"that memory_fraction {fraction} of {_mib(device_total_bytes(device) or 0)} MiB allows",
            field="model",
            needed_bytes=need,
            budget_bytes=budget,
        )
    entries = list(entries)
    resident = [e for e in entries if e.state == State.READY and e.loaded and e.loaded.device == device]
    # Loads in progress count with their estimate: each was checked before the other's model was in memory, so
    # without it two loads at once both pass and together exceed the budget.
    loading = [e for e in entries if e.state == State.LOADING and resolve_device(e.options.device) == device]
    used = sum(e.loaded.size_bytes for e in resident if e.loaded) + sum(e.reserved for e in loading)
    victims: list[ModelEntry] = []
    for e in sorted((e for e in resident if e.in_flight == 0), key=lambda e: e.last_used):
        if used + need <= budget:
            break
        victims.append(e)
        used -= e.loaded.size_bytes if e.loaded else 0
    if used + need > budget:
        raise InsufficientStorage(
            f"model: {model_id!r} needs about {_mib(need)} MiB on {device}; the models serving requests or loading "
            f"there hold the rest of the {_mib(budget)} MiB budget; retry when they are idle",
            field="model",
            needed_bytes=need,
            budget_bytes=budget,
        )
    return victims, need


def memory_report(ready: list[ModelEntry], settings: Settings) -> dict[str, Any]:
    """Per device that holds models (and the default one): the budget, what the ``ready`` models take."""
    devices = {resolve_device(settings.device())}
    devices.update(e.loaded.device for e in ready if e.loaded)
    report = {}
    for device in sorted(devices):
        used = sum(e.loaded.size_bytes for e in ready if e.loaded and e.loaded.device == device)
        report[device] = {
            "total_bytes": device_total_bytes(device),
            "budget_bytes": budget_bytes(device, settings.memory_fraction),
            "used_by_models_bytes": used,
        }
    return {"memory_fraction": settings.memory_fraction, "devices": report}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"
