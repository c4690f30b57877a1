"""The ``interp`` plugin: interventions and readouts (the logit lens, probes, sparse autoencoders, stop rules) on
the kernel's requests, the stores of vectors and probes, and the routes /vectors, /vectors/contrast, /patch,
/logit_attribution, /probes and /probes/fit."""

from __future__ import annotations

import functools
from typing import Any

from loom_interp.attribution import AttributionController
from loom_interp.bounds import CAPTURE_MAX_MB
from loom_interp.fields import REQUEST_FIELDS
from loom_interp.fitting import FIT_OPTIONS
from loom_interp.interventions import resolve_interventions
from loom_interp.patching import PATCH_MAX_ROWS, PatchController
from loom_interp.probes import ProbesController
from loom_interp.readouts import Readouts, feature_vector
from loom_interp.state import interp
from loom_interp.stores import (
    PROBES_DIRECTORY,
    PROBES_MAX_ENTRIES,
    PROBES_MAX_MB,
    VECTORS_DIRECTORY,
    VECTORS_MAX_ENTRIES,
    VECTORS_MAX_MB,
)
from loom_interp.vectors import VectorsController
from loom_kernel import Kernel, LoadedModel, Option, Reading, RequestField, hookimpl


@hookimpl
def options() -> list[Option]:
    return [
        VECTORS_DIRECTORY,
        VECTORS_MAX_MB,
        VECTORS_MAX_ENTRIES,
        PATCH_MAX_ROWS,
        CAPTURE_MAX_MB,
        PROBES_DIRECTORY,
        PROBES_MAX_MB,
        PROBES_MAX_ENTRIES,
        *FIT_OPTIONS,
    ]


@hookimpl
def routes(kernel: Kernel) -> list[Any]:
    return [VectorsController, PatchController, ProbesController, AttributionController]


@hookimpl
def startup(kernel: Kernel) -> None:
    interp(kernel)  # the stores read their directories now, not on the first request


@hookimpl
def shutdown(kernel: Kernel) -> None:
    interp(kernel).fitter.close()


@hookimpl
def request_fields() -> list[RequestField]:
    return REQUEST_FIELDS


@hookimpl
def readouts(model: LoadedModel, fields: dict[str, Any], kernel: Kernel, caller: str) -> Reading:
    kept = interp(kernel)
    plan = Readouts(
        lens=fields.get("logit_lens"),
        probes=tuple(fields.get("probes") or ()),
        stop_when=tuple(fields.get("stop_when") or ()),
        store=kept.probes,
        owner=caller,
    ).plan(model)
    features = functools.partial(feature_vector, kept.probes, caller)
    vectors = functools.partial(kept.vectors.tensor, owner=caller)
    edits = resolve_interventions(fields.get("interventions") or (), model, vectors, features)
    return Reading(
        edits=edits,
        layers=tuple(plan.layers),
        sites=tuple(plan.sites),
        read=functools.partial(plan.read, model) if plan.streams else None,
        stop=plan.stop if plan.stops else None,
        bytes_per_position=plan.bytes_per_position(model),
    )
