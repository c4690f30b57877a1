"""Device and dtype resolution shared by every loader plugin, so that a request's `device` and `dtype` mean the
same thing whichever plugin loads the model.

- device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (``cuda:0`` when CUDA is present, else ``cpu``); CUDA asked for
  on a machine without it, or an index that does not exist, is a 422 naming ``device``.
- dtype: ``auto`` is bfloat16 on CUDA with compute capability >= 8, float16 on older CUDA, float32 on CPU;
  ``float32``, ``float16`` and ``bfloat16`` are taken as given.
"""

from __future__ import annotations

from typing import Any

from loom_kernel.errors import InvalidField, echo

LOAD_DTYPES = ("auto", "float32", "float16", "bfloat16")
# accelerate's placements of one model over every visible device (CPU RAM after the GPUs).
DEVICE_MAPS = ["auto", "balanced", "balanced_low_0", "sequential"]


def resolve_device(device: str) -> str:
    """The concrete device for a requested one (``cpu`` or ``cuda:N``)."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidField(
                f"device: {device!r} asked for, but this machine has no CUDA device", field="device", allowed=["cpu"]
            )
        suffix = device.partition(":")[2]
        index = int(suffix or 0) if suffix.isdigit() or not suffix else -1
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise InvalidField(
                f"device: {device!r} does not exist",
                field="device",
                allowed=["cpu", *(f"cuda:{i}" for i in range(count))],
            )
        return f"cuda:{index}"
    raise InvalidField(f"device: unknown device {device!r}", field="device", allowed=["cpu", "cuda:N", "auto"])


def resolve_dtype(name: str, device: str) -> Any:
    """The torch dtype for a requested name on a resolved device."""
    import torch

    if name not in LOAD_DTYPES:
        raise InvalidField(f"dtype: unknown dtype {echo(name)}", field="dtype", allowed=list(LOAD_DTYPES))
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32
