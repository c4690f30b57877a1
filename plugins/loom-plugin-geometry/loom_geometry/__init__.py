"""The ``geometry`` routes: POST /analyze, each layer's effective dimension and spectral decay, on the server."""

from __future__ import annotations

from typing import Any

from loom_geometry.analyze import AnalyzeController
from loom_kernel import hookimpl


@hookimpl
def routes() -> list[Any]:
    return [AnalyzeController]
