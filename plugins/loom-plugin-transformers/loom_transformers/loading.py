"""Probing a config.json and loading a model with transformers' Auto classes."""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any

from loom_kernel import (
    BadModel,
    LoadedModel,
    LoadOptions,
    LoomError,
    ModelRef,
    ProbeResult,
    Unsupported,
    count_layers,
    load_error,
    module_bytes,
    resolve_device,
    resolve_dtype,
)
from loom_transformers.architectures import NOT_SERVED, WRAPPERS, ambiguous_experts, arch_of, language_model
from loom_transformers.attribution import attribution
from loom_transformers.runner import TransformersRunner
from loom_transformers.sites import attention_sites, final_width, site_shapes, unembed
from loom_transformers.weights import weights

log = logging.getLogger("loom.transformers")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def probe_config(config: Any) -> ProbeResult | None:
    """Score from config.json alone; a malformed config is no reason to raise, only a lower score. A kind of model
    this loader refuses scores 0 with the reason, so that the server refuses it before any other check (its memory
    budget) and names why."""
    if not isinstance(config, dict) or not config:
        return None
    model_type = config.get("model_type")
    if (why := refusal(config)) is not None:
        return ProbeResult(loader="transformers", score=0.0, reason=f"model_type {model_type!r} {why}")
    archs = config.get("architectures")
    archs = [str(a) for a in archs] if isinstance(archs, list) else []
    if archs:
        return ProbeResult(loader="transformers", score=0.5, reason=f"config.json with architectures {archs}")
    what = f"model_type {model_type!r}" if isinstance(model_type, str) and model_type else "no model_type"
    return ProbeResult(loader="transformers", score=0.1, reason=f"config.json without architectures ({what})")


def refusal(config: dict[str, Any]) -> str | None:
    """Why this loader does not serve a config.json, from its keys alone (an encoder-decoder, or a multimodal model
    that is not a wrapper it loads the language model of); None where only transformers' reading of it can tell
    (``refuse_kind``, at load)."""
    if config.get("is_encoder_decoder") is True:
        return NOT_SERVED["encoder-decoder"]
    if multimodal(config):
        return f"{NOT_SERVED['multimodal']} {', '.join(sorted(WRAPPERS))}"
    return None


def multimodal(config: dict[str, Any]) -> bool:
    """Whether a config.json is a multimodal model's that is not a wrapper this loader serves the language model of:
    a ``text_config`` beside another tower's config (``vision_config``, ``audio_config``, ``vq_config``...), or a
    ``text_config`` with no ``vocab_size`` of its own. PaliGemma's config.json has a top-level ``vocab_size`` too,
    so the tower, not the vocabulary, is what tells."""
    if not isinstance(config.get("text_config"), dict) or config.get("model_type") in WRAPPERS:
        return False
    towers = [
        key
        for key, value in config.items()
        if key.endswith("_config") and key not in ("text_config", "quantization_config") and isinstance(value, dict)
    ]
    return bool(towers) or "vocab_size" not in config


