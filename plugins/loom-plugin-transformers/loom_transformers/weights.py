"""``LoadedModel.weights``: a model's parameters by its own names (its ``state_dict``) and by TransformerLens's
names where the mapping is exact, as TransformerLens lays them out (unprocessed: ``from_pretrained_no_processing``).

- ``W_E`` [vocab, d], ``W_pos`` [context, d]: the token and learned position embeddings, what their modules give
  (``W_E[tokens]`` is the embedding module's output: Gemma's weight times its embedding scale, sqrt(d), as
  TransformerLens's conversion stores it; positions from 0: OPT's first 2 rows and RoBERTa's up to its padding
  index left out, as they come before position 0);
  ``embed.ln.w`` / ``.b``: BLOOM's embedding norm;
- ``W_U`` [d, vocab], ``b_U`` [vocab]: the LM head, transposed, times the logit scale the model multiplies its
  logits by (Cohere's ``logit_scale``), so that ``ln_final.hook_normalized @ W_U + b_U`` is its logits (Gemma 2's
  final soft-capping, not linear, comes after);
- ``ln_final.w`` / ``.b``, ``blocks.{i}.ln1.w`` / ``.b``, ``ln2.w`` / ``.b``: the norms (Gemma's weight as 1 + w,
  as TransformerLens stores it; a parallel block's one norm also as ``ln2``, as its conversion copies it);
- ``blocks.{i}.attn.W_Q`` [heads, d, d_head], ``b_Q`` [heads, d_head], ``W_K``, ``W_V``, ``b_K``, ``b_V`` per
  query head (grouped-query key-value heads repeated), ``_W_K``, ``_W_V``, ``_b_K``, ``_b_V`` per key-value head;
- ``blocks.{i}.attn.W_O`` [heads, d_head, d], ``b_O`` [d];
- ``blocks.{i}.mlp.W_in`` [d, d_mlp] (a gated MLP's up projection), ``W_gate``, ``W_out`` [d_mlp, d], ``b_in``,
  ``b_gate``, ``b_out``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loom_kernel import InvalidField, LoadedModel
from loom_transformers.architectures import arch_of, part
from loom_transformers.sites import Site, logit_scale, site_map, w_o, width


def weights(model: LoadedModel, names: Sequence[str] | None) -> dict[str, Any]:
    """``names`` None: {name: (shape, dtype)} of every name, nothing copied, and {name: why} of each TransformerLens
    name this model does not map exactly; else {name: CPU tensor}."""
    own = model.model.state_dict(keep_vars=True)
    tl = model.extra.setdefault("tl_weights", transformer_lens_names(model))
    if names is None:
        listing: dict[str, Any] = {name: (tuple(t.shape), _dtype(t)) for name, t in own.items()}
        for name, make in tl.items():
            if isinstance(make, str):
                listing.setdefault(name, make)
                continue
            repeated = getattr(make, "repeats", None)  # GQA's W_K: its key-value heads' shape, times the groups
            like = getattr(make, "like", None)  # a tensor of the same shape and dtype, made without a copy
            base = tl[repeated[0]] if repeated is not None else None
            t = base() if callable(base) else like() if like is not None else make()
            shape = tuple(t.shape) if repeated is None else (t.shape[0] * repeated[1], *t.shape[1:])
            listing[name] = (shape, _dtype(t))
        return listing
    refused = [name for name in names if name not in own and isinstance(tl.get(name), str)]
    if refused:
        raise InvalidField(
            f"names: {refused[0]!r} is not served for this model: {tl[refused[0]]}",
            field="names",
            allowed="the names GET /models/{id}/weights lists under weights",
        )
    unknown = [name for name in names if name not in own and name not in tl]
    if unknown:
        raise InvalidField(
            f"names: {unknown[0]!r} is neither one of the model's parameters nor a TransformerLens name it maps "
            "exactly",
            field="names",
            allowed="GET /models/{id}/weights lists them",
        )
    return {name: (own[name] if name in own else tl[name]()).detach().to("cpu") for name in names}  # type: ignore[operator]


def _dtype(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _repeated(make: Callable[[], Any], base: str, groups: int) -> Callable[[], Any]:
    """``base``'s tensor with each key-value head repeated ``groups`` times (its shape known without making it)."""

    def repeat() -> Any:
        return make().repeat_interleave(groups, 0)

    repeat.repeats = (base, groups)  # type: ignore[attr-defined]
    return repeat


def _embedding(module: Any) -> Callable[[], Any]:
    """An embedding's weight as its module gives it: times its ``embed_scale`` where it has one (Gemma's scaled
    embeddings multiply each looked-up row by sqrt(d) in the weight's dtype, as this does)."""
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return lambda: module.weight

    def scaled() -> Any:
        return module.weight * (scale.to(module.weight.dtype) if hasattr(scale, "to") else scale)

    scaled.like = lambda: module.weight  # type: ignore[attr-defined]
    return scaled


