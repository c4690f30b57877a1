"""Request bodies of the OpenAI-compatible endpoints.

Every field OpenAI's API defines for an endpoint is declared here: honoured, accepted where it changes nothing an
answer carries (``NO_EFFECT``), or refused by name when asked for something this server does not do
(``completions.refuse_unsupported``). Any other field is a 400 naming it, as OpenAI answers, so that a misspelt
field never falls back to a default in silence. A field OpenAI allows to be null means its default when null.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from loom_kernel import (
    MAX_N,
    LayerSpec,
    ModelRequest,
    PositionField,
    Seed,
)

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's own limit
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit on chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on the legacy completions' logprobs
MAX_PROMPTS = 64  # prompts of one /v1/completions request times n: rows of one batch, as /generate/batch's limit
# OpenAI's fields that concern its own monitoring, storage, caching and billing, or tools this server refuses: they
# change nothing in an answer here, so they are accepted as they are.
NO_EFFECT = (
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "service_tier",
    "parallel_tool_calls",
)


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A message's role, content and name; a field the server would drop (``tool_calls``, ``tool_call_id``,
    ``function_call``: tools are not served) is refused rather than silently lost from the conversation."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class OpenAIFields(ModelRequest, kw_only=True):
    """What chat completions and completions share: OpenAI's fields, then The Loom's (the SDK's ``extra_body``).
    Unknown fields are refused, as ``LoadFields``' are."""

    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None  # None: OpenAI's default, 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None  # None: 1.0
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None  # None: 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # The Loom's own fields, passed with the SDK's extra_body (and the plugins' request fields: the kernel's
    # ``request_type`` adds them).
    return_hidden_states: bool = False
    hidden_state_layers: LayerSpec | None = None
    positions: PositionField | None = None
    return_full_sequence: bool = False
    hidden_state_format: str | None = None
    hidden_state_dtype: str | None = None
    return_attention: bool = False
    return_logits: bool = False
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        # null is OpenAI's default: read it as such once, here, so the routes see plain values.
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.n = 1 if self.n is None else self.n
        self.stream = bool(self.stream)


class ChatCompletionRequest(OpenAIFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(OpenAIFields, kw_only=True):
    prompt: str | list[Any]  # a text, texts, token ids or lists of token ids (texts_or_ids): one choice set each
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None
