"""The ``embeddings`` routes: POST /embed, /embed/batch and OpenAI's /v1/embeddings, sentence embeddings pooled on the
server (the kernel's ``pool`` hook), cut to ``dimensions`` and normalized by the model's convention or the request's."""

from __future__ import annotations

from typing import Any

from loom_embeddings.openai import EmbeddingsController, OpenAIEmbeddingRequest
from loom_embeddings.routes import EMBED_REQUESTS, EmbedController
from loom_kernel import Kernel, hookimpl


@hookimpl
def routes(kernel: Kernel) -> list[Any]:
    # Every embedding route takes the plugins' edits (``interventions``; an OpenAI client sends them in extra_body):
    # the pooled vector of the edited states.
    bases = {**EMBED_REQUESTS, "OpenAIEmbeddingRequest": OpenAIEmbeddingRequest}
    types = {name: kernel.request_type(base, generation=False, reads=False) for name, base in bases.items()}
    return [
        type(controller.__name__, (controller,), {"signature_namespace": types})
        for controller in (EmbedController, EmbeddingsController)
    ]
