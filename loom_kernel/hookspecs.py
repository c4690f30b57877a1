"""The hooks a Loom plugin may implement; ``docs/plugins.md`` gives each one's arguments, result and an example."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from loom_kernel.config import Option, Settings
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
    RequestField,
    Transport,
)

if TYPE_CHECKING:
    from loom_kernel.models import Kernel

hookspec = pluggy.HookspecMarker("loom")
hookimpl = pluggy.HookimplMarker("loom")


@hookspec
def probe(model: ModelRef) -> ProbeResult | None:
    """Score 0..1 how well this plugin loads ``model`` from its config files alone; never raise."""


@hookspec(firstresult=True)
def load(model: ModelRef, loader: str, options: LoadOptions, kernel: Kernel | None) -> LoadedModel | None:
    """Load ``model`` when ``loader`` names this plugin (``kernel``: the server's, None outside a server)."""


@hookspec(firstresult=True)
def forward_with_states(model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
    """Run a forward pass or a whole generation capturing the requested states, when ``model.loader`` is yours.

    The kernel's default (trylast) runs ``model.runner.forward``: a loader that sets a runner needs no hook."""


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
def install_hints() -> dict[str, dict[str, str]] | None:
    """What to pip install for a ``loader`` or a ``quantization`` method no installed plugin provides: kind -> name ->
    distribution."""


@hookspec
def options() -> list[Option] | None:
    """The settings this plugin reads: config file section, environment variables, ``loom serve`` flags."""


@hookspec
def transport(settings: Settings) -> Transport | None:
    """Offer a named transport that binds sockets for the server."""


@hookspec
def routes(kernel: Kernel) -> list[Any] | None:
    """Litestar Controllers or route handlers this plugin adds to the server's API."""


@hookspec
def startup(kernel: Kernel) -> None:
    """The server starts: make what this plugin keeps for it (``kernel.state``); runs before the first request."""


@hookspec
def shutdown(kernel: Kernel) -> None:
    """The server stops: release what this plugin made for it."""


@hookspec
def request_fields() -> list[RequestField] | None:
    """Fields this plugin reads from the capture requests (/extract, /generate and its forms, OpenAI completions)."""


@hookspec
def readouts(model: LoadedModel, fields: dict[str, Any], kernel: Kernel, caller: str) -> Reading | None:
    """Resolve on ``model`` this plugin's request fields that a request gives, by name (``caller``: the owner of the
    request's API key, whose stored names it uses; "" without keys)."""
