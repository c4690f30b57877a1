"""Attention weights of the requested blocks, by forward hooks on their attention modules, and The Loom's own eager
attention, which fires the hook points inside attention.

SDPA and flash kernels never materialise the weights, so a request that asks for them runs under eager attention:
``eager_attention`` switches the loaded model for the duration of the request and switches it back after, which in
transformers 5 is a config change (the attention function is looked up per call), not a reload. A pass that reads or
edits ``attn.hook_rot_q``, ``hook_rot_k``, ``hook_attn_scores`` or ``hook_pattern`` runs under ``LOOM``, an eager
attention registered with transformers that hands those tensors to the pass's ``SiteHooks`` (``sites.py``):
TransformerLens's computation (scores scaled, soft-capped where the model does, masked; the pattern their softmax in
float32), which the self-check at load compares with the model's own attention.

GPT-Neo computes its attention in its own ``_attn`` (unscaled float32 scores, its causal or local-window mask), and
BLOOM in its attention module's ``forward`` (ALiBi added by ``baddbmm``), which no attention function reaches:
``own_attention`` wraps that method of each of their attention modules once, when the hook points are derived, and
the wrapper computes the model's attention with the same points whenever a pass carries them or runs under ``LOOM``
(which, for such a model, switches nothing: it only turns the wrappers on).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from loom_kernel import Unsupported

FIELD = "return_attention"
LOOM = "loom_eager"
MASKED = -3.4028234663852886e38  # float32's most negative value: what a masked score holds
OWN = "_loom_own_attention"  # on a model whose attention modules are wrapped: {"on": under LOOM}


@contextmanager
def eager_attention(net: Any, name: str = "eager", field: str = FIELD) -> Iterator[None]:
    """The model under attention implementation ``name`` (eager, or ``LOOM``) for the duration."""
    own = vars(net).get(OWN)
    if name == LOOM and own is not None:  # the model's own attention code, wrapped: turn the wrappers on
        before = own["on"]
        own["on"] = True
        try:
            yield
        finally:
            own["on"] = before
        return
    current = getattr(net.config, "_attn_implementation", None)
    if current == name:
        yield
        return
    if name == LOOM:
        register()
    try:
        net.set_attn_implementation(name)
    except Exception as exc:  # a model without an eager path: say so instead of failing inside the pass
        raise Unsupported(
            f"{field}: {type(net).__name__} cannot switch to eager attention ({exc})", field=field
        ) from None
    try:
        yield
    finally:
        net.set_attn_implementation(current)


def register() -> None:
    """``LOOM`` in transformers' attention functions, with eager attention's masks (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if LOOM not in AttentionInterface._global_mapping:
        AttentionInterface.register(LOOM, loom_attention)
        AttentionMaskInterface.register(LOOM, eager_mask)


def loom_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Eager attention that fires the pass's points inside it: q and k after rotary embeddings ([B, heads, T, d_head]
    and [B, kv heads, keys, d_head]), the scores (scaled, soft-capped where the model does, masked with the most
    negative float) and the pattern (their softmax in float32, 0 where masked; with GPT-OSS's sinks, ``s_aux``, the
    softmax over the keys and the head's sink, whose column is left out)."""
    import torch

    hooks, sites = getattr(module, "_loom_sites", (None, ()))
    if hooks is not None:
        query = hooks.inside(sites, "rot_q", query)
        key = hooks.inside(sites, "rot_k", key, queries=query.shape[2])
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    values = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), keys.float().transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pattern = masked_pattern(module, scores, attention_mask, sinks=kwargs.get("s_aux")).to(values.dtype)
    if dropout and module.training:
        pattern = torch.nn.functional.dropout(pattern, p=dropout)
    out = torch.matmul(pattern, values)
    return out.transpose(1, 2).contiguous(), pattern


