"""The hooks a Loom plugin may implement. See DESIGN.md section 2 for the full contracts."""

from __future__ import annotations

from typing import Any

import pluggy

from loom_kernel.config import Option
from loom_kernel.types import (
    Batch,
    Capture,
    ForwardOutput,
    LoadedModel,
    LoadOptions,
    ModelRef,
    ProbeResult,
    QuantizationPlan,
    Reading,
    Transport,
)

hookspec = pluggy.HookspecMarker("loom")
hookimpl = pluggy.HookimplMarker("loom")


@hookspec
def probe(model: ModelRef) -> ProbeResult | None:
    """Score 0..1 how well this plugin loads ``model`` from its config files alone; never raise."""


@hookspec(firstresult=True)
def load(model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
    """Load ``model`` when ``loader`` names this plugin."""


@hookspec(firstresult=True)
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    """Run a forward pass or a whole generation capturing the requested states, when ``model.loader`` is yours.

    The server's scheduler steps generations through ``LoadedModel.decoder`` when the loader sets one, so that
    requests join a running batch; a loader without one has its generations run whole through this hook."""


@hookspec(firstresult=True)
def pool(output: Any, strategy: str, mask: Any) -> Any | None:
    """Pool per-token states [B, T, H] with attention mask [B, T] by ``strategy``; None when not yours."""


@hookspec(firstresult=True)
def quantize(method: str, options: LoadOptions) -> QuantizationPlan | None:
    """Turn a quantization method name into load arguments; None when the method is not yours."""


@hookspec
def model_sources() -> dict[str, str] | None:
    """Models this plugin ships, by the names a request may give: the directory each one is in."""


@hookspec
def options() -> list[Option] | None:
    """The settings this plugin reads: config file section, environment variables, ``loom serve`` flags."""


@hookspec
def transport(settings: Any) -> Transport | None:
    """Offer a named transport that binds sockets for the server."""


@hookspec
def routes() -> list[Any] | None:
    """Litestar Controllers or route handlers this plugin adds to the API."""


@hookspec(firstresult=True)
def readouts(model: LoadedModel, fields: dict[str, Any], manager: Any, caller: str) -> Reading | None:
    """Resolve the ``interventions``, ``logit_lens``, ``probes`` and ``stop_when`` a request gives on ``model``
    (``caller``: the owner of the request's API key, whose stored names it uses; "" without keys)."""
