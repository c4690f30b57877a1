"""Loading a model with SentenceTransformer, and what the kernel needs to know about it."""

from __future__ import annotations

import logging
import time
from typing import Any

from loom_kernel import (
    LoadedModel,
    LoadOptions,
    LoomError,
    ModelRef,
    count_layers,
    load_error,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger("loom.sentence_transformers")

# sentence-transformers' Pooling modes, as the names of the kernel's pool strategies (modes without one, such as
# weightedmean or a combination, leave the kernel's default in place when a request pools another layer).
POOLING_NAMES = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last_token"}


def hidden_width(config: Any) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 0


def describe_pipeline(st: Any) -> list[str]:
    """The model's modules in order, e.g. ["Transformer", "Pooling(mean)", "Normalize"]."""
    names = []
    for module in st:
        name = type(module).__name__
        mode = getattr(module, "pooling_mode", None)
        if name == "Pooling" and mode is not None:
            name = f"Pooling({mode if isinstance(mode, str) else '+'.join(mode)})"
        names.append(name)
    return names


def default_pooling(st: Any) -> str | None:
    for module in st:
        mode = getattr(module, "pooling_mode", None)
        if type(module).__name__ == "Pooling" and isinstance(mode, str):
            return POOLING_NAMES.get(mode)
    return None


def load_model(ref: ModelRef, options: LoadOptions) -> LoadedModel:
    from sentence_transformers import SentenceTransformer

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if options.quantization_plan is not None:
        model_kwargs.update(options.quantization_plan.load_kwargs)
    if options.device_map:
        model_kwargs["device_map"] = options.device_map
    target = ref.load_target
    log.info("sentence-transformers loading %s from %s (device %s, dtype %s)", ref.id, target, device, dtype)
    start = time.perf_counter()
    try:
        st = SentenceTransformer(
            target,
            device=device,
            trust_remote_code=options.trust_remote_code,
            revision=ref.revision,
            model_kwargs=model_kwargs,
        )
    except LoomError:
        raise
    except Exception as exc:  # named, and classified: a 4xx when the model's files are at fault, else a 500
        raise load_error(exc, f"sentence-transformers could not load {ref.id!r} from {target}") from exc
    st.eval()
    first = st[0]
    if hasattr(first, "unpad_inputs"):
        # Flash-attention "unpadding" packs a batch into one row; the hooks need the padded [B, T, H] layout.
        first.unpad_inputs = False
    hf = st.transformers_model
    config = getattr(hf, "config", None)
    num_layers = count_layers(config) if config is not None else 0
    pipeline = describe_pipeline(st)
    params = [*st.parameters(), *st.buffers()]
    dimension = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    width = dimension()
    loaded = LoadedModel(
        ref=ref,
        loader="sentence_transformers",
        model=st,
        tokenizer=st.tokenizer,
        options=options,
        num_layers=num_layers,
        hidden_size=hidden_width(config) or int(width or 0),
        kind="embedding",
        device=str(st.device),
        dtype=str(getattr(hf, "dtype", dtype)).removeprefix("torch."),
        size_bytes=sum(t.numel() * t.element_size() for t in params),
        load_seconds=time.perf_counter() - start,
        max_context=st.max_seq_length,
        default_pooling=default_pooling(st),
        pooled_normalized=bool(pipeline) and pipeline[-1] == "Normalize",
        extra={"pipeline": pipeline, "embedding_dimension": width},
        # Edits at hidden-state indices (the pooled embedding then comes from the edited states); no named points:
        # those are the transformers loader's (``"loader": "transformers"``).
        sites={} if num_layers else None,
    )
    log.info(
        "sentence-transformers loaded %s (%s, %d layers, max_seq_length %s) from %s: %.1f MiB on %s as %s in %.2f s",
        ref.id,
        " -> ".join(pipeline),
        num_layers,
        loaded.max_context,
        target,
        loaded.size_bytes / 2**20,
        loaded.device,
        loaded.dtype,
        loaded.load_seconds,
    )
    return loaded
