"""The ``openai`` routes: OpenAI's chat completions, completions and model list, served by the kernel's one path into
a model, with The Loom's states as extra fields (``/v1/embeddings`` is loom-plugin-embeddings', beside ``/embed``)."""

from __future__ import annotations

from typing import Any

from loom_kernel import Kernel, hookimpl
from loom_openai.completions import OpenAIController
from loom_openai.schemas import ChatCompletionRequest, CompletionRequest


@hookimpl
def routes(kernel: Kernel) -> list[Any]:
    # The bodies take the plugins' request fields (interventions, readouts) as /generate's do.
    types = {
        "ChatCompletionRequest": kernel.request_type(ChatCompletionRequest, generation=True),
        "CompletionRequest": kernel.request_type(CompletionRequest, generation=True),
    }
    return [type("OpenAIController", (OpenAIController,), {"signature_namespace": types})]
