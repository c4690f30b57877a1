"""Recognising GPTQ / AWQ checkpoints from config.json and loading them through transformers.

transformers 5 reads a checkpoint's own ``quantization_config`` in ``from_pretrained``: for ``gptq`` it converts the
linear layers with optimum's ``GPTQQuantizer`` into gptqmodel ``QuantLinear`` modules, for ``awq`` it builds
gptqmodel's AWQ modules directly. gptqmodel then picks a kernel for the device (on CPU its pure-torch ones,
``TorchAtenLinear`` / ``TorchAtenAwqLinear``). So loading is the transformers plugin's ``load_model`` with nothing
added; this module checks what must be true first and says what was loaded.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from loom_kernel import Kernel, LoadedModel, LoadOptions, MissingBackend, ModelRef, ProbeResult, Unsupported

log = logging.getLogger("loom.gptq")

NAME = "gptq"
METHODS = ("gptq", "awq")
# The import names each method needs: transformers' GPTQ path goes through optimum, its AWQ path only gptqmodel.
BACKENDS: dict[str, tuple[str, ...]] = {"gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",)}
# What to pip install for each import name (gptqmodel pinned: 7.7.0 needs torch>=2.14.1, see pyproject.toml).
PIP_NAMES = {"gptqmodel": "gptqmodel==7.6.0", "optimum": "optimum"}
# quantization_config keys worth repeating in a probe reason or a log line, in this order.
DETAIL_KEYS = ("bits", "group_size", "format", "version", "checkpoint_format", "sym", "zero_point", "desc_act")


def quant_method(config: Any) -> str | None:
    """``gptq`` or ``awq`` when config.json's quantization_config says so, else None (whatever the config is)."""
    if not isinstance(config, dict):
        return None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if not isinstance(method, str):
        return None
    method = method.strip().lower()
    return method if method in METHODS else None


def describe(qc: Any) -> dict[str, Any]:
    """The quantization_config entries that tell two GPTQ/AWQ checkpoints apart (bits, group size, format, ...)."""
    if not isinstance(qc, dict):
        return {}
    return {key: qc[key] for key in DETAIL_KEYS if key in qc and isinstance(qc[key], str | int | float | bool)}


def probe_quantization(ref: ModelRef) -> ProbeResult | None:
    method = quant_method(ref.config)
    if method is None:
        return None
    details = ", ".join(f"{k} {v}" for k, v in describe(ref.quantization_config).items())
    reason = f"config.json quantization_config.quant_method is {method!r}" + (f" ({details})" if details else "")
    missing = missing_backends(method)
    if missing:  # still the right loader; loading will say the same thing as a 424
        reason += f"; backend not installed: pip install {' '.join(PIP_NAMES[m] for m in missing)}"
    return ProbeResult(loader=NAME, score=1.0, reason=reason)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (gptqmodel takes seconds to import)."""
    return importlib.util.find_spec(module) is not None


def missing_backends(method: str) -> list[str]:
    return [name for name in BACKENDS[method] if not installed(name)]


def require_backends(method: str) -> None:
    missing = missing_backends(method)
    if missing:
        packages = " ".join(PIP_NAMES[m] for m in missing)
        raise MissingBackend(
            f"loader: {method.upper()} checkpoints load through {' + '.join(BACKENDS[method])}, and "
            f"{', '.join(missing)} is not installed; pip install {packages} (or pip install loom-plugin-gptq)",
            field="loader",
        )


def load_quantized(ref: ModelRef, options: LoadOptions, kernel: Kernel | None) -> LoadedModel:
    method = quant_method(ref.config)
    if method is None and ref.config is not None:
        raise Unsupported(
            f"loader: {ref.id!r} is not a GPTQ or AWQ checkpoint (its config.json has no quantization_config with "
            "quant_method 'gptq' or 'awq'); the gptq loader loads pre-quantized checkpoints only, load this model "
            "with the transformers loader",
            field="loader",
        )
    if options.quantization_plan is not None:
        # The checkpoint's own quantization_config decides; a second one (bitsandbytes, ...) would conflict with it.
        raise Unsupported(
            f"quantization: {ref.id!r} is already quantized ({method or 'gptq/awq'}); leave quantization unset",
            field="quantization",
        )
    # Without a parsed config (a hub id not in the cache) the method is unknown until transformers reads it:
    # require everything either method needs.
    require_backends(method or "gptq")
    if kernel is None:
        raise Unsupported("loader: the gptq loader loads through the server's transformers loader", field="loader")
    loaded = kernel.pm.hook.load(model=ref, loader="transformers", options=options, kernel=kernel)
    if loaded is None:
        raise MissingBackend("loader: GPTQ and AWQ checkpoints load through loom-plugin-transformers", field="loader")
    loaded.loader = NAME
    qc = getattr(loaded.model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    found = (qc or {}).get("quant_method") if isinstance(qc, dict) else None
    if method is None and str(found).lower() not in METHODS:
        raise Unsupported(
            f"loader: {ref.id!r} loaded without a GPTQ or AWQ quantization_config (found {found!r}); "
            "load it with the transformers loader",
            field="loader",
        )
    # Which kernel gptqmodel chose is what decides speed and the device it can run on: keep it for logs and tests.
    kernels = sorted({type(m).__name__ for m in loaded.model.modules() if hasattr(m, "qweight")})
    loaded.extra["quantization"] = {"method": method or str(found).lower(), **describe(qc), "kernels": kernels}
    log.info(
        "gptq loaded %s: %s %s, %d quantized linear layers (%s kernel) on %s as %s",
        ref.id,
        loaded.extra["quantization"]["method"].upper(),
        ", ".join(f"{k} {v}" for k, v in describe(qc).items()),
        sum(1 for m in loaded.model.modules() if hasattr(m, "qweight")),
        "/".join(kernels) or "no",
        loaded.device,
        loaded.dtype,
    )
    return loaded