def is_causal(config: Any) -> bool:
    """A causal LM by its architecture name, else by its model_type (which must not also be a masked LM)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if archs:
        causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a.endswith(CAUSAL_SUFFIXES) or a in causal_names for a in archs)
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def max_context(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def load_model(ref: ModelRef, options: LoadOptions) -> LoadedModel:
    import transformers

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    target = ref.load_target
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": options.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    if options.quantization_plan is not None:
        kwargs.update(options.quantization_plan.load_kwargs)
    # Weights go straight to their device (no CPU copy first); a quantized model could not be moved afterwards.
    if options.device_map:
        kwargs["device_map"] = options.device_map
    else:
        kwargs.setdefault("device_map", device)
    log.info(
        "transformers loading %s from %s (device %s, dtype %s%s)",
        ref.id,
        target,
        kwargs["device_map"],
        str(dtype).removeprefix("torch."),
        f", quantization {options.quantization_plan.method}" if options.quantization_plan else "",
    )
    start = time.perf_counter()
    small = _only(kwargs, "revision", "trust_remote_code")
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(target, **small)
        except ValueError as exc:
            if "model type" in str(exc) or "model_type" in str(exc):
                raise BadModel(
                    f"model: {ref.id!r}: transformers does not know its model_type "
                    f"{(ref.config or {}).get('model_type')!r} ({' '.join(str(exc).split())[:300]})",
                    field="model",
                ) from None
            raise
        wrapped = language_model(config)
        transposed = False
        if wrapped is not None:  # a multimodal checkpoint: its language model alone, the vision tower left unread
            wrapper, config = wrapped
            if (why := ambiguous_experts(wrapper, config)) is not None:
                raise BadModel(f"model: {ref.id!r} ({wrapper.name}): {why}", field="model")
            kwargs.update(config=config, key_mapping=wrapper.key_mapping())
            transposed = wrapper.experts_transposed
            log.info("transformers loads the language model of %s (%s) alone: no vision tower", ref.id, wrapper.name)
        refuse_kind(ref, config)
        refuse_requantizing(ref, config, options)
        causal = is_causal(config)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        if transposed:
            auto = with_transposed_experts(transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
        model, info = auto.from_pretrained(target, output_loading_info=True, **kwargs)
        check_weights(model, info, f"transformers could not load {ref.id!r} from {target}")
        tokenizer = load_tokenizer(ref, target, small)
    except LoomError:
        raise
    except Exception as exc:  # named, and classified: a 4xx when the model's files are at fault, else a 500
        raise load_error(exc, f"transformers could not load {ref.id!r} from {target}") from exc
    model.eval()
    model.requires_grad_(False)  # never trained: a pass with gradients (attribution patching) gathers none in them
    size = module_bytes(model)
    loaded = LoadedModel(
        ref=ref,
        loader="transformers",
        model=model,
        tokenizer=tokenizer,
        options=options,
        num_layers=count_layers(model.config),
        hidden_size=int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0)),
        kind="causal" if causal else "encoder",
        device=str(model.get_input_embeddings().weight.device),
        dtype=str(model.dtype).removeprefix("torch."),
        size_bytes=size,
        load_seconds=time.perf_counter() - start,
        max_context=max_context(model.config),
        row_params=causal,
        gradients=causal,
    )
    loaded.runner = TransformersRunner(loaded)
    if causal:
        from loom_transformers.generation import Decoder
        from loom_transformers.running import eos_ids

        loaded.stop_ids = frozenset(eos_ids(loaded))
        loaded.decoder = functools.partial(Decoder, loaded)
        # The lens runs the model's own final norm, which only a described architecture names.
        if model.get_output_embeddings() is not None and arch_of(model.config) is not None:
            loaded.unembed = functools.partial(unembed, loaded)
    try:
        loaded.sites = site_shapes(loaded)
        loaded.attention_sites = attention_sites(loaded)
        loaded.final_width = final_width(loaded)
    except Exception as exc:  # the table's layout does not fit this model's modules
        raise BadModel(
            f"model: {ref.id!r} ({type(model).__name__}) does not have the blocks the transformers loader's table "
            f"describes for model_type {getattr(model.config, 'model_type', None)!r}: {type(exc).__name__}: {exc}",
            field="model",
        ) from exc
    loaded.weights = functools.partial(weights, loaded)
    if causal:
        loaded.attribution = attribution(loaded)
    from loom_transformers.selfcheck import check

    try:
        check(loaded)
    except LoomError:
        raise
    except Exception as exc:  # the check could not even run its probe: as much a refusal as a failed sum
        raise BadModel(
            f"model: {ref.id!r} ({type(model).__name__}): the hook-point self-check at load could not run its probe "
            f"input: {type(exc).__name__}: {exc}",
            field="model",
        ) from exc
    log.info(
        "transformers loaded %s (%s, %s, %d layers) from %s: %.1f MiB on %s as %s in %.2f s",
        ref.id,
        type(model).__name__,
        loaded.kind,
        loaded.num_layers,
        target,
        size / 2**20,
        loaded.device,
        loaded.dtype,
        loaded.load_seconds,
    )
    return loaded


@functools.cache
def with_transposed_experts(base: type) -> type:
    """``base`` (a causal LM class of transformers) loading each block's fused experts (``mlp.experts.gate_up_proj``,
    ``mlp.experts.down_proj``) stored [experts, in, out] as its modules hold them, [experts, out, in]: a subclass
    whose own name carries transformers' conversion for it, the transpose transformers applies for the multimodal
    wrapper (``Transpose(1, 2, check_dims=True)``: a weight already of the module's shape is kept). transformers'
    ``key_mapping`` only renames, and registering the transpose under ``base``'s own name would change every load of
    that class in the process; the family's own conversions (per-expert weights merged) stay, found by model_type
    on its base model."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    cls = type(f"{base.__name__}WithTransposedExperts", (base,), {"__module__": __name__, "__doc__": base.__doc__})
    converters = [
        WeightConverter(f"mlp.experts.{name}", f"mlp.experts.{name}", operations=[Transpose(1, 2, check_dims=True)])
        for name in ("gate_up_proj", "down_proj")
    ]
    register_checkpoint_conversion_mapping(cls.__name__, converters, overwrite=True)
    return cls


# Weights a checkpoint may lack without changing a state Loom reports: an encoder's pooler (a masked-LM checkpoint has
# none; no endpoint reads it).
OPTIONAL_WEIGHTS = ("pooler.",)


def check_weights(model: Any, info: dict[str, Any], what: str) -> None:
    """BadModel when the checkpoint does not hold the model its config describes: a weight the model has and the
    checkpoint lacks (transformers would fill it with random numbers: a config saying 400 layers beside 4 layers of
    weights gives 396 random blocks), or a weight of the same kind as the model's that it has no place for (a config
    saying fewer layers than the checkpoint holds drops the rest). A task head the base model does not use (a
    masked-LM checkpoint's ``cls.*`` under ``AutoModel``) is no mismatch."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def kind(key: str) -> str:  # one weight of every block alike: "model.layers.#.mlp.up_proj.weight"
        return re.sub(r"\.\d+(?=\.|$)", ".#", key.removeprefix(prefix))

    missing = sorted(k for k in info.get("missing_keys") or () if not kind(k).startswith(OPTIONAL_WEIGHTS))
    kinds = {kind(k) for k in model.state_dict()}
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if kind(k) in kinds)
    if missing or unexpected:
        said = [
            f"{len(keys)} {label} (such as {keys[0]!r})"
            for label, keys in (
                ("weights its config.json describes are missing from the checkpoint", missing),
                ("weights in the checkpoint have no place in the model its config.json describes", unexpected),
            )
            if keys
        ]
        raise BadModel(f"model: {what}: the checkpoint does not match its config: {'; '.join(said)}", field="model")


def refuse_kind(ref: ModelRef, config: Any) -> None:
    """A 422 before any weight loads for a model that is not a decoder-only or encoder-only text model."""
    kind = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        why = NOT_SERVED["encoder-decoder"]
    elif multimodal(config.to_dict()):  # the probe's rule again; a wrapper's config is its text_config by now
        why = f"{NOT_SERVED['multimodal']} {', '.join(sorted(WRAPPERS))}"
    elif not isinstance(getattr(config, "vocab_size", None), int):
        why = NOT_SERVED["no-text"]
    else:
        return
    raise BadModel(f"model: {ref.id!r} (model_type {kind!r}) {why}", field="model", model_type=kind)


def refuse_requantizing(ref: ModelRef, config: Any, options: LoadOptions) -> None:
    """A 422 naming ``quantization`` when a request asks to quantize a checkpoint that is quantized already: its
    config's quantization_config decides how it loads. transformers either refuses a second method (a ValueError,
    which would be a 500) or keeps the checkpoint's own (a saved 4-bit model stays 4-bit under an 8bit request), and
    the model would then be listed with a quantization it does not have."""
    if options.quantization_plan is None:
        return
    saved = getattr(config, "quantization_config", None)
    if saved is None:
        return
    saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
    method = saved.get("quant_method") if isinstance(saved, dict) else None
    raise Unsupported(
        f"quantization: {ref.id!r} is already quantized ({method or 'its config.json has a quantization_config'}), "
        f"and loads as its checkpoint says; leave quantization unset instead of {options.quantization!r}",
        field="quantization",
        allowed=[None],
    )


# What a directory needs for transformers to build a real tokenizer (any one of these).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt", "vocab.txt", "spiece.model")


def load_tokenizer(ref: ModelRef, target: str, kwargs: dict[str, Any]) -> Any:
    """The model's tokenizer; a 422 naming the directory and what it lacks when there is none to build (transformers
    would raise, or build an empty tokenizer on which every request fails with "tokenizes to no tokens")."""
    import transformers

    def missing() -> BadModel:
        return BadModel(
            f"model: {ref.id!r}: {target} has no usable tokenizer: the directory needs one of "
            f"{', '.join(TOKENIZER_FILES)} beside its config.json",
            field="model",
            allowed=list(TOKENIZER_FILES),
        )

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(target, **kwargs)
    except (ValueError, OSError) as exc:
        if ref.path is not None and not set(ref.files) & {f.split()[0] for f in TOKENIZER_FILES}:
            raise missing() from exc
        raise
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise missing()
    return tokenizer


def _only(kwargs: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: kwargs[k] for k in keys if k in kwargs}
