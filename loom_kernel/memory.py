"""How much memory a model will take before it is loaded, and how much a device lets models take.

The estimate reads only what is on disk: the weight files' size, rescaled from the checkpoint's dtype to the
dtype asked for (and to 8 or 4 bits for a quantized load), and a parameter count from config.json; the larger of
the two counts, because the loader allocates what the config describes before it reads any weight, so a config
that claims a huge vocabulary beside a tiny weights file costs what the config says. It is meant to be right within
tens of percent: enough to decide what to evict before a load and to refuse a model that can never fit, not to
account bytes.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from loom_kernel.types import LoadOptions, ModelRef

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float64": 8.0, "int8": 1.0}
# Bytes per parameter after a bitsandbytes load: 8-bit weights, or 4-bit with per-block scales (nf4, double
# quantization), layers that stay unquantized (embeddings, norms, LM head) averaged in.
QUANTIZED_BYTES = {"8bit": 1.1, "4bit": 0.6}


def weight_bytes(ref: ModelRef) -> int:
    """Bytes of weight files in the model's directory; 0 when none are known (a hub id not yet downloaded)."""
    if ref.path is None or not ref.path.is_dir():
        return 0
    total = 0
    for root, _, files in os.walk(ref.path):
        for name in files:
            if name.endswith(WEIGHT_SUFFIXES):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _count(config: dict[str, Any], *keys: str) -> int:
    """The first of ``keys`` that holds a positive number; 0 when none does (a string or a list counts as absent:
    the loader, not the estimate, reports a malformed config)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and value != float("inf"):
            return int(value)
    return 0


def _config_params(config: dict[str, Any]) -> int:
    """A parameter count from the usual config keys: the embeddings (and an untied head), ~4 H^2 of attention a
    block, and a gated MLP (3 H I) a dense block, or in a mixture-of-experts block every routed and shared expert and
    the router, all of which are in memory although a token runs only a few. A multimodal checkpoint (Gemma 3 4B and
    up, Mistral 3) describes its language model in ``text_config``: the count is that language model's, which is all
    the transformers loader loads of such a checkpoint (its files hold the vision tower too, so the estimate from
    them is an upper bound)."""
    # save_pretrained writes tie_word_embeddings only where it is not the default, True; a multimodal checkpoint's
    # own, not its text_config's, is the one its language model follows.
    heads = 2 if config.get("tie_word_embeddings") is False else 1
    text = config.get("text_config")
    if isinstance(text, dict) and not _count(config, "hidden_size", "n_embd", "d_model"):
        config = text
    hidden = _count(config, "hidden_size", "n_embd", "d_model")
    layers = _count(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _count(config, "vocab_size")
    # Llama 4's dense blocks are intermediate_size_mlp wide, its experts intermediate_size.
    inter = _count(config, "intermediate_size_mlp", "intermediate_size", "n_inner") or 4 * hidden
    experts = _count(config, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    expert = _count(config, "moe_intermediate_size", "intermediate_size") or inter
    shared = _count(config, "shared_expert_intermediate_size", "shared_intermediate_size")
    # Llama 4's one shared expert a sparse block is declared by no key: its model type says it.
    llama4 = int(config.get("model_type") == "llama4_text")
    shared = shared or expert * (_count(config, "n_shared_experts", "moe_num_shared_experts") or llama4)
    sparse = _sparse_layers(config, layers) if experts else 0
    moe = 3 * hidden * (experts * expert + shared) + hidden * experts  # the experts and the router
    return heads * vocab * hidden + layers * 4 * hidden * hidden + (layers - sparse) * 3 * hidden * inter + sparse * moe


def _sparse_layers(config: dict[str, Any], layers: int) -> int:
    """How many blocks hold experts: those a list names, or every ``step``-th from the first one past the dense ones
    (each family's keys for the same rule), less those ``mlp_only_layers`` keeps dense."""
    if isinstance(types := config.get("mlp_layer_types"), list):
        return types.count("sparse")
    if isinstance(listed := config.get("moe_layers"), list):
        return len(listed)
    first = _count(config, "first_k_dense_replace", "moe_layer_start_index")
    last = _count(config, "moe_layer_end_index") or layers - 1  # ERNIE's -1: the last block
    step = _count(config, "decoder_sparse_step", "interleave_moe_layer_step", "moe_layer_interval") or 1
    dense = only if isinstance(only := config.get("mlp_only_layers"), list) else []
    return sum((i + 1) % step == 0 and i not in dense for i in range(first, min(last + 1, layers)))


def estimate_bytes(ref: ModelRef, options: LoadOptions, device: str) -> int | None:
    """The model's expected size in memory once loaded with ``options`` on ``device``; None when unknown."""
    config = ref.config if isinstance(ref.config, dict) else {}
    if ref.quantization_config:  # a pre-quantized checkpoint takes about what it takes on disk
        return weight_bytes(ref) or None
    source = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    on_disk = weight_bytes(ref)
    params = max(on_disk / DTYPE_BYTES.get(source, 4.0), _config_params(config))
    if not params:
        return None
    if options.quantization in QUANTIZED_BYTES:
        per = QUANTIZED_BYTES[options.quantization]
    elif options.dtype == "auto":
        per = 2.0 if device.startswith("cuda") else 4.0
    else:
        per = DTYPE_BYTES.get(options.dtype, 4.0)
    return int(params * per)


def device_total_bytes(device: str) -> int | None:
    """Physical memory behind a device: the GPU's, or the machine's RAM for ``cpu``."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def budget_bytes(device: str, fraction: float) -> int | None:
    total = device_total_bytes(device)
    return None if total is None else int(total * fraction)


def release_memory(failure: BaseException | None = None) -> None:
    """Give back what a dropped model, or a load that failed, held.

    A failed load's exception keeps every frame it passed through, and with them the half-built model: ``failure``
    and the exceptions chained to it keep their tracebacks for the log but lose those frames' locals. Then the
    cycles are collected, the CUDA cache is emptied and glibc returns its freed heap pages to the system (without
    that the process's resident size would not fall after a large load)."""
    pending: list[BaseException | None] = [failure]
    seen: set[int] = set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # skips frames still running (the caller's)
        pending += [exc.__cause__, exc.__context__]
    gc.collect()
    torch = sys.modules.get("torch")  # never imported just to release: without torch there is nothing to empty
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