def _scaled(make: Callable[[], Any], scale: float) -> Callable[[], Any]:
    """``make``'s tensor times ``scale`` in its dtype (the listing takes its shape without the product)."""

    def scaled() -> Any:
        return make() * scale

    scaled.like = make  # type: ignore[attr-defined]
    return scaled


def _in_out(module: Any) -> Any:
    """A projection's weight as [in, out] (GPT-2's Conv1D already is; a Linear's is [out, in])."""
    return module.weight if type(module).__name__ == "Conv1D" else module.weight.T


def transformer_lens_names(model: LoadedModel) -> dict[str, Callable[[], Any] | str]:
    """Each exact TransformerLens name, with how to make its tensor (views where they can be), and each name
    TransformerLens's model of this family would have that this one does not map exactly, with why (a string)."""
    import torch

    net = model.model
    arch = arch_of(net.config)
    if arch is None:
        return {}
    sites = site_map(model)
    base = net.base_model
    out: dict[str, Callable[[], Any] | str] = {}

    def norm(prefix: str, module: Any, why: str = "") -> None:
        if module is None or type(module).__name__ == "Identity":
            out[f"{prefix}.w"] = why or f"{arch.name} has no such norm"
            return
        weight = getattr(module, "weight", None)
        out[f"{prefix}.w"] = (
            f"{arch.name}'s norm has no weight ({type(module).__name__} without parameters)"
            if weight is None
            else (lambda m=module: 1 + m.weight)
            if arch.norm == "rms1p"
            else (lambda m=module: m.weight)
        )
        if getattr(module, "bias", None) is not None:
            out[f"{prefix}.b"] = lambda m=module: m.bias
        elif arch.norm == "layer":  # an RMSNorm has no bias in TransformerLens either
            out[f"{prefix}.b"] = f"{arch.name}'s LayerNorm has no bias (TransformerLens's would be zeros)"

    def no_bias(name: str, module: Any) -> str:
        return f"{arch.name}'s {type(module).__name__} has no bias (TransformerLens's would be zeros): {name} is 0"

    # OPT-350m's project_in / project_out between the embedding width and the stream's: no W_E [vocab, d] or W_U
    # [d, vocab] is a weight of its (TransformerLens has no such model); its own names serve them.
    projected = part(base, arch.project_in) is not None or part(base, arch.project_out) is not None
    through = (
        f"{arch.name}'s embeddings are {width(part(base, arch.project_in)) if projected else 0} wide, mapped to "
        "the stream by project_in and back by project_out: no [vocab, d] matrix of its is TransformerLens's (its own "
        "names serve them)"
    )
    if isinstance(sites.get("hook_embed"), Site) and not projected:
        out["W_E"] = _embedding(part(base, arch.embed))
    elif projected:
        out["W_E"] = through
    if arch.embed_norm:
        norm("embed.ln", part(base, arch.embed_norm))  # BLOOM's, TransformerLens's Embed.ln
    pos = sites.get("hook_pos_embed")
    if isinstance(pos, Site):
        # Rows before position 0: OPT's first 2, RoBERTa's up to its padding index.
        padding = getattr(pos.module, "padding_idx", None)
        first = padding + 1 if isinstance(padding, int) else arch.pos_offset
        out["W_pos"] = lambda: pos.module.weight[first:]
    elif isinstance(pos, str):
        out["W_pos"] = pos
    head = net.get_output_embeddings()
    if head is None:
        out["W_U"] = out["b_U"] = f"{type(net).__name__} has no LM head"
    elif projected:
        out["W_U"] = out["b_U"] = through
    elif not head.weight.is_floating_point():
        out["W_U"] = out["b_U"] = f"the LM head's weight is not a dense matrix ({head.weight.dtype}: quantized)"
    else:
        # Times the logit scale the causal LM multiplies the head's output by (Cohere's), so that
        # ln_final.hook_normalized @ W_U + b_U is the model's logits, as W_E is what the embedding gives.
        scale = logit_scale(model)
        out["W_U"] = (lambda: head.weight.T) if scale == 1.0 else _scaled(lambda: head.weight.T, scale)
        if getattr(head, "bias", None) is not None:
            out["b_U"] = (lambda: head.bias) if scale == 1.0 else _scaled(lambda: head.bias, scale)
        else:
            out["b_U"] = no_bias("b_U", head)
    final = sites.get("ln_final.hook_normalized")
    norm("ln_final", part(base, arch.final_norm), final if isinstance(final, str) else "")
    for i, block in enumerate(part(base, arch.blocks)):
        at = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            if arch.mixer is not None and ln == "ln2":
                continue
            # One norm for both sublayers of a parallel block: TransformerLens's conversion copies it as ln2.
            path = getattr(arch, ln) or (arch.ln1 if ln == "ln2" and arch.parallel(net.config) else None)
            normalized = sites.get(f"{at}{ln}.hook_normalized")
            if arch.residual != "post_ln" and isinstance(normalized, str):
                norm(at + ln, None, normalized)
            else:
                norm(at + ln, part(block, path))
        if arch.mixer is not None:
            continue
        query = sites.get(f"{at}attn.hook_q")
        query_heads = query.shape[0] if isinstance(query, Site) else 0
        for letter in "QKV":
            site = sites.get(f"{at}attn.hook_{letter.lower()}")
            grouped = isinstance(site, Site) and letter != "Q" and site.shape[0] != query_heads
            names = [f"{at}attn.{own}{w}_{letter}" for own in ("", "_") if own == "" or grouped for w in "Wb"]
            if isinstance(site, str):
                for name in names:
                    out[name] = site
                continue
            if not site.module.weight.is_floating_point():
                for name in names:
                    out[name] = f"the projection's weight is not a dense matrix ({site.module.weight.dtype}: quantized)"
                continue
            if _in_out(site.module).shape[0] != model.hidden_size:  # DeepSeek's q_b_proj reads a low-rank latent
                for name in names:
                    out[name] = (
                        f"{arch.name}'s {letter.lower()} projection reads a low-rank latent "
                        f"({_in_out(site.module).shape[0]} wide, through its own down-projection and norm), not the "
                        "stream: no [d_model, d_head] matrix maps the stream to a head's "
                        f"{ {'Q': 'query', 'K': 'key', 'V': 'value'}[letter] }"
                    )
                continue
            view = site.view
            heads = site.shape[0]
            # [d, out] through the point's view: [d, heads, d_head] -> [heads, d, d_head]
            make = lambda m=site.module, view=view: view(_in_out(m)).permute(1, 0, 2)  # noqa: E731
            bias = (
                (lambda m=site.module, view=view: view(m.bias))
                if site.module.bias is not None
                else no_bias(f"b_{letter}", site.module)
            )
            if grouped:  # grouped-query attention: TransformerLens repeats them
                groups = query_heads // heads
                out[f"{at}attn._W_{letter}"] = make
                out[f"{at}attn.W_{letter}"] = _repeated(make, f"{at}attn._W_{letter}", groups)
                out[f"{at}attn._b_{letter}"] = bias
                out[f"{at}attn.b_{letter}"] = (
                    bias if isinstance(bias, str) else _repeated(bias, f"{at}attn._b_{letter}", groups)
                )
                continue
            out[f"{at}attn.W_{letter}"] = make
            out[f"{at}attn.b_{letter}"] = bias
        result = sites.get(f"{at}attn.hook_result")
        if isinstance(result, Site):
            o, heads = result.extra
            out[f"{at}attn.W_O"] = lambda o=o, heads=heads: w_o(o, heads)
            d = result.shape[1]
            out[f"{at}attn.b_O"] = (lambda o=o: o.bias) if o.bias is not None else (lambda d=d: torch.zeros(d))
        elif isinstance(result, str):
            out[f"{at}attn.W_O"] = out[f"{at}attn.b_O"] = result
        mlp: dict[str, Site | str | None] = {k: sites.get(f"{at}mlp.hook_{k}") for k in ("pre", "pre_linear", "post")}
        gated = isinstance(mlp["pre_linear"], Site)
        for name, key in (("W_in", "pre_linear" if gated else "pre"), ("W_gate", "pre" if gated else None)):
            site = mlp.get(key) if key else None
            if isinstance(site, str):
                out[f"{at}mlp.{name}"] = out[f"{at}mlp.b_{name[2:]}"] = site
            elif isinstance(site, Site) and site.module.weight.is_floating_point():
                view = site.view or (lambda t: t)
                out[f"{at}mlp.{name}"] = lambda m=site.module, view=view: view(_in_out(m))
                out[f"{at}mlp.b_{name[2:]}"] = (
                    (lambda m=site.module, view=view: view(m.bias))
                    if site.module.bias is not None
                    else no_bias(f"b_{name[2:]}", site.module)
                )
        post = mlp["post"]
        if isinstance(post, str):
            out[f"{at}mlp.W_out"] = out[f"{at}mlp.b_out"] = post
        elif isinstance(post, Site) and post.module.weight.is_floating_point():
            out[f"{at}mlp.W_out"] = lambda m=post.module: _in_out(m)
            out[f"{at}mlp.b_out"] = (
                (lambda m=post.module: m.bias) if post.module.bias is not None else no_bias("b_out", post.module)
            )
    return out
