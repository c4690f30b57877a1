"""Which loader loads a model and with which options: the probe hook's ranking, checked options, install hints."""

from __future__ import annotations

from typing import Any

import attrs
import pluggy

from loom_kernel.config import Settings
from loom_kernel.devices import DEVICE_MAPS
from loom_kernel.errors import Forbidden, InvalidField, MissingBackend, Unsupported
from loom_kernel.installed import describe_plugins, loader_names
from loom_kernel.types import LoadOptions, ModelRef, ProbeResult


def rank(pm: pluggy.PluginManager, ref: ModelRef) -> list[ProbeResult]:
    results = [r for r in pm.hook.probe(model=ref) if r is not None]
    return sorted(results, key=lambda r: (-r.score, r.loader))


def probe_report(pm: pluggy.PluginManager, ref: ModelRef) -> dict[str, Any]:
    """Every plugin's answer for a model, best first; the top loader with a score above 0 is selected."""
    ranking = rank(pm, ref)
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
        "loaders_without_opinion": sorted(set(loader_names(pm)) - {r.loader for r in ranking}),
    }


def install_hints(pm: pluggy.PluginManager, kind: str) -> dict[str, str]:
    """Name -> distribution to pip install, for ``kind`` "loader" or "quantization" (the ``install_hints`` hook)."""
    return {name: dist for hints in pm.hook.install_hints() for name, dist in (hints or {}).get(kind, {}).items()}


def choose_loader(pm: pluggy.PluginManager, ref: ModelRef, requested: str | None) -> str:
    known = loader_names(pm)
    if requested is not None:
        if requested not in known:
            if (package := install_hints(pm, "loader").get(requested)) is not None:
                raise MissingBackend(
                    f"loader: {requested!r} is not installed; pip install {package}",
                    field="loader",
                    allowed=known,
                )
            raise InvalidField(f"loader: unknown loader {requested!r}", field="loader", allowed=known)
        refused = [r for r in rank(pm, ref) if r.loader == requested and r.score <= 0]
        if refused:
            raise Unsupported(
                f"model: the {requested} loader cannot load {ref.id!r}: {refused[0].reason}", field="model"
            )
        return requested
    method = str((ref.quantization_config or {}).get("quant_method", ""))
    owner = install_hints(pm, "quantization").get(method) if method else None
    if owner is not None and owner not in _installed_distributions(pm):
        # The generic loader would take it (any config.json) and fail deep inside transformers: say what to add.
        raise MissingBackend(
            f"model: {ref.id!r} is a {method} checkpoint and no installed plugin reads it; pip install {owner}",
            field="model",
            allowed=known,
        )
    ranking = rank(pm, ref)
    if not ranking or ranking[0].score <= 0:
        # A loader that knows the model but refuses it scores 0 and says why.
        why = "".join(f"; {r.loader}: {r.reason}" for r in ranking)
        raise Unsupported(f"model: no installed loader can load {ref.id!r}{why}", field="model", allowed=known)
    return ranking[0].loader


def load_options(
    pm: pluggy.PluginManager,
    settings: Settings,
    *,
    device: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool | None = None,
) -> LoadOptions:
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise InvalidField(f"device_map: unknown placement {device_map!r}", field="device_map", allowed=DEVICE_MAPS)
    if quantization is not None and not quantization.strip():
        raise InvalidField(
            "quantization: an empty method names none; leave the field out (or null) to load without quantization",
            field="quantization",
            allowed=sorted(install_hints(pm, "quantization")),
        )
    if trust_remote_code and not settings.allow_remote_code_requests:
        raise Forbidden(
            "trust_remote_code: this server does not let requests ask to run a model's code; its operator can "
            "trust models in the config file (models.trust_remote_code) or let requests ask "
            "(models.allow_remote_code_requests)",
            field="trust_remote_code",
            allowed=[False],
        )
    opts = LoadOptions(
        device=device or settings.device(),
        dtype=dtype or settings.default_dtype,
        quantization=quantization,
        device_map=device_map,
        trust_remote_code=bool(trust_remote_code or settings.trust_remote_code),
    )
    if quantization:
        plan = pm.hook.quantize(method=quantization, options=opts)
        if plan is None:
            known = install_hints(pm, "quantization")
            package = known.get(quantization)
            if package is not None and package in _installed_distributions(pm):
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
                allowed=sorted(known),
            )
        opts = attrs.evolve(opts, quantization_plan=plan)
    return opts


def _installed_distributions(pm: pluggy.PluginManager) -> set[str]:
    return {row["package"] for row in describe_plugins(pm) if row["package"]}
