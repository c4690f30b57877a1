"""The ``openai`` routes: OpenAI's chat completions, completions and model list, served by the kernel's one path into
a model, with The Loom's states as extra fields (``/v1/embeddings`` is loom-plugin-embeddings', beside ``/embed``)."""

from __future__ import annotations

from typing import Any

from loom_kernel import Kernel, hookimpl
from loom_openai.completions import OpenAIController


@hookimpl
def routes(kernel: Kernel) -> list[Any]:
    return [OpenAIController]