def masked_pattern(module: Any, scores: Any, attention_mask: Any, visible: Any = None, sinks: Any = None) -> Any:
    """The pattern (float32) of ``scores`` [B, heads, T, keys]: masked where ``visible`` or the attention mask hides a
    key (the most negative float there), through the pass's scores points (an edit never unmasks a key), their
    softmax through its pattern points. ``sinks`` [heads]: a logit per head that takes a share of each row's softmax
    and attends to nothing (GPT-OSS): the pattern is the keys' share, so its rows sum to less than 1."""
    import torch

    hooks, sites = getattr(module, "_loom_sites", (None, ()))
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        if mask.dtype == torch.bool:
            seen = mask
        else:  # additive: 0 where seen (or a bias, ALiBi), the dtype's most negative value where masked
            seen = mask > torch.finfo(mask.dtype).min / 2
            scores = scores + mask.float()
        visible = seen if visible is None else visible & seen
    if visible is not None:
        scores = scores.masked_fill(~visible, MASKED)
    if hooks is not None:
        scores = hooks.inside(sites, "scores", scores, visible=visible)
    if sinks is None:
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32)
    else:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        pattern = torch.softmax(torch.cat([scores.float(), sink], dim=-1), dim=-1)[..., :-1]
    return hooks.inside(sites, "pattern", pattern) if hooks is not None else pattern


# The class each kind of the model's own attention code is written for (GPT-Neo's is checked by its methods).
OWN_CLASSES = {"bloom": "BloomAttention", "mpnet": "MPNetSelfAttention"}


def own_attention(net: Any, core: Any, kind: str = "gpt_neo") -> bool:
    """Wraps the model's own attention code in ``core`` once, so that it computes The Loom's version of it (with the
    pass's scores and pattern points) when a pass carries hook points or runs under ``LOOM``, and the model's own code
    otherwise: GPT-Neo's ``_attn`` (``gpt_neo_attention``), BLOOM's attention module's ``forward``
    (``bloom_attention``), MPNet's self-attention's ``forward`` (``mpnet_attention``). False where the module does
    not run that code (GPT-Neo under flash attention has a forward of its own; a class other than the one written
    for), so the points would not fire."""
    method = "_attn" if kind == "gpt_neo" else "forward"
    if method in vars(core):
        return True
    if kind == "gpt_neo":
        owners = [next((c for c in type(core).__mro__ if name in vars(c)), None) for name in ("_attn", "forward")]
        if owners[0] is None or owners[1] is None or not issubclass(owners[0], owners[1]):
            return False
    elif type(core).__name__ != OWN_CLASSES[kind] or "forward" not in vars(type(core)):
        return False
    original = getattr(core, method)
    state = vars(net).setdefault(OWN, {"on": False})
    ours = {"gpt_neo": gpt_neo_attention, "bloom": bloom_attention, "mpnet": mpnet_attention}[kind]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if state["on"] or "_loom_sites" in vars(core):
            return ours(core, *args, **kwargs)
        return original(*args, **kwargs)

    setattr(core, method, wrapped)
    return True


def gpt_neo_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any = None) -> tuple[Any, Any]:
    """GPT-Neo's ``_attn`` with the pass's scores and pattern: float32 q.k^T without scaling, masked where its causal
    or local-window mask (``module.bias``) or the attention mask hides a key (the most negative float there, as
    ``loom_attention`` has it; GPT-Neo's own sum of the two masks holds that value or less, the same 0 in the pattern),
    the softmax in float32, dropout, the values."""
    import torch

    queries, keys = query.shape[-2], key.shape[-2]
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2))
    causal = module.bias[:, :, keys - queries : keys, :keys]  # decoding: the last ``queries`` rows
    pattern = module.attn_dropout(masked_pattern(module, scores, attention_mask, causal).to(value.dtype))
    return torch.matmul(pattern, value), pattern


