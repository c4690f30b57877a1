"""The Loom kernel's public API: everything a plugin may use is a name of this package (``from loom_kernel import
...``); every other module of ``loom_kernel`` is private and may change. ``docs/plugins.md`` describes the hooks.

The plain types, errors, settings and ``hookimpl`` are imported at once; the rest (the web layer, the model manager,
torch helpers) on first use, so that ``import loom_kernel`` in a plugin stays as cheap as a probe must be.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loom_kernel.config import ConfigError, Option, Settings
from loom_kernel.errors import (
    BadModel,
    BadRequest,
    Conflict,
    Forbidden,
    InsufficientStorage,
    InvalidField,
    LoadFailed,
    LoomError,
    MissingBackend,
    ModelNotFound,
    RequestTimeout,
    TooManyRequests,
    Unsupported,
    echo,
    load_error,
)
from loom_kernel.hookspecs import hookimpl
from loom_kernel.inputs import (
    batch_inputs,
    chars_per_token,
    check_edit_positions,
    check_vocabulary,
    fit_text,
    row_lengths,
    texts_or_ids,
    vocabulary_size,
)
from loom_kernel.types import (
    Attribution,
    Batch,
    Capture,
    Decoder,
    ForwardOutput,
    GenerationParams,
    Gradient,
    Intervention,
    LayerSel,
    LoadedModel,
    LoadOptions,
    ModelParts,
    ModelRef,
    PositionSpec,
    ProbeResult,
    QuantizationPlan,
    Reading,
    RequestField,
    RowInput,
    Runner,
    SequenceOutput,
    StepOutput,
    Transport,
)
from loom_kernel.version import __version__

# Imported on first use: name -> the private module that defines it.
_LAZY = {
    **dict.fromkeys(
        ("StateRecorder", "check_site", "find_blocks", "resolve_layers", "resolve_positions", "site_names_allowed"),
        "loom_kernel.capture",
    ),
    "split_sites": "loom_kernel.capture",
    **dict.fromkeys(("resolve_device", "resolve_dtype"), "loom_kernel.devices"),
    **dict.fromkeys(("count_layers", "module_bytes"), "loom_kernel.loading"),
    **dict.fromkeys(("b64_raw", "encode_tensor", "json_raw", "SAFETENSORS_MEDIA_TYPE"), "loom_kernel.encoding"),
    "Session": "loom_kernel.admission",
    "generate_whole": "loom_kernel.batching",
    **dict.fromkeys(("Layout", "apply_edit", "edit_columns", "row_edits"), "loom_kernel.editing"),
    **dict.fromkeys(("Kernel", "ModelManager"), "loom_kernel.models"),
    "ModelEntry": "loom_kernel.entry",
    "create_plugin_manager": "loom_kernel.plugins",
    "Detokenizer": "loom_kernel.detokenize",
    "configure_logging": "loom_kernel.logs",
    "gauges": "loom_kernel.reports",
    "serve": "loom_kernel.serve",
    "POOLING_STRATEGIES": "loom_kernel.default_plugins.pooling",
    "create_app": "loom_kernel.api",
    **dict.fromkeys(("Manager", "Plugins", "KernelDep"), "loom_kernel.api.deps"),
    **dict.fromkeys(("asked_fields", "checked_params", "reading_fields", "state_request"), "loom_kernel.api.inference"),
    **dict.fromkeys(
        (
            "NUMBER_BYTES",
            "AnswerTooLarge",
            "StateRequest",
            "check_generation",
            "check_prompts",
            "generate_choices",
            "model_metadata",
            "stream_extras",
            "timing",
            "token_texts",
        ),
        "loom_kernel.api.payloads",
    ),
    **dict.fromkeys(("begin_request", "openai_error", "request_id", "with_request_id"), "loom_kernel.api.problems"),
    **dict.fromkeys(
        (
            "LayerSpec",
            "LoadFields",
            "MAX_N",
            "ModelRequest",
            "NonEmpty",
            "PositionField",
            "Seed",
            "Sites",
        ),
        "loom_kernel.api.schemas",
    ),
    **dict.fromkeys(("Guard", "body_limit", "caller", "key_refusal", "refuse", "route_of"), "loom_kernel.api.security"),
    **dict.fromkeys(("MayStream", "TokenBridge", "client_gone", "event_stream"), "loom_kernel.api.streaming"),
    "path_model_id": "loom_kernel.api.system",
}
_RENAMED = {"POOLING_STRATEGIES": "STRATEGIES"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loom_kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from loom_kernel.admission import Session
    from loom_kernel.api import create_app
    from loom_kernel.api.deps import KernelDep, Manager, Plugins
    from loom_kernel.api.inference import asked_fields, checked_params, reading_fields, state_request
    from loom_kernel.api.payloads import (
        NUMBER_BYTES,
        AnswerTooLarge,
        StateRequest,
        check_generation,
        check_prompts,
        generate_choices,
        model_metadata,
        stream_extras,
        timing,
        token_texts,
    )
    from loom_kernel.api.problems import begin_request, openai_error, request_id, with_request_id
    from loom_kernel.api.schemas import (
        MAX_N,
        LayerSpec,
        LoadFields,
        ModelRequest,
        NonEmpty,
        PositionField,
        Seed,
        Sites,
    )
    from loom_kernel.api.security import Guard, body_limit, caller, key_refusal, refuse, route_of
    from loom_kernel.api.streaming import MayStream, TokenBridge, client_gone, event_stream
    from loom_kernel.api.system import path_model_id
    from loom_kernel.batching import generate_whole
    from loom_kernel.capture import (
        StateRecorder,
        check_site,
        find_blocks,
        resolve_layers,
        resolve_positions,
        site_names_allowed,
        split_sites,
    )
    from loom_kernel.default_plugins.pooling import STRATEGIES as POOLING_STRATEGIES
    from loom_kernel.detokenize import Detokenizer
    from loom_kernel.devices import resolve_device, resolve_dtype
    from loom_kernel.editing import Layout, apply_edit, edit_columns, row_edits
    from loom_kernel.encoding import SAFETENSORS_MEDIA_TYPE, b64_raw, encode_tensor, json_raw
    from loom_kernel.entry import ModelEntry
    from loom_kernel.loading import count_layers, module_bytes
    from loom_kernel.logs import configure_logging
    from loom_kernel.models import Kernel, ModelManager
    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.reports import gauges
    from loom_kernel.serve import serve

__all__ = [
    "MAX_N",
    "NUMBER_BYTES",
    "POOLING_STRATEGIES",
    "SAFETENSORS_MEDIA_TYPE",
    "AnswerTooLarge",
    "Attribution",
    "BadModel",
    "BadRequest",
    "Batch",
    "Capture",
    "ConfigError",
    "Conflict",
    "Decoder",
    "Detokenizer",
    "Forbidden",
    "ForwardOutput",
    "GenerationParams",
    "Gradient",
    "Guard",
    "InsufficientStorage",
    "Intervention",
    "InvalidField",
    "Kernel",
    "KernelDep",
    "LayerSel",
    "LayerSpec",
    "Layout",
    "LoadFailed",
    "LoadFields",
    "LoadOptions",
    "LoadedModel",
    "LoomError",
    "Manager",
    "MayStream",
    "MissingBackend",
    "ModelEntry",
    "ModelManager",
    "ModelNotFound",
    "ModelParts",
    "ModelRef",
    "ModelRequest",
    "NonEmpty",
    "Option",
    "Plugins",
    "PositionField",
    "PositionSpec",
    "ProbeResult",
    "QuantizationPlan",
    "Reading",
    "RequestField",
    "RequestTimeout",
    "RowInput",
    "Runner",
    "Seed",
    "SequenceOutput",
    "Session",
    "Settings",
    "Sites",
    "StateRecorder",
    "StateRequest",
    "StepOutput",
    "TokenBridge",
    "TooManyRequests",
    "Transport",
    "Unsupported",
    "__version__",
    "apply_edit",
    "asked_fields",
    "b64_raw",
    "batch_inputs",
    "begin_request",
    "body_limit",
    "caller",
    "chars_per_token",
    "check_edit_positions",
    "check_generation",
    "check_prompts",
    "check_site",
    "check_vocabulary",
    "checked_params",
    "client_gone",
    "configure_logging",
    "count_layers",
    "create_app",
    "create_plugin_manager",
    "echo",
    "edit_columns",
    "encode_tensor",
    "event_stream",
    "find_blocks",
    "fit_text",
    "gauges",
    "generate_choices",
    "generate_whole",
    "hookimpl",
    "json_raw",
    "key_refusal",
    "load_error",
    "model_metadata",
    "module_bytes",
    "openai_error",
    "path_model_id",
    "reading_fields",
    "refuse",
    "request_id",
    "resolve_device",
    "resolve_dtype",
    "resolve_layers",
    "resolve_positions",
    "route_of",
    "row_edits",
    "row_lengths",
    "serve",
    "site_names_allowed",
    "split_sites",
    "state_request",
    "stream_extras",
    "texts_or_ids",
    "timing",
    "token_texts",
    "vocabulary_size",
    "with_request_id",
]
