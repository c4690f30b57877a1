"""The consistency check every model passes at load: on a short probe input, the sites the plugin offers are
recorded and must add up, so that a block the table describes wrongly (or that a transformers release changed) is
refused, naming the site, instead of served wrong.

- every hidden-state index equals transformers' ``output_hidden_states`` (every model, described or not);
- every offered point fires with its declared shape;
- ``hook_embed`` (+ ``hook_pos_embed``) is ``blocks.0.hook_resid_pre``;
- sequential blocks: resid_pre + attn_out = the stream the MLP's side reads (its norm's input, or the MLP's own
  input where the block normalizes outputs only) = resid_mid, and resid_mid + mlp_out = resid_post; parallel blocks:
  resid_pre + attn_out + mlp_out = resid_post; post-LN blocks (BERT): resid_pre + attn_out = resid_mid;
- each norm's scale (``ln_final.hook_scale``, ``blocks.{i}.ln1/ln2.hook_scale``) with its weight and bias gives the
  norm's output from its input (the frozen-scale linear map the logit attribution uses);
- the logit lens of the last block's output is the model's own log-softmax (its head, logit scale and soft-capping);
- under The Loom's eager attention (the hook points inside attention) the model computes what it computes alone.
"""

from __future__ import annotations

from typing import Any

from loom_kernel import BadModel, Layout, LoadedModel
from loom_transformers.architectures import Arch, arch_of, part
from loom_transformers.attention import LOOM, eager_attention
from loom_transformers.sites import KEYS, Site, SiteHooks, block_output, site_map, unembed

PROBE = (5, 17, 3, 42, 11, 7, 29)


def check(model: LoadedModel) -> None:
    """Raise BadModel (a 422 naming ``model``) at the first site that does not add up."""
    import torch

    net, n = model.model, model.num_layers
    vocab = net.get_input_embeddings().num_embeddings
    ids = [t % vocab for t in PROBE]
    sites = site_map(model)
    offered = [k for k, s in sites.items() if isinstance(s, Site)]
    for key in offered:
        if sites[key].module is None:
            _fail(model, str(key), "is at a module the architecture table names and the model lacks")
    arch = arch_of(net.config)
    scales = {k: s for k, s in sites.items() if isinstance(s, Site) and s.kind == "scale"}
    with torch.inference_mode():
        streams, handles = _mid_streams(model, arch)
        norms, more = _norm_io(scales)
        handles += more
        try:
            got, out = _run(model, ids, offered)
        finally:
            for handle in handles:
                handle.remove()
        states = [s[0].float().cpu() for s in out.hidden_states]
        if arch is not None and arch.states_skip_embedding:
            states = [got["hook_embed"], *states[: n - 1], states[n]]
        for i in range(n + 1):
            _close(model, f"index {i}", got[i], states[i], "output_hidden_states")
        for key in offered:
            site = sites[key]
            want = tuple(len(ids) if d == KEYS else d for d in site.shape)
            if site.shape and tuple(got[key].shape[1:]) != want:
                _fail(model, str(key), f"has shape {list(got[key].shape[1:])}, not its declared {list(want)}")
        if arch is not None:
            _sums(model, got, arch.parallel(net.config), arch.residual, streams)
        for key, site in scales.items():
            x, y = norms[id(site.module)]
            _norm(model, str(key), site, x, got[key], y)
        if model.unembed is not None:
            last = f"blocks.{n - 1}.{block_output(arch) if arch is not None else 'hook_resid_post'}"
            lens = torch.log_softmax(unembed(model, got[last], False).double(), -1)
            own = torch.log_softmax(out.logits[0].double().cpu(), -1)
            _close(model, "the logit lens", lens, own, "the model's own log-softmax", atol=1e-3)
        if any(s.side == "attn" for s in sites.values() if isinstance(s, Site)):
            # The pass above recorded points inside attention, so it ran under The Loom's attention too: the model's
            # own is a pass recording nothing, under the attention implementation it was loaded with.
            _, alone = _run(model, ids, [])
            with eager_attention(net, LOOM, "model"):
                _, ours = _run(model, ids, [])
            if hasattr(alone, "logits"):
                ours_t, own_t = ours.logits[0], alone.logits[0]
            else:
                ours_t, own_t = ours.last_hidden_state[0], alone.last_hidden_state[0]
            _close(model, "attention", ours_t.float().cpu(), own_t.float().cpu(), "the model's own attention")


def _run(model: LoadedModel, ids: list[int], record: list[Any]) -> tuple[dict[Any, Any], Any]:
    import torch

    net = model.model
    device = net.get_input_embeddings().weight.device
    hooks = SiteHooks(model, [()], [Layout(0, 0, len(ids), len(ids))], record)
    try:
        if hooks.attention:
            with eager_attention(net, LOOM, "model"):
                out = net(torch.tensor([ids], device=device), output_hidden_states=True)
        else:
            out = net(torch.tensor([ids], device=device), output_hidden_states=True)
    finally:
        hooks.close()
    return {k: v[0].float() for k, v in hooks.kept.items()}, out


