"""Building a custom model: the factory (after the trust rule), its weights, its blocks and its tokenizer."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from loom_custom.code import load_callable
from loom_custom.manifest import NAME, Manifest, read_manifest
from loom_custom.tokenizing import adapt, call_factory, load_tokenizer
from loom_kernel import (
    LoadedModel,
    LoadOptions,
    LoomError,
    ModelRef,
    Unsupported,
    module_bytes,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger("loom.custom")


def load_model(ref: ModelRef, options: LoadOptions) -> LoadedModel:

    manifest = read_manifest(ref)
    # Quantization and multi-device placement are transformers/accelerate features; a plain nn.Module has neither.
    if options.quantization:
        raise Unsupported(
            f"quantization: the custom loader cannot quantize {ref.id!r}; load it without quantization",
            field="quantization",
        )
    if options.device_map:
        raise Unsupported(
            f"device_map: the custom loader places {ref.id!r} on one device; use device instead", field="device_map"
        )
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    start = time.perf_counter()
    factory = load_callable(manifest, "factory", manifest.factory, options.trust_remote_code)
    log.info("custom loading %s: factory %s from %s (%s)", ref.id, manifest.factory, manifest.where, manifest.origin)
    try:
        built = call_factory(factory, manifest.kwargs, manifest.directory)
    except LoomError:
        raise
    except Exception as exc:  # the factory's own failure (bad kwargs, missing file, ...), named
        raise manifest.error("factory", f"{manifest.factory!r} raised {type(exc).__name__}: {exc}") from exc
    net, tokenizer = _split(manifest, built)
    weights = manifest.weights_file()
    if weights is not None:
        _load_weights(manifest, net, weights)
    else:
        log.warning("custom %s: no weights file; the model keeps the factory's own parameters", ref.id)
    net.to(device=device, dtype=dtype).eval()
    blocks = _blocks(manifest, net)
    final = _module_at(manifest, net, "final_norm", manifest.final_norm) if manifest.final_norm else blocks[-1]
    embedding = _token_embedding(net)
    hidden = manifest.hidden_size or (embedding.embedding_dim if embedding is not None else None)
    if hidden is None:
        raise manifest.error("hidden_size", "is missing and the model has no nn.Embedding to read it from")
    tokenizer = (
        adapt(manifest, tokenizer) if tokenizer is not None else load_tokenizer(manifest, options.trust_remote_code)
    )
    first = next((p for p in net.parameters() if p.is_floating_point()), None)
    size = module_bytes(net)
    loaded = LoadedModel(
        ref=ref,
        loader=NAME,
        model=net,
        tokenizer=tokenizer,
        options=options,
        num_layers=len(blocks),
        hidden_size=int(hidden),
        # "custom" cannot generate (the kernel answers /generate with a 422 naming the model); the manifest's kind
        # still picks the /embed default pooling: the last token for a causal model, the mean for an encoder.
        kind="custom",
        device=str(first.device if first is not None else device),
        dtype=str(first.dtype if first is not None else dtype).removeprefix("torch."),
        size_bytes=size,
        load_seconds=time.perf_counter() - start,
        max_context=manifest.max_context,
        default_pooling="last_token" if manifest.kind == "causal" else "mean",
        extra={
            "blocks": blocks,
            "final": final,
            "manifest_kind": manifest.kind,
            "vocab_size": embedding.num_embeddings if embedding is not None else None,
            "input_device": device,
        },
    )
    log.info(
        "custom loaded %s (%s, %d blocks, hidden %d) from %s: %.1f MiB on %s as %s in %.2f s",
        ref.id,
        type(net).__name__,
        loaded.num_layers,
        loaded.hidden_size,
        weights or "the factory alone",
        size / 2**20,
        loaded.device,
        loaded.dtype,
        loaded.load_seconds,
    )
    return loaded


def _split(manifest: Manifest, built: Any) -> tuple[Any, Any]:
    """The factory's result: a module, or (module, tokenizer)."""
    import torch

    net, tokenizer = built, None
    if isinstance(built, tuple) and len(built) == 2:
        net, tokenizer = built
    if not isinstance(net, torch.nn.Module):
        raise manifest.error(
            "factory",
            f"{manifest.factory!r} returned {type(net).__name__}, not a torch.nn.Module or (module, tokenizer)",
        )
    return net, tokenizer


def _load_weights(manifest: Manifest, net: Any, path: Path) -> None:
    """Load a safetensors file, or a torch state dict with ``weights_only`` (a weights file never runs code, so it
    needs no trust); every key must match the built module."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state dict")
    except Exception as exc:  # unreadable, or a pickle that weights_only refuses
        raise manifest.error("weights", f"{path}: cannot be read: {type(exc).__name__}: {exc}") from exc
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: torch lists every tensor; the first few say enough
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise manifest.error(
            "weights", f"{path} does not match the module the factory built: {'; '.join(lines[:3]) or exc}"
        ) from None
    if missing or unexpected:
        raise manifest.error(
            "weights",
            f"{path} does not match the module the factory built: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}",
        )


def _module_at(manifest: Manifest, net: Any, field: str, path: str) -> Any:
    import torch

    obj = net
    for part in path.split("."):
        if not hasattr(obj, part):
            raise manifest.error(field, f"{path!r}: {type(obj).__name__} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        raise manifest.error(field, f"{path!r} is a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _blocks(manifest: Manifest, net: Any) -> Any:
    """The block list: the one ``blocks`` names, else the shallowest ModuleList of ``num_layers`` modules, else the
    model's only ModuleList."""
    import torch

    if manifest.blocks is not None:
        blocks = _module_at(manifest, net, "blocks", manifest.blocks)
        if not isinstance(blocks, torch.nn.ModuleList | torch.nn.Sequential) or len(blocks) == 0:
            raise manifest.error("blocks", f"{manifest.blocks!r} is not a non-empty nn.ModuleList or nn.Sequential")
        if manifest.num_layers is not None and manifest.num_layers != len(blocks):
            raise manifest.error("num_layers", f"is {manifest.num_layers} but {manifest.blocks!r} holds {len(blocks)}")
        return blocks
    lists = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if manifest.num_layers is not None:
        lists = [(n, m) for n, m in lists if len(m) == manifest.num_layers]
        if not lists:
            raise manifest.error("num_layers", f"no nn.ModuleList of {manifest.num_layers} modules in the model")
        return min(lists, key=lambda item: item[0].count("."))[1]
    if len(lists) != 1:
        found = [f"{n} ({len(m)})" for n, m in lists]
        raise manifest.error(
            "blocks", f"is missing and the model has {len(lists)} ModuleLists {found}: name the block list"
        )
    return lists[0][1]


def _token_embedding(net: Any) -> Any:
    """The module that embeds token ids: the model's own ``get_input_embeddings()`` where it has one, else its first
    ``nn.Embedding`` (a factory's plain module, the token table usually declared first)."""
    import torch

    get = getattr(net, "get_input_embeddings", None)
    found = get() if callable(get) else None
    if isinstance(found, torch.nn.Embedding):
        return found
    return next((m for m in net.modules() if isinstance(m, torch.nn.Embedding)), None)
