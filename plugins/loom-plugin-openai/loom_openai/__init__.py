"""The ``openai`` routes: OpenAI's chat completions, completions, embeddings and model list, served by the kernel's
one path into a model, with The Loom's states as extra fields."""

from __future__ import annotations

from typing import Any

from loom_kernel import hookimpl
from loom_openai.completions import OpenAIController
from loom_openai.embeddings import EmbeddingsController


@hookimpl
def routes() -> list[Any]:
    return [OpenAIController, EmbeddingsController]