def _mid_streams(model: LoadedModel, arch: Arch | None) -> tuple[dict[int, Any], list[Any]]:
    """Pre-hooks keeping, per sequential block, the input of the module that reads the stream between its sublayers
    (the MLP's norm, or the MLP itself)."""
    streams: dict[int, Any] = {}
    handles: list[Any] = []
    if arch is None or arch.residual != "sequential" or arch.parallel(model.model.config):
        return streams, handles
    for i, block in enumerate(part(model.model.base_model, arch.blocks)):
        reader = part(block, arch.ln2) or part(block, arch.mlp)

        def keep(module: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            streams[i] = _tokens(args[0] if args else kwargs["hidden_states"])

        handles.append(reader.register_forward_pre_hook(keep, with_kwargs=True))
    return streams, handles


def _sums(model: LoadedModel, got: dict[Any, Any], parallel: bool, residual: str, streams: dict[int, Any]) -> None:
    n = model.num_layers
    pos = got.get("hook_pos_embed", 0)
    if residual != "post_ln" and "hook_embed" in got:
        _close(model, "hook_embed", got["hook_embed"] + pos, got["blocks.0.hook_resid_pre"], "blocks.0.hook_resid_pre")
    for i in range(n):
        at = f"blocks.{i}."
        pre, post = got[at + "hook_resid_pre"], got[at + "hook_resid_post"]
        if at + "hook_attn_out" not in got:
            continue
        attn = got[at + "hook_attn_out"]
        if residual == "post_ln":
            _close(model, at + "hook_attn_out", pre + attn, got[at + "hook_resid_mid"], "hook_resid_mid")
        elif parallel:
            total = pre + attn + got[at + "hook_mlp_out"]
            _close(model, at + "hook_attn_out and hook_mlp_out", total, post, "resid_pre + attn_out + mlp_out")
        else:
            mid = got[at + "hook_resid_mid"]
            _close(model, at + "hook_attn_out", pre + attn, streams[i], "the stream the MLP's side reads")
            _close(model, at + "hook_resid_mid", mid, streams[i], "the stream the MLP's side reads")
            _close(model, at + "hook_mlp_out", mid + got[at + "hook_mlp_out"], post, "hook_resid_post")


def _norm_io(scales: dict[Any, Site]) -> tuple[dict[int, list[Any]], list[Any]]:
    """Hooks keeping each scaled norm's input and output, by the norm's id."""
    io: dict[int, list[Any]] = {}
    handles: list[Any] = []
    for norm in {id(s.module): s.module for s in scales.values()}.values():
        kept = io.setdefault(id(norm), [None, None])

        def before(module: Any, args: tuple, kept: list[Any] = kept) -> None:
            kept[0] = _tokens(args[0])

        def after(module: Any, args: tuple, output: Any, kept: list[Any] = kept) -> None:
            kept[1] = _tokens(output[0] if isinstance(output, tuple) else output)

        handles += [norm.register_forward_pre_hook(before), norm.register_forward_hook(after)]
    return io, handles


def _tokens(t: Any) -> Any:
    """The probe's one row [T, D] of a module's tensor, [1, T, D] or flattened [T, D] (OPT's MLP side)."""
    return t.reshape(-1, t.shape[-1]).float().cpu()


def _norm(model: LoadedModel, key: str, site: Site, x: Any, scale: Any, y: Any) -> None:
    """A norm's output is (x - mean) / scale * w + b (LayerNorm), x / scale * w (RMSNorm) or x / scale * (1 + w)
    (Gemma), with the recorded scale: the map the logit attribution freezes."""
    if site.extra == "layer":
        x = x - x.mean(-1, keepdim=True)
    weight = getattr(site.module, "weight", None)
    w = weight.detach().float().cpu() if weight is not None else 1.0
    want = x / scale * (1 + w if site.extra == "rms1p" else w)
    if getattr(site.module, "bias", None) is not None:
        want = want + site.module.bias.detach().float().cpu()
    _close(model, key, want, y, f"its norm's output ({site.extra})")


def _close(model: LoadedModel, where: str, got: Any, want: Any, what: str, atol: float = 0.0) -> None:
    import torch

    # Half-precision weights round at about 1e-3 of a value, and so do quantized ones: bitsandbytes computes 4-bit
    # weights in bfloat16 on a CPU with AVX-512 BF16, where two ways of computing attention then differ by that much.
    half = model.model.dtype != torch.float32 or bool(getattr(model.model, "is_quantized", False))
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    if diff > atol + (3e-2 if half else 1e-4) * max(scale, 1e-6):
        _fail(model, where, f"differs from {what} by {diff:.3g} (largest value {scale:.3g})")


def _fail(model: LoadedModel, where: str, why: str) -> None:
    net = model.model
    raise BadModel(
        f"model: {model.ref.id!r} ({type(net).__name__}, model_type {getattr(net.config, 'model_type', None)!r}) "
        f"fails the hook-point self-check at load: {where} {why}; The Loom refuses a model whose sites do not add "
        "up rather than serve wrong numbers (a transformers release may have changed its blocks)",
        field="model",
        site=where,
    )
