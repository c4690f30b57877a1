"""What GET /models and /metrics report of the loaded models."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loom_kernel.entry import ModelEntry


def describe(entry: ModelEntry, auto_unload_s: float | None) -> dict[str, Any]:
    """One model's row in GET /models."""
    idle = 0.0 if entry.in_flight else time.monotonic() - entry.last_used
    row: dict[str, Any] = {
        "model_id": entry.model_id,
        "names": entry.names,  # every name requests reached this one loaded copy by
        "loader": entry.loader,
        "state": entry.state,
        "in_flight": entry.in_flight,
        "queued": entry.worker.queued,
        # Cumulative for this model id, across reloads (the counters /metrics reports).
        "batches": entry.worker.counters.batches,
        "batched_requests": entry.worker.counters.batched_requests,
        "decode_steps": entry.worker.counters.decode_steps,
        "joined_running": entry.worker.counters.joined_running,
        "running_rows": entry.worker.running_rows,
        "idle_seconds": round(idle, 3),
        "auto_unload_in": None if auto_unload_s is None else round(max(0.0, auto_unload_s - idle), 3),
        "device": entry.options.device,
        "dtype": entry.options.dtype,
        "quantization": entry.options.quantization,
        "device_map": entry.options.device_map,
    }
    if (m := entry.loaded) is not None:
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


def gauges(ready: list[ModelEntry]) -> list[dict[str, Any]]:
    """What /metrics reports per ready model right now."""
    return [{"model": e.model_id, "in_flight": e.in_flight, "queued": e.worker.queued} for e in ready]
