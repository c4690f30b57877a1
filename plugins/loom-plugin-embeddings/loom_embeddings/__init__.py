"""The ``embeddings`` routes: POST /embed, /embed/batch and OpenAI's /v1/embeddings, sentence embeddings pooled on the
server (the kernel's ``pool`` hook), cut to ``dimensions`` and normalized by the model's convention or the request's."""

from __future__ import annotations

from typing import Any

from loom_embeddings.openai import EmbeddingsController
from loom_embeddings.routes import EMBED_REQUESTS, EmbedController
from loom_kernel import Kernel, hookimpl


@hookimpl
def routes(kernel: Kernel) -> list[Any]:
    # /embed and /embed/batch take the plugins' edits (``interventions``): the pooled vector of the edited states.
    types = {name: kernel.request_type(base, generation=False, reads=False) for name, base in EMBED_REQUESTS.items()}
    return [type(EmbedController.__name__, (EmbedController,), {"signature_namespace": types}), EmbeddingsController]
