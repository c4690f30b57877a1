"""The ``embeddings`` routes: POST /embed and /embed/batch, sentence embeddings pooled on the server (the kernel's
``pool`` hook), cut to ``dimensions`` and normalized by the model's convention or the request's."""

from __future__ import annotations

from typing import Any

from loom_embeddings.routes import EmbedController
from loom_kernel import hookimpl


@hookimpl
def routes() -> list[Any]:
    return [EmbedController]
