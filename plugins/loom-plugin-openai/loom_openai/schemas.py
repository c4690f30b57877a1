"""Request bodies of the OpenAI-compatible endpoints.

Unknown fields are accepted (OpenAI clients send fields such as ``user`` that change nothing here); fields that
would change the result and are not implemented are refused by name in ``completions.py``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from loom_kernel.api.schemas import MAX_N, Interventions, LayerSpec, LensFields, NonEmpty, PositionSpec, Probes, Seed
from loom_kernel.errors import InvalidField

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's own limit
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit on chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on the legacy completions' logprobs


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class OpenAIFields(msgspec.Struct, kw_only=True):
    model: NonEmpty
    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # The Loom's own fields, passed with the SDK's extra_body.
    return_hidden_states: bool = False
    hidden_state_layers: LayerSpec | None = None
    interventions: Interventions | None = None
    logit_lens: LensFields | None = None
    probes: Probes | None = None
    positions: PositionSpec | None = None
    return_full_sequence: bool = False
    hidden_state_format: str | None = None
    hidden_state_dtype: str | None = None
    loader: str | None = None
    device: str | None = None
    dtype: str | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0

    def explicit(self) -> dict[str, object]:
        return {"device": self.device, "dtype": self.dtype}


class ChatCompletionRequest(OpenAIFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(OpenAIFields, kw_only=True):
    prompt: str | list[Any]  # a text, or token ids (openai_inputs): one prompt a request
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None


def openai_inputs(value: Any, field: str) -> tuple[list[str], list[list[int]] | None]:
    """OpenAI's shapes of ``input`` or ``prompt``: a string, strings, token ids, or lists of token ids. Returns
    (texts, None) or ([], token id rows); anything else is InvalidField naming ``field``. A flat list of ids is
    one row."""
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str) and value:
        return [value], None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value), None
    if isinstance(value, list) and value and all(_is_id(v) for v in value):
        return [], [list(value)]
    if isinstance(value, list) and value and all(isinstance(r, list) and r and all(map(_is_id, r)) for r in value):
        return [], [list(r) for r in value]
    raise InvalidField(f"{field}: must be {shapes}, none of them empty", field=field, allowed=shapes)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
