"""Request bodies, as msgspec Structs: validated at the boundary, before any model work."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException

from loom_kernel.types import RequestField

T = TypeVar("T")

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, description="a non-empty string")]
# Entries of a list that names layers or sites: more than any model has (duplicates are folded, so each costs once).
MAX_SITES = 4096
Sites = Annotated[list[int | str], msgspec.Meta(max_length=MAX_SITES)]
LayerSpec = int | str | Sites
MAX_STOPS = 16  # stop strings a generation may have (each is looked for after every token)
MAX_TOP_LOGPROBS = 20
# A seed is a non-negative int64: torch reads seeds modulo 2**64, so -1 and 2**64 - 1 would give the same tokens.
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1, description="0 to 2**63 - 1")]
PositionField = str | list[int]  # a request's positions as sent (checked against the model later)


class LoadFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to load the model if it is not loaded yet (or reload it when these differ).

    Unknown fields are refused: a misspelt ``max_token`` must not silently fall back to a default.
    """

    loader: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    device_map: str | None = None
    trust_remote_code: bool | None = None
    revision: str | None = None

    def explicit(self) -> dict[str, object]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "device_map": self.device_map,
            "trust_remote_code": self.trust_remote_code,
        }


class ModelRequest(LoadFields, kw_only=True):
    """A request for one model: its name, and how to load it (``ModelManager.get_for``)."""

    model: NonEmpty


class CaptureFields(ModelRequest, kw_only=True):
    hidden_state_layers: LayerSpec | None = None
    return_full_sequence: bool = False
    positions: PositionField | None = None
    hidden_state_format: str | None = None  # None: the server's hidden_states.default_format
    hidden_state_dtype: str | None = None  # None: the server's hidden_states.precision
    return_attention: bool = False


class GenerationFields(CaptureFields, kw_only=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None  # None: 256, or the model's context if shorter
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    seed: Seed | None = None
    stop: str | list[str] | None = None
    return_hidden_states: bool = False
    add_special_tokens: bool = True
    stream_hidden_states: bool = False  # /generate/stream: each token event carries its states
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    return_logits: bool = False


MAX_N = 16  # choices of one prompt a request may ask for: rows of one batch


class GenerateRequest(GenerationFields, kw_only=True):
    prompt: NonEmpty
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1


MAX_BATCH_PROMPTS = 64


class BatchGenerateRequest(GenerationFields, kw_only=True):
    prompts: Annotated[list[NonEmpty], msgspec.Meta(min_length=1, max_length=MAX_BATCH_PROMPTS)]


class ExtractRequest(CaptureFields, kw_only=True):
    text: NonEmpty
    add_special_tokens: bool = True
    return_logits: bool = False  # the model's own logits at the positions asked for


class LoadRequest(ModelRequest, kw_only=True):
    """POST /models/load."""


def with_fields(base: type[T], fields: Sequence[RequestField], generation: bool) -> type[T]:
    """``base`` with the plugins' request fields (those of generations too when ``generation``), each optional: a
    Struct of the same name, so that the schema and the error messages read as the base's."""
    chosen = [(f.name, f.type | None, None) for f in fields if generation or not f.generation]
    if not chosen:
        return base
    return msgspec.defstruct(  # type: ignore[return-value]
        base.__name__, chosen, bases=(base,), kw_only=True, forbid_unknown_fields=True, module=base.__module__
    )


_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


async def strict_fields(request: Request) -> None:
    """Litestar converts bodies leniently ("5" for 5, "true" for true); the README promises strict types. So the
    body is decoded here, once, straight into its Struct without coercion (a string where a number or a flag belongs
    is a 422 naming the field), and kept as the request's JSON: Litestar's own conversion then finds the Struct
    already made and passes it through. A body that is not JSON at all is left to Litestar's own 400."""
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    if data is None:
        return
    try:
        request._connection_state.json = msgspec.json.decode(await request.body(), type=data.annotation, strict=True)
    except msgspec.ValidationError as exc:
        parts = _AT.match(str(exc))
        path = (parts.group("path") or "").lstrip(".") if parts else ""
        message = parts.group("message") if parts else str(exc)
        if (unknown := _UNKNOWN.match(message)) and (hint := did_you_mean(data.annotation, path, unknown.group(1))):
            message = f"{message}: did you mean `{hint}`?"
        error = {"message": message, "key": path or "data", "source": "body"}
        raise ValidationException(detail=message, extra=[error]) from None
    except msgspec.DecodeError:
        return


def did_you_mean(root: Any, path: str, name: str) -> str | None:
    """The known field of the object at ``path`` (under Struct ``root``) that an unknown ``name`` most likely meant:
    a close spelling (``max_token``), or a field that ends in it (``layers`` for ``hidden_state_layers``)."""
    import difflib

    from msgspec import inspect

    info: Any = inspect.type_info(root)
    for step in re.findall(r"[A-Za-z_]\w*", path):  # list indices are skipped: a list's items share one type
        field = next((f for f in getattr(info, "fields", ()) if f.encode_name == step), None)
        if field is None:
            return None
        info = field.type
        while not isinstance(info, inspect.StructType):
            inner = [getattr(info, "item_type", None), *getattr(info, "types", ())]
            info = next((t for t in inner if isinstance(t, inspect.StructType | inspect.ListType)), None)
            if info is None:
                return None
    known = [f.encode_name for f in getattr(info, "fields", ())]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    if close:
        return close[0]
    ends = [k for k in known if k.endswith("_" + name) or k.startswith(name + "_")]
    return min(ends, key=len) if ends else None