def bloom_attention(
    module: Any,
    hidden_states: Any,
    residual: Any,
    alibi: Any,
    attention_mask: Any,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``BloomAttention.forward`` with the pass's scores and pattern: its fused projection split [heads, 3, d_head],
    the cache, the scores in float32 as it computes them (q.k^T / sqrt(d_head) plus its ALiBi bias, the slope times
    the key's position from the row's first token), masked as ``loom_attention`` masks them, the softmax in float32,
    dropout, the values, its output projection (a module call: its hooks fire) and the residual it adds itself."""
    import torch

    batch, queries, _ = hidden_states.shape
    heads, d_head = module.num_heads, module.head_dim
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    q = query.reshape(batch * heads, -1, d_head).float()
    k = key.reshape(batch * heads, -1, d_head).transpose(-1, -2).float()
    scores = alibi.float().baddbmm(batch1=q, batch2=k, beta=module.beta, alpha=module.inv_norm_factor)
    scores = scores.view(batch, heads, queries, -1)
    pattern = module.attention_dropout(masked_pattern(module, scores, attention_mask).to(value.dtype))
    context = torch.matmul(pattern, value.reshape(batch, heads, -1, d_head))  # [B, heads, T, d_head]
    output = module.dense(context.transpose(1, 2).reshape(batch, queries, heads * d_head))
    output = torch.nn.functional.dropout(output, p=module.hidden_dropout, training=module.training)
    return residual + output, pattern


def mpnet_attention(
    module: Any,
    hidden_states: Any,
    attention_mask: Any = None,
    position_bias: Any = None,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """``MPNetSelfAttention.forward`` with the pass's scores and pattern: q, k and v from its projections (module
    calls: their hooks fire), the scores in float32 as it computes them (q.k^T / sqrt(d_head) plus its relative
    position bias), masked as ``loom_attention`` masks them, the softmax in float32, dropout, the values and its
    output projection."""
    import torch

    shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (module.q, module.k, module.v))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / module.attention_head_size**0.5
    if position_bias is not None:
        scores = scores + position_bias.float()
    pattern = module.dropout(masked_pattern(module, scores, attention_mask).to(v.dtype))
    context = torch.matmul(pattern, v).transpose(1, 2).reshape(*hidden_states.shape[:-1], module.all_head_size)
    out = module.o(context)
    return (out, pattern) if output_attentions else (out,)


def _target(net: Any) -> tuple[Any, int, str | None]:
    """(attention module class, index of the weights in its output, name suffix) as transformers records them."""
    spec = (getattr(type(net), "_can_record_outputs", None) or {}).get("attentions")
    if spec is None:
        return None, 1, None
    if isinstance(spec, type):
        return spec, 1, None
    return getattr(spec, "target_class", None), getattr(spec, "index", 1), getattr(spec, "layer_name", None)


def find_attention(net: Any, block: Any) -> tuple[Any, int]:
    """The self-attention module of one block and where its output carries the weights."""
    target, index, suffix = _target(net)
    fallback = None
    for name, module in block.named_modules():
        if target is not None and isinstance(module, target):
            if suffix is None or f".{name}".endswith(suffix):
                return module, index
        elif fallback is None and type(module).__name__.endswith("Attention"):
            fallback = module
    if fallback is None:
        raise Unsupported(f"{FIELD}: no attention module found in {type(block).__name__}", field=FIELD)
    return fallback, 1


def take_columns(t: Any, rows: Any, dim: int = 1) -> Any:
    """``t`` [B, columns, ...] (the columns at ``dim``) cut to ``rows``: None, every column; a list, those columns of
    every row; a LongTensor [B, k], each row's own k columns (rows of different lengths, padded on the right)."""
    import torch

    if rows is None:
        return t
    if isinstance(rows, list):
        return t[(slice(None),) * dim + (rows,)]
    moved = t.movedim(dim, 1)
    picked = moved[torch.arange(t.shape[0], device=t.device)[:, None], rows.to(t.device)]  # [B, k, ...]
    return picked.movedim(1, dim)


class AttentionRecorder:
    """Keeps the latest call's weights [B, heads, q, k] per requested index, on CPU.

    ``rows`` selects query rows as in ``SiteHooks`` (None: all, ``[-1]``: the last, [B, k]: each row's own).
    Index i is the attention of block i (1-based), the block whose output is hidden state i.
    """

    def __init__(self, net: Any, blocks: Sequence[Any], indices: Sequence[int]) -> None:
        self.rows: Any = None
        self.latest: dict[int, Any] = {}
        self._handles = []
        for i in indices:
            module, where = find_attention(net, blocks[i - 1])
            self._handles.append(module.register_forward_hook(self._hook(i, where)))

    def _hook(self, index: int, where: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            weights = output[where] if isinstance(output, tuple | list) and len(output) > where else None
            if weights is None:
                raise Unsupported(f"{FIELD}: {type(module).__name__} returned no attention weights", field=FIELD)
            self.latest[index] = take_columns(weights.detach(), self.rows, dim=2).to("cpu", copy=True)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
