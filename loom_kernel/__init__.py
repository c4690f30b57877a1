"""The Loom kernel: hook specifications, plugin manager, model manager and REST API."""

from loom_kernel.config import Option
from loom_kernel.errors import LoomError, echo
from loom_kernel.hookspecs import hookimpl
from loom_kernel.inputs import chars_per_token, fit_text
from loom_kernel.types import (
    Batch,
    Capture,
    ForwardOutput,
    GenerationParams,
    Gradient,
    Intervention,
    LayerSel,
    LoadedModel,
    LoadOptions,
    ModelRef,
    ProbeResult,
    QuantizationPlan,
    Reading,
    SequenceOutput,
    Transport,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Capture",
    "ForwardOutput",
    "GenerationParams",
    "Gradient",
    "Intervention",
    "LayerSel",
    "LoadOptions",
    "LoadedModel",
    "LoomError",
    "ModelRef",
    "Option",
    "ProbeResult",
    "QuantizationPlan",
    "Reading",
    "SequenceOutput",
    "Transport",
    "__version__",
    "chars_per_token",
    "echo",
    "fit_text",
    "hookimpl",
]
