"""The ``geometry`` routes: POST /analyze, each layer's effective dimension and spectral decay, on the server."""

from __future__ import annotations

from typing import Any

from loom_geometry.analyze import CAPTURE_MAX_MB, AnalyzeController
from loom_kernel import Option, hookimpl


@hookimpl
def routes() -> list[Any]:
    return [AnalyzeController]


@hookimpl
def options() -> list[Option]:
    return [CAPTURE_MAX_MB]
