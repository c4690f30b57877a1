"""Hook points by TransformerLens's names, derived from the architecture table (``architectures.py``), and the hooks
of one pass that edit them (``Batch.interventions``) and record them (``Capture.sites`` and layer indices).

Each hook point is its own point, with TransformerLens's semantics: a state is what its hook saw when it fired (after
the edits at that point, before any later one), edits at different points apply in forward order and edits at one
point in list order. Hidden-state index ``i`` < N is an alias of ``blocks.{i}.hook_resid_pre`` and index N of
``ln_final.hook_normalized`` (of the last block's output where there is no final norm: BERT's last
``ln2.hook_normalized``; OPT-350m's index N is ``project_out``'s output, of its embedding width), so
``blocks.{i-1}.hook_resid_post`` is a point of its own that fires just before index ``i`` (BERT's, as
TransformerLens's BertBlock has it, is its second LayerNorm's input). The values are the model's own (no LayerNorm
folding, no centring).

A point is a module's input (a forward pre-hook), its output (a forward hook), or a tensor inside transformers'
attention function (``attention.py``: ``hook_rot_q``, ``hook_rot_k``, ``hook_attn_scores``, ``hook_pattern``, for which
a pass runs under The Loom's eager attention; GPT-Neo's scores and pattern inside its own ``_attn``, BLOOM's inside its
attention module's ``forward``, each wrapped). A module that sees the batch flattened to [B * T, D] (OPT's MLP side) is
viewed [B, T, D]. Points that fire at one torch hook are taken in TransformerLens's order (``RANKS``). Some are
computed from what the hook sees: ``hook_resid_mid`` is resid_pre + attn_out (an edit there is carried by the
attention output: attn_out becomes f(resid_pre + attn_out) - resid_pre), ``attn.hook_result`` each head's z through
its share of the output projection (an edit there makes the projection's output the sum of the edited results plus
its bias), ``hook_scale`` a norm's sqrt(variance + eps) (an edit there rescales the norm's output where its
``hook_normalized`` reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from loom_kernel import Intervention, Layout, LoadedModel, apply_edit, edit_columns, find_blocks
from loom_transformers.architectures import Arch, arch_of, part, refused
from loom_transformers.attention import MASKED, own_attention, take_columns

# TransformerLens's order of the points in a block.
RANKS = {
    "hook_resid_pre": 0,
    # TransformerLens's per-head copies of the stream attention reads (use_attn_in, use_split_qkv_input): each head's
    # q, k and v (or only its q, k or v) are computed from its own copy, through the norm before attention.
    "hook_attn_in": 0.2,
    "hook_q_input": 0.4,
    "hook_k_input": 0.6,
    "hook_v_input": 0.8,
    "ln1.hook_scale": 1,
    "ln1.hook_normalized": 2,
    "attn.hook_q": 3,
    "attn.hook_k": 4,
    "attn.hook_v": 5,
    "attn.hook_rot_q": 6,
    "attn.hook_rot_k": 7,
    "attn.hook_attn_scores": 8,
    "attn.hook_pattern": 9,
    "attn.hook_z": 10,
    "attn.hook_result": 11,
    "hook_attn_out": 12,
    "hook_resid_mid": 13,
    "hook_mlp_in": 13.5,  # the MLP's own copy of the stream it reads (use_hook_mlp_in), before its norm
    "ln2.hook_scale": 14,
    "ln2.hook_normalized": 15,
    "mlp.hook_pre": 16,
    "mlp.hook_pre_linear": 17,
    "mlp.hook_post": 18,
    "hook_mlp_out": 19,
    "hook_resid_post": 20,
}
BLOCK_POINTS = tuple(RANKS)
GLOBAL_POINTS = ("hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized")
PER_HEAD = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z")
KEYED = ("attn.hook_attn_scores", "attn.hook_pattern")  # one value per key position: [heads, keys]
ATTENTION_INSIDE = ("attn.hook_rot_q", "attn.hook_rot_k", *KEYED)
KEYS = -1  # the last dimension of a keyed point's shape: the row's key positions


@attrs.define(frozen=True, eq=False)
class Site:
    name: str
    module: Any
    side: str  # "in" (forward pre-hook), "out" (forward hook) or "attn" (inside the attention function)
    rank: float  # the order of the points at one torch hook
    shape: tuple[int, ...]
    # plain | mid | result | scale | broadcast | rot_q | rot_k | scores | pattern | input (a per-head copy of the stream
    # attention reads) | from_input (a projection's heads recomputed from edited copies)
    kind: str = "plain"
    view: Callable[[Any], Any] | None = None  # the hooked tensor [B, T, ...] -> a view [B, T, *shape]
    # Where ``view`` can only copy (Falcon's grouped queries, each group's heads apart from the next group's):
    # (the hooked tensor, the point's edited [B, T, *shape]) -> None, written back into the tensor.
    put: Callable[[Any, Any], None] | None = None
    block: Any = None  # mid: the block whose input is resid_pre
    extra: Any = None  # result: (the output projection, heads); scale: the norm's kind
    # scale: the point that reads the norm's output (its hook_normalized), where an edited scale rescales it: a norm
    # that feeds both sublayers of a parallel block is each one's own there, as TransformerLens's copy of it is.
    reader: Site | None = None

    @property
    def hook(self) -> tuple[int, str]:
        return id(self.module), self.side

    @property
    def keyed(self) -> bool:
        return self.kind in ("scores", "pattern")


def site_map(model: LoadedModel) -> dict[int | str, Site | str]:
    """Every hook point of ``model`` by index and name; a string says why the model has no such site."""
    if "site_map" not in model.extra:
        model.extra["site_map"] = _derive(model)
    return model.extra["site_map"]


def _derive(model: LoadedModel) -> dict[int | str, Site | str]:
    net, n, d = model.model, model.num_layers, model.hidden_size
    arch = arch_of(net.config)
    if arch is None:
        return _unknown(model)
    base = net.base_model
    blocks = part(base, arch.blocks)
    sites: dict[int | str, Site | str] = {}
    # The token embeddings as the stream gets them: through BLOOM's norm, or OPT's project_in where it has one.
    embed = part(base, arch.embed_norm) or part(base, arch.project_in) or part(base, arch.embed)
    sites["hook_embed"] = Site("hook_embed", embed, "out", -2, (d,))
    pos = part(base, arch.pos_embed)
    alibi = arch.own_attention == "bloom" or getattr(net.config, "alibi", False)
    instead = " (ALiBi instead: a bias on the attention scores)" if alibi else " (rotary embeddings instead)"
    sites["hook_pos_embed"] = (
        Site("hook_pos_embed", pos, "out", -1, (d,), kind="broadcast")
        if pos is not None
        else f"{arch.name} has no learned position embedding" + (instead if arch.rotary or alibi else "")
    )
    for i, block in enumerate(blocks):
        for name, site in _block(net, arch, block, i, d).items():
            sites[f"blocks.{i}.{name}"] = site
    final = part(base, arch.final_norm)
    if final is not None:
        top = 100 * (n + 1)
        normalized = Site("ln_final.hook_normalized", final, "out", top + 1, (d,))
        sites["ln_final.hook_scale"] = Site(
            "ln_final.hook_scale", final, "in", top, (1,), kind="scale", extra=arch.norm, reader=normalized
        )
        sites["ln_final.hook_normalized"] = normalized
    else:
        through = " through project_out" if part(base, arch.project_out) is not None else ""
        for name in ("ln_final.hook_scale", "ln_final.hook_normalized"):
            sites[name] = f"{arch.name} has no final norm: index {n} is blocks.{n - 1}.{block_output(arch)}{through}"
    for i in range(n):
        sites[i] = sites[f"blocks.{i}.hook_resid_pre"]
    last = "ln_final.hook_normalized" if final is not None else f"blocks.{n - 1}.{block_output(arch)}"
    sites[n] = sites[last]
    out = part(base, arch.project_out)
    if out is not None:  # OPT-350m: index N, what the head reads, is the stream mapped to the embedding width
        sites[n] = Site(str(n), out, "out", 100 * (n + 1) + 2, (width(out),))
    return sites


def block_output(arch: Arch) -> str:
    """The point that is a block's output: hook_resid_post, or ln2.hook_normalized after a post-LN block's add."""
    return "ln2.hook_normalized" if arch.residual == "post_ln" else "hook_resid_post"


def _unknown(model: LoadedModel) -> dict[int | str, Site | str]:
    """A model the table does not describe: its hidden-state indices (block inputs, and the base model's output, as
    ``output_hidden_states`` has them: the self-check at load compares), no named point."""
    net, n = model.model, model.num_layers
    base, blocks = find_blocks(net, n)
    kind = getattr(net.config, "model_type", None)
    refusal = refused(net.config)
    why = (
        f"the transformers loader's layout for model_type {kind!r} does not describe this model: {refusal}; it offers "
        "no hook points rather than guess them (hidden-state indices are served)"
        if refusal
        else f"the transformers loader has no layout for model_type {kind!r} ({type(net).__name__}), so it offers no "
        f"hook points rather than guess them (hidden-state indices are served)"
    )
    sites: dict[int | str, Site | str] = {i: Site(str(i), blocks[i], "in", 100 * (i + 1), ()) for i in range(n)}
    # Index N is the output of the module holding the blocks, not of the base model: a head model may call that
    # module directly (OPT's calls ``model.decoder``), so that a hook on the base model would never fire. Where the
    # base model holds the blocks itself that module is the base model.
    sites[n] = Site(str(n), _parent(base, blocks), "out", 100 * (n + 1), ())
    for name in GLOBAL_POINTS:
        sites[name] = why
    for i in range(n):
        for name in BLOCK_POINTS:
            sites[f"blocks.{i}.{name}"] = why
    model.extra["unknown_architecture"] = why
    return sites


def _parent(base: Any, child: Any) -> Any:
    """The module of ``base`` (``base`` itself included) whose direct child is ``child``."""
    name = next(name for name, module in base.named_modules() if module is child)
    return base.get_submodule(name.rpartition(".")[0])


def heads_of(config: Any, d: int) -> tuple[int, int]:
    """(query heads, d_head) as the config names them."""
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    d_head = getattr(config, "head_dim", None)
    return heads, int(d_head) if isinstance(d_head, int) and d_head else d // max(heads, 1)


def width(module: Any) -> int:
    """A projection's output width: a Linear's (quantized ones keep ``out_features``) or GPT-2's Conv1D's."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return int(module.weight.shape[0])


def _block(net: Any, arch: Arch, block: Any, i: int, d: int) -> dict[str, Site | str]:
    """The points of block ``i``, by their name after ``blocks.{i}.``."""
    config = net.config
    rank = 100 * (i + 1)
    out: dict[str, Site | str] = {}

    def site(name: str, module: Any, side: str, shape: tuple[int, ...], **kw: Any) -> Site:
        return Site(f"blocks.{i}.{name}", module, side, rank + RANKS[name], shape, **kw)

    def scale(name: str, norm: Any, after: str | None = None) -> Site | str:
        """``ln1.hook_scale`` or ``ln2.hook_scale``: the scale of ``norm``'s input, edited where its ``hook_normalized``
        reads the norm's output; ``after``: the point the same hook runs first (post-LN: the stream the norm
        normalizes is itself a point there). Why not, where the block has no such point or no such norm module."""
        reader = out[name.replace("scale", "normalized")]
        if isinstance(reader, str):
            return reader
        if norm is None:
            return f"{arch.name}'s block has no {name.split('.')[0]} module of its own"
        at = rank + RANKS[after] + 0.5 if after else rank + RANKS[name]
        return Site(f"blocks.{i}.{name}", norm, "in", at, (1,), kind="scale", extra=arch.norm, reader=reader)

    out["hook_resid_pre"] = site("hook_resid_pre", block, "in", (d,))
    out["hook_resid_post"] = site("hook_resid_post", block, "out", (d,))
    if arch.mixer is not None:
        out["ln1.hook_normalized"] = site("ln1.hook_normalized", part(block, arch.mixer), "in", (d,))
        out["ln1.hook_scale"] = scale("ln1.hook_scale", part(block, arch.ln1))
        why = f"{arch.name}'s blocks hold a state-space mixer: no attention, no MLP"
        for name in BLOCK_POINTS:
            out.setdefault(name, why)
        return out
    parallel = arch.parallel(config)
    attn = part(block, arch.attn)
    heads, d_head = heads_of(config, d)
    out.update(_attention(net, arch, attn, site, heads, d_head, i))
    o = part(attn, arch.o)
    post_ln = arch.residual == "post_ln"
    # What attention adds to the stream: its output projection's output where its module's output is more (BERT's
    # holds the LayerNorm, BLOOM's the residual), else the module's output (through a post-attention norm).
    attn_out = o if post_ln or arch.sublayers_add else part(block, arch.post_attn_norm) or attn
    out["hook_attn_out"] = site("hook_attn_out", attn_out, "out", (d,))
    if post_ln:
        out["hook_resid_mid"] = site("hook_resid_mid", part(block, arch.ln1), "in", (d,))
        # TransformerLens's BertBlock: resid_post is ln1's output + mlp_out, ln2's input; the block's output (the next
        # block's resid_pre, and index N) is ln2's output, its ln2.hook_normalized.
        out["hook_resid_post"] = site("hook_resid_post", part(block, arch.ln2), "in", (d,))
        out["ln1.hook_normalized"] = site("ln1.hook_normalized", part(block, arch.ln1), "out", (d,))
        out["ln2.hook_normalized"] = site("ln2.hook_normalized", part(block, arch.ln2), "out", (d,))
        out["ln1.hook_scale"] = scale("ln1.hook_scale", part(block, arch.ln1), after="hook_resid_mid")
        out["ln2.hook_scale"] = scale("ln2.hook_scale", part(block, arch.ln2), after="hook_resid_post")
    elif parallel:
        out["hook_resid_mid"] = (
            f"{arch.name}'s block is parallel-residual (attention and MLP read the same input and add to the stream "
            "together): there is no stream between them"
        )
    else:
        out["hook_resid_mid"] = site("hook_resid_mid", attn_out, "out", (d,), kind="mid", block=block)
    module = part(block, arch.mlp) if arch.mlp else None
    mlp = module if module is not None else block  # where the MLP's linears are (the block's own: BERT, OPT)
    if not post_ln:
        if not arch.ln1:
            out["ln1.hook_normalized"] = (
                f"{arch.name} normalizes each sublayer's output, not its input: attention reads the stream itself"
            )
        elif norm_module(block, arch.ln1) is None:
            out["ln1.hook_normalized"] = (
                f"{arch.name}'s block {i} has no norm before attention (its {arch.ln1} is an Identity: the embeddings' "
                "norm comes just before it), so attention reads hook_resid_pre itself"
            )
        else:
            out["ln1.hook_normalized"] = site("ln1.hook_normalized", attn, "in", (d,))
        if module is None and arch.ln2:  # no MLP module to read the input of: the norm's own output (OPT)
            out["ln2.hook_normalized"] = site("ln2.hook_normalized", part(block, arch.ln2), "out", (d,))
        else:
            out["ln2.hook_normalized"] = (
                site("ln2.hook_normalized", mlp, "in", (d,))
                if arch.ln2 or (parallel and arch.ln1)
                else f"{arch.name} normalizes each sublayer's output, not its input: the MLP reads hook_resid_mid "
                "itself"
            )
        for ln in ("ln1", "ln2"):  # a parallel block's one norm (GPT-J, Phi, Cohere, Falcon) is both ln1 and ln2
            norm = part(block, getattr(arch, ln)) or (part(block, arch.ln1) if parallel else None)
            out[f"{ln}.hook_scale"] = scale(f"{ln}.hook_scale", norm)
    out.update(_mlp(arch, mlp, site))
    post_mlp = part(block, arch.post_mlp_norm)
    mlp_out = part(mlp, arch.down) if post_ln or arch.sublayers_add or module is None else post_mlp or mlp
    out["hook_mlp_out"] = site("hook_mlp_out", mlp_out, "out", (d,))
    out["hook_mlp_in"] = _mlp_in(arch, block, module, mlp, parallel, site, d)
    out.update(_inputs(arch, block, attn, out, site, d))
    return out


def norm_module(block: Any, path: str | None) -> Any:
    """The norm module at ``path`` in ``block``; None where there is none, or where it is an ``nn.Identity``
    (ModernBERT's block 0, whose attention reads the embeddings' normed output as it is): no norm, no scale to read."""
    module = part(block, path)
    return None if module is None or type(module).__name__ == "Identity" else module


def _mlp_in(arch: Arch, block: Any, module: Any, mlp: Any, parallel: bool, site: Callable[..., Site], d: int) -> Any:
    """``hook_mlp_in``: the input of the module that reads the MLP's side of the stream and nothing else (its norm;
    post-LN: its first linear; without a norm before it: the MLP itself), so that an edit there reaches the MLP only,
    not the stream that flows past it."""
    if arch.residual == "post_ln":
        first = part(mlp, arch.fused_gate_up or arch.gate or arch.up) if module is None else module
        return site("hook_mlp_in", first, "in", (d,))
    norm = part(block, arch.ln2)
    if norm is not None:
        return site("hook_mlp_in", norm, "in", (d,))
    if parallel:
        return (
            f"{arch.name}'s block reads one norm's output in both sublayers: the MLP has no input of its own before "
            "it (read hook_resid_pre; ln2.hook_normalized is the MLP's view of the norm)"
        )
    return site("hook_mlp_in", module if module is not None else mlp, "in", (d,))


def _inputs(arch: Arch, block: Any, attn: Any, out: dict[str, Site | str], site: Callable[..., Site], d: int) -> dict:
    """``hook_attn_in`` and ``hook_q/k/v_input``: the stream attention reads before its norm, one copy per head
    ([heads, d_model]; k and v per key-value head). The copies are read at the module whose input that stream is
    (the norm before attention, else attention itself) and leave it as it is; an edited copy feeds its head's q, k or
    v, recomputed from it by the norm and projection at the projection's output (``from_input``) before hook_q/k/v."""
    projections = [out[f"attn.hook_{x}"] for x in "qkv"]
    if not all(isinstance(p, Site) for p in projections):
        why = next(p for p in projections if isinstance(p, str))
        return {name: why for name in ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")}
    q, k, v = projections
    pre_norm = arch.residual != "post_ln" and arch.ln1 is not None
    norm = norm_module(block, arch.ln1) if pre_norm else None
    reads = norm if norm is not None else attn

    heads, kv = q.shape[0], k.shape[0]
    mha = kv == heads  # each query head has its own key and value: hook_attn_in's copy feeds all three
    attn_in = site("hook_attn_in", reads, "in", (heads, d), kind="input")
    sites: dict[str, Site | str] = {}
    made = []
    for x, proj, count in (("q", q, heads), ("k", k, kv), ("v", v, kv)):
        one = site(f"hook_{x}_input", reads, "in", (count, d), kind="input")
        # The copies it is computed from, the first one edited: its own, else hook_attn_in's (which it starts from).
        feeds = (one.name, attn_in.name) if mha else (one.name,)
        made.append(
            Site(
                f"{proj.name}.from_input",
                proj.module,
                "out",
                proj.rank - 0.5,
                proj.shape,
                "from_input",
                proj.view,
                put=proj.put,
                extra=(norm, feeds),
            )
        )
        sites[f"hook_{x}_input"] = attrs.evolve(one, extra=(made[-1:], attn_in.name if mha else None))
    sites["hook_attn_in"] = (
        attrs.evolve(attn_in, extra=(made, None))
        if mha
        else f"{arch.name}'s attention groups its {heads} query heads over {kv} key-value heads: a query head has no "
        "key and value of its own to compute from its copy; edit hook_q_input, hook_k_input or hook_v_input"
    )
    return sites


def _heads_view(count: int, d_head: int, start: int = 0) -> Callable[[Any], Any]:
    """[.., start : start + count * d_head] of the last dimension, viewed [.., count, d_head]."""
    stop = start + count * d_head
    return lambda t: t[..., start:stop].unflatten(-1, (count, d_head))


def _interleaved(count: int, d_head: int, j: int, parts: int = 3) -> Callable[[Any], Any]:
    """Part ``j`` of a projection laid out [count, parts, d_head] (GPT-NeoX's query_key_value, Falcon's)."""
    return lambda t: t.unflatten(-1, (count, parts, d_head))[..., j, :]


def _attention(net: Any, arch: Arch, attn: Any, site: Callable[..., Site], heads: int, d_head: int, i: int) -> dict:
    config = net.config
    out: dict[str, Site | str] = {}
    d_z = d_head  # the width of a head's value, and of its slice of hook_z
    rot_k: str | None = None  # why hook_rot_k is not offered where the block rotates
    if arch.latent:
        d_head, d_z = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
        q = part(attn, "q_b_proj") or part(attn, "q_proj")
        out["attn.hook_q"] = site("attn.hook_q", q, "out", (heads, d_head), view=_heads_view(heads, d_head))
        why = (
            f"{arch.name}'s attention is multi-head latent attention: each head's key and value are expanded by "
            "kv_b_proj from a latent shared by all heads (and the key's rotary part from kv_a_proj_with_mqa), which "
            "the cache holds; no module outputs them per token (read attn.hook_rot_k for the keys attention reads, "
            "attn.hook_z for the values' mix)"
        )
        out["attn.hook_k"] = out["attn.hook_v"] = why
        kv = heads
        rot_k = (
            f"{arch.name}'s keys are rebuilt from its cache's compressed latent at every step, so an edit of "
            "hook_rot_k would not reach the keys a later token attends to; no point is offered that an edit cannot keep"
        )
    elif arch.qkv is not None:
        mods = [part(attn, name) for name in arch.qkv]
        kv = width(mods[1]) // d_head
        for name, mod, count in zip(("attn.hook_q", "attn.hook_k", "attn.hook_v"), mods, (heads, kv, kv), strict=True):
            out[name] = site(name, mod, "out", (count, d_head), view=_heads_view(count, d_head))
    else:
        fused = part(attn, arch.fused_qkv)
        kv, views = _fused(arch, config, heads, d_head, width(fused))
        if views is None:
            for name in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
                out[name] = kv
            kv = heads  # hook_rot_k's heads: an undescribed projection is taken to have one per query head
        else:
            qkv = ("attn.hook_q", "attn.hook_k", "attn.hook_v")
            for name, count, view in zip(qkv, (heads, kv, kv), views, strict=True):
                out[name] = site(name, fused, "out", (count, d_head), view=view, put=getattr(view, "put", None))
    clip = getattr(config, arch.clip_qkv, None) if arch.clip_qkv else None
    if clip is not None:
        for name in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
            out[name] = (
                f"{arch.name} clamps q, k and v to +-{clip} ({arch.clip_qkv}) in place after their projections, so a "
                "projection's output is not what attention reads; hook_rot_q and hook_rot_k are the clamped q and k "
                "after rotary embeddings"
            )
    core = part(attn, arch.core) if arch.core else attn
    if arch.rotary and arch.rope_in is not None and not arch.rope_in(config, i):
        why = f"{arch.name}'s block {i} has no rotary embeddings (NoPE): nothing rotates its queries and keys"
        out["attn.hook_rot_q"] = out["attn.hook_rot_k"] = why
    elif arch.rotary and not getattr(config, "alibi", False):
        out["attn.hook_rot_q"] = site("attn.hook_rot_q", core, "attn", (heads, d_head), kind="rot_q")
        out["attn.hook_rot_k"] = rot_k or site("attn.hook_rot_k", core, "attn", (kv, d_head), kind="rot_k")
    else:
        why = f"{arch.name} has no rotary embeddings: hook_q and hook_k are what the scores read"
        out["attn.hook_rot_q"] = out["attn.hook_rot_k"] = why
    if arch.own_attention and not own_attention(net, core, arch.own_attention):
        out["attn.hook_attn_scores"] = out["attn.hook_pattern"] = (
            f"{arch.name}'s attention module ({type(core).__name__}) does not compute its attention in the code "
            "where The Loom reads these points (flash attention, or a transformers release that changed it?)"
        )
    elif getattr(config, "alibi", False):
        out["attn.hook_attn_scores"] = out["attn.hook_pattern"] = f"{arch.name} with ALiBi is not described"
    else:
        out["attn.hook_attn_scores"] = site("attn.hook_attn_scores", core, "attn", (heads, KEYS), kind="scores")
        out["attn.hook_pattern"] = site("attn.hook_pattern", core, "attn", (heads, KEYS), kind="pattern")
    o = part(attn, arch.o)
    out["attn.hook_z"] = site("attn.hook_z", o, "in", (heads, d_z), view=_heads_view(heads, d_z))
    weight = getattr(o, "weight", None)
    dense = weight is not None and weight.is_floating_point() and weight.numel() == heads * d_z * width(o)
    out["attn.hook_result"] = (
        site("attn.hook_result", o, "out", (heads, width(o)), kind="result", extra=(o, heads))
        if dense
        else f"the output projection's weight is not a dense matrix ({type(o).__name__}: quantized?)"
    )
    return out


def w_o(o: Any, heads: int) -> Any:
    """An output projection's weight as TransformerLens's W_O [heads, d_head, d_model] (a view)."""
    weight = o.weight
    if type(o).__name__ == "Conv1D":  # GPT-2: [in, out]
        return weight.unflatten(0, (heads, -1))
    return weight.T.unflatten(0, (heads, -1))


def _fused(arch: Arch, config: Any, heads: int, d_head: int, total: int) -> tuple[Any, Any]:
    """(key-value heads, the views of q, k and v) of a fused projection; (why not, None) for an undescribed one."""
    if arch.fused == "gpt2":
        return heads, [_heads_view(heads, d_head, j * heads * d_head) for j in range(3)]
    if arch.fused == "neox":
        return heads, [_interleaved(heads, d_head, j) for j in range(3)]
    if arch.fused == "phi3":
        kv = (total - heads * d_head) // (2 * d_head)
        starts = (0, heads * d_head, (heads + kv) * d_head)
        return kv, [_heads_view(c, d_head, s) for c, s in zip((heads, kv, kv), starts, strict=True)]
    if arch.fused == "bigcode":  # multi-query: [q | k | v] with one key-value head; else [heads, 3, d_head]
        layout = "phi3" if getattr(config, "multi_query", True) else "neox"
        return _fused(attrs.evolve(arch, fused=layout), config, heads, d_head, total)
    if arch.fused == "falcon":
        if getattr(config, "new_decoder_architecture", False):  # [kv, heads per kv + 2, d_head], as FalconAttention
            kv = (total // d_head - heads) // 2
            per = heads // kv
            return kv, [
                _GroupedQueries(kv, per, d_head),
                *(_interleaved(kv, d_head, j, per + 2) for j in (per, per + 1)),
            ]
        if getattr(config, "multi_query", False):
            starts = (0, heads * d_head, (heads + 1) * d_head)
            return 1, [_heads_view(c, d_head, s) for c, s in zip((heads, 1, 1), starts, strict=True)]
        return heads, [_interleaved(heads, d_head, j) for j in range(3)]
    return f"{arch.name}'s fused projection is not described", None


@attrs.define(frozen=True)
class _GroupedQueries:
    """The query heads of Falcon's grouped query_key_value (new_decoder_architecture), laid out [kv, per + 2,
    d_head]: each key-value head's ``per`` query heads, then its key and its value. Query head g * per + j is
    group g's j-th, as FalconAttention flattens them. No view holds them all (a group's queries are apart from the
    next group's by its key and value), so this is a copy, and ``put`` writes an edited one back."""

    kv: int
    per: int
    d_head: int

    def __call__(self, t: Any) -> Any:
        return self._groups(t)[..., : self.per, :].flatten(-3, -2)

    def put(self, t: Any, value: Any) -> None:
        self._groups(t)[..., : self.per, :] = value.unflatten(-2, (self.kv, self.per)).to(t.dtype)

    def _groups(self, t: Any) -> Any:
        return t.unflatten(-1, (self.kv, self.per + 2, self.d_head))


def _mlp(arch: Arch, mlp: Any, site: Callable[..., Site]) -> dict[str, Site | str]:
    out: dict[str, Site | str] = {}
    gate_name, up_name, down_name = arch.gate, arch.up, arch.down
    if not (arch.fused_gate_up or gate_name or up_name):  # a mixture of experts: its dense blocks are gated
        if part(mlp, "gate_proj") is None or part(mlp, "up_proj") is None:
            why = f"{arch.name}'s MLP is a mixture of experts (one MLP per expert): read hook_mlp_out"
            return {name: why for name in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")}
        gate_name, up_name, down_name = "gate_proj", "up_proj", "down_proj"  # Qwen3-MoE's mlp_only_layers
    if arch.fused_gate_up:
        fused = part(mlp, arch.fused_gate_up)
        half = width(fused) // 2
        out["mlp.hook_pre"] = site("mlp.hook_pre", fused, "out", (half,), view=lambda t: t[..., :half])
        out["mlp.hook_pre_linear"] = site("mlp.hook_pre_linear", fused, "out", (half,), view=lambda t: t[..., half:])
    elif gate_name:
        gate, up = part(mlp, gate_name), part(mlp, up_name)
        out["mlp.hook_pre"] = site("mlp.hook_pre", gate, "out", (width(gate),))
        out["mlp.hook_pre_linear"] = site("mlp.hook_pre_linear", up, "out", (width(up),))
    else:
        up = part(mlp, up_name)
        out["mlp.hook_pre"] = site("mlp.hook_pre", up, "out", (width(up),))
        out["mlp.hook_pre_linear"] = f"{arch.name}'s MLP is not gated: mlp.hook_pre is its only input projection"
    pre = out["mlp.hook_pre"]
    out["mlp.hook_post"] = site("mlp.hook_post", part(mlp, down_name), "in", pre.shape)
    return out


def site_shapes(model: LoadedModel) -> dict[str, tuple[int, ...] | str]:
    """``LoadedModel.sites``: each name's per-token shape (``KEYS``, -1, for a keyed point's key positions), or why
    the model has none."""
    return {
        name: site.shape if isinstance(site, Site) else site
        for name, site in site_map(model).items()
        if isinstance(name, str)
    }


def attention_sites(model: LoadedModel) -> frozenset[str]:
    """``LoadedModel.attention_sites``: the points read inside the attention function."""
    return frozenset(k for k, s in site_map(model).items() if isinstance(s, Site) and s.side == "attn")


def final_width(model: LoadedModel) -> int | None:
    """``LoadedModel.final_width``: index N's width where it is not the stream's (OPT-350m's project_out)."""
    site = site_map(model).get(model.num_layers)
    width = site.shape[0] if isinstance(site, Site) and len(site.shape) == 1 else model.hidden_size
    return width if width != model.hidden_size else None


def keyed_fill(model: LoadedModel, key: int | str) -> float | None:
    """For a keyed point (scores, pattern): what its key positions a query cannot see hold (the most negative float,
    0); None for any other point."""
    site = site_map(model).get(key)
    if not isinstance(site, Site) or not site.keyed:
        return None
    return MASKED if site.kind == "scores" else 0.0


class SiteHooks:
    """The hooks of one pass: each row's edits at their points, in forward order (in list order at one point), and the
    recording of ``record`` (layer indices and names), each read when its point fires. ``rows`` selects the columns
    kept (None: every one, ``[-1]``: the last, a LongTensor [B, k]: each row's own k columns, ``take_columns``);
    ``kept[key]`` is [B, kept, *shape] on CPU ([B, kept, heads, keys of the pass] for a keyed point); ``attention``:
    whether the pass must run under The Loom's attention."""

    def __init__(
        self,
        model: LoadedModel,
        edits: Sequence[Sequence[Intervention]],
        layout: Sequence[Layout],
        record: Sequence[int | str] = (),
        grad: bool = False,
    ) -> None:
        self.rows: Any = None
        self.kept: dict[int | str, Any] = {}
        # With ``grad``: (key, the tensor in the graph, its gradient -> the point's [B, T, ...]) of each recorded key.
        self.graph: list[tuple[int | str, Any, Callable[[Any], Any]]] = []
        self._grad = grad
        self._handles: list[Any] = []
        self._layout = list(layout)
        self._edits: dict[int, list[tuple[int, Intervention]]] = {}
        self._names: dict[int, list[int | str]] = {}
        self._inputs: dict[int, Any] = {}  # each resid_mid block's input, kept by a pre-hook on the block
        # Edited per-head copies of the stream attention reads, by point name: (copy [B, T, heads, D], the rows and
        # heads (None: all) edits touched, whether every head's copy is edited alike).
        self._copies: dict[str, tuple[Any, list[int], set[int] | None, bool]] = {}
        # An edited scale, by the hook of the point reading its norm's output: (the norm, old / new), applied there.
        self._ratio: dict[tuple[int, str], tuple[Any, Any]] = {}
        self._cores: list[Any] = []
        sites = site_map(model)
        hooks: dict[tuple[int, str], dict[int, Site]] = {}
        modules: dict[tuple[int, str], Any] = {}

        def use(site: Site | str) -> Site:
            assert isinstance(site, Site)
            hooks.setdefault(site.hook, {})[id(site)] = site
            modules[site.hook] = site.module
            if site.kind == "scale":  # the reader's hook carries an edited scale
                assert site.reader is not None
                hooks.setdefault(site.reader.hook, {})
                modules[site.reader.hook] = site.reader.module
            return site

        for b, row in enumerate(edits):
            for edit in row:
                site = use(sites[edit.site])
                self._edits.setdefault(id(site), []).append((b, edit))
                if site.kind == "input":  # the projections its edited copies feed
                    for companion in site.extra[0]:
                        use(companion)
        for key in record:
            self._names.setdefault(id(use(sites[key])), []).append(key)
        for key, group in hooks.items():
            self._register(modules[key], key[1], sorted(group.values(), key=lambda s: s.rank))
        blocks = {id(s.block): s.block for g in hooks.values() for s in g.values() if s.kind == "mid"}
        for block in blocks.values():
            self._handles.append(block.register_forward_pre_hook(self._stash(block), with_kwargs=True))
        self.attention = bool(self._cores)

    def _stash(self, block: Any) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self._inputs[id(block)] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _register(self, module: Any, side: str, sites: list[Site]) -> None:
        if side == "attn":
            module._loom_sites = (self, sites)
            self._cores.append(module)
            return
        if side == "in":

            def pre(module: Any, args: tuple, kwargs: dict) -> Any:
                h = args[0] if args else kwargs["hidden_states"]
                new = self._at(module, side, sites, h, args)
                if new is h:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            return

        def post(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
            new = self._at(module, "out", sites, h, args)
            if new is h:
                return None
            if isinstance(output, tuple):
                return (new, *output[1:])
            if hasattr(output, "last_hidden_state"):
                output.last_hidden_state = new
                return output
            return new

        self._handles.append(module.register_forward_hook(post))

    # -- at a torch hook -------------------------------------------------------------------------------------------

    def _at(self, module: Any, side: str, sites: list[Site], h: Any, args: Any) -> Any:
        """``_run`` on the tensor a hook sees; one that holds the batch flattened to [B * T, D] (OPT's MLP side)
        viewed [B, T, D] for it and handed back flat (always, in a pass with gradients: the model then goes on with
        the tensor the recorded view is part of)."""
        flat = h.dim() == 2
        x = h.unflatten(0, (len(self._layout), -1)) if flat else h
        new = self._run(sites, self._rescaled(module, side, x), args)
        if not flat:
            return new
        return h if new is x and not self._grad else new.flatten(0, 1)

    def _run(self, sites: list[Site], h: Any, args: Any) -> Any:
        """The points at one hook, in order: each one's edits, then its recording. The tensor the model goes on with."""
        fresh = False  # whether ``h`` is already this hook's own copy
        for site in sites:
            edits, names = self._edits.get(id(site), ()), self._names.get(id(site), ())
            if site.kind == "scale":
                self._scale(site, h, edits, names)
                continue
            if site.kind == "result":
                h, fresh = self._result(site, h, args[0], edits, names, fresh)
                continue
            if site.kind == "input":
                self._copy(site, h, edits, names)
                continue
            if site.kind == "from_input":
                h, fresh = self._from_input(site, h, fresh)
                continue
            if site.kind == "broadcast" and h.shape[0] != len(self._layout):
                h, fresh = h.expand(len(self._layout), *h.shape[1:]).clone(), True
            if edits and not fresh:
                h, fresh = h.clone(), True
            for b, edit in edits:
                self._edit(site, h, b, edit)
            for key in names:
                self._keep(key, self._value(site, h))
                if self._grad:  # resid_mid's gradient is attn_out's: the stream is their sum
                    self.graph.append((key, h, site.view if site.view is not None else _same))
        return h

    def _value(self, site: Site, h: Any) -> Any:
        if site.kind == "mid":
            return self._inputs[id(site.block)] + h
        return site.view(h) if site.view is not None else h

    def _edit(self, site: Site, h: Any, b: int, edit: Intervention, keys: int = 0) -> None:
        """``edit`` of row ``b`` written into ``h`` (the hooked tensor, or a point's view of it)."""
        import torch

        place = self._layout[b]
        columns, rows = edit_columns(edit, place)
        if not columns:
            return
        cols = torch.tensor(columns, device=h.device)
        value = self._value(site, h) if site.side != "attn" else h
        x = value[b].index_select(0, cols)
        if site.keyed and edit.vector is not None:
            edit = _over_keys(edit, x.shape[-1], *_key_span(place, keys, value.shape[1]))
        if edit.heads is not None:
            heads = torch.tensor(edit.heads, device=h.device)
            x = x.index_copy(1, heads, apply_edit(x.index_select(1, heads), edit, rows).to(x.dtype))
        else:
            x = apply_edit(x, edit, rows)
        if site.kind == "mid":
            h[b, cols] = (x - self._inputs[id(site.block)][b].index_select(0, cols)).to(h.dtype)
        else:
            value[b, cols] = x.to(value.dtype)
            if site.put is not None:  # the view was a copy
                site.put(h, value)

    def _keep(self, key: int | str, value: Any) -> None:
        self.kept[key] = take_columns(value.detach(), self.rows).to("cpu", copy=True)

    def _result(self, site: Site, h: Any, z: Any, edits: Any, names: Any, fresh: bool) -> tuple[Any, bool]:
        """Each head's z through its share of the output projection [B, T, heads, d_model], without the bias."""
        import torch

        o, heads = site.extra
        weight = w_o(o, heads)
        zz = z if edits else take_columns(z, self.rows)
        result = torch.einsum("bthd,hdm->bthm", zz.unflatten(-1, (heads, -1)).to(weight.dtype), weight)
        for b, edit in edits:
            self._edit(site, result, b, edit)
        for key in names:
            t = result.detach()
            self.kept[key] = (take_columns(t, self.rows) if edits else t).to("cpu", copy=True)
        if not edits:
            if self._grad:  # the projection's output is the sum of the results: each head's gradient is its own
                for key in names:
                    self.graph.append((key, h, lambda g: g.unsqueeze(-2).expand(*g.shape[:-1], heads, g.shape[-1])))
            return h, fresh
        out = result.sum(-2)
        if getattr(o, "bias", None) is not None:
            out = out + o.bias
        return out.to(h.dtype), True

    def _copy(self, site: Site, x: Any, edits: Any, names: Any) -> None:
        """A per-head copy of the stream ``x`` attention reads (from hook_attn_in's edited copy where there is one),
        edited; kept for the projections it feeds and recorded. ``x`` itself goes on unchanged."""
        count = site.shape[0]
        source = self._copies.get(site.extra[1]) if site.extra[1] else None
        if edits:
            copy = source[0].clone() if source else x.unsqueeze(-2).expand(*x.shape[:-1], count, x.shape[-1]).clone()
            touched: set[int] | None = set() if source is None or source[2] is not None else None
            for b, edit in edits:
                self._edit(site, copy, b, edit)
                if touched is not None:
                    touched = None if edit.heads is None else touched | set(edit.heads)
            if source is not None and touched is not None:
                touched |= source[2] or set()
            rows = sorted({b for b, _ in edits} | set(source[1] if source else ()))
            alike = all(edit.heads is None for _, edit in edits) and (source is None or source[3])
            self._copies[site.name] = (copy, rows, touched, alike)
        value = self._copies[site.name][0] if site.name in self._copies else (source[0] if source else None)
        if value is None:
            value = x.unsqueeze(-2).expand(*x.shape[:-1], count, x.shape[-1])
        for key in names:
            self._keep(key, value)

    def _from_input(self, site: Site, h: Any, fresh: bool) -> tuple[Any, bool]:
        """A projection's output ``h`` with each head an edited copy touched recomputed from that copy, through the
        norm before attention and the projection (their ``forward``, so that no hook of this pass fires again)."""
        norm, feeds = site.extra
        found = next((self._copies[name] for name in feeds if name in self._copies), None)
        if found is None:
            return h, fresh
        copy, rows, touched, alike = found
        if not fresh:
            h, fresh = h.clone(), True
        out = site.view(h) if site.view is not None else h
        module = site.module
        select = rows if len(rows) < copy.shape[0] else slice(None)

        def project(x: Any) -> Any:
            y = module.forward(norm.forward(x) if norm is not None else x)
            return site.view(y) if site.view is not None else y

        if alike:
            new = project(copy[select, :, 0])  # every head's copy is the same: one projection for all
            out[select] = new.to(out.dtype)
        else:
            for head in sorted(touched) if touched is not None else range(copy.shape[2]):
                out[select, :, head] = project(copy[select, :, head])[:, :, head].to(out.dtype)
        if site.put is not None:  # the view was a copy
            site.put(h, out)
        return h, fresh

    def _scale(self, site: Site, x: Any, edits: Any, names: Any) -> None:
        s = norm_scale(site.module, site.extra, x)
        if edits:
            new = s.clone()
            for b, edit in edits:
                self._edit(site, new, b, edit)
            assert site.reader is not None
            self._ratio[site.reader.hook] = (site.module, s / new)
            s = new
        for key in names:
            self._keep(key, s)

    # -- inside the attention function (attention.py) ----------------------------------------------------------------

    def inside(self, sites: list[Site], kind: str, t: Any, queries: int = 0, visible: Any = None) -> Any:
        """The points of ``kind`` at one attention call: ``t`` is q [B, heads, T, d_head], k [B, kv, keys, d_head]
        (its last ``queries`` columns are this pass's tokens: edited in place, so that the cache keeps the edit),
        scores or pattern [B, heads, T, keys]; ``visible``: which keys each query sees (an edit of the scores never
        unmasks one). The tensor the attention goes on with."""
        fresh = kind == "rot_k"
        for site in sites:
            if site.kind != kind:
                continue
            edits, names = self._edits.get(id(site), ()), self._names.get(id(site), ())
            if edits and not fresh:
                t, fresh = t.clone(), True
            value = (t[:, :, t.shape[2] - queries :] if kind == "rot_k" else t).transpose(1, 2)  # [B, T, heads, ..]
            for b, edit in edits:
                self._edit(site, value, b, edit, keys=t.shape[-1])
            if edits and visible is not None:
                t = t.masked_fill(~visible, MASKED)
                value = t.transpose(1, 2)
            for key in names:
                self._keep(key, value)
                if self._grad:
                    cut = t.shape[2] - queries if kind == "rot_k" else 0
                    self.graph.append((key, t, lambda g, cut=cut: g[:, :, cut:].transpose(1, 2)))
        return t

    def gradients(self, metric: Any) -> dict[int | str, Any]:
        """d ``metric`` / d each recorded point, [B, kept, *shape] on CPU, by ``torch.autograd.grad`` (the graph is
        freed with it, and the parameters, frozen, gather nothing)."""
        import torch

        graph, self.graph = self.graph, []
        live = [(key, t, view) for key, t, view in graph if t.requires_grad]
        found = torch.autograd.grad(metric, [t for _, t, _ in live], allow_unused=True) if live else []
        out: dict[int | str, Any] = {}
        for (key, t, view), g in zip(live, found, strict=True):
            g = view(torch.zeros_like(t) if g is None else g)
            out[key] = take_columns(g, self.rows).detach().to("cpu", copy=True)
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for core in self._cores:
            core.__dict__.pop("_loom_sites", None)
        self._cores.clear()

    def _rescaled(self, module: Any, side: str, h: Any) -> Any:
        """``h``, a norm's output read at this hook, as the norm gives it for an edited scale."""
        found = self._ratio.pop((id(module), side), None)
        return h if found is None else _rescaled(found[0], h, found[1])


def _same(t: Any) -> Any:
    return t


def _rescaled(norm: Any, y: Any, ratio: Any) -> Any:
    """A norm's output for its input divided by an edited scale: (y - bias) * old / new + bias; ``y`` itself where
    the ratio is 1 (the rows and positions the edit leaves), which (y - bias) + bias would round."""
    import torch

    bias = getattr(norm, "bias", None)
    if bias is None:
        new = y.float() * ratio
    else:
        new = (y.float() - bias.float()) * ratio + bias.float()
    return torch.where(ratio == 1, y, new.to(y.dtype))


# The epsilon of norms that hold none, fixed in their forward (OLMo's LayerNorm without parameters calls
# F.layer_norm with eps=1e-5); the self-check at load holds the scale to the norm's output, so a change shows.
FIXED_EPS = {"OlmoLayerNorm": 1e-5}


def norm_eps(norm: Any) -> float:
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, float | int):
            return float(value)
    if type(norm).__name__ in FIXED_EPS:
        return FIXED_EPS[type(norm).__name__]
    raise ValueError(f"{type(norm).__name__} names no epsilon")


def norm_scale(norm: Any, kind: str, x: Any) -> Any:
    """A norm's scale for input ``x`` [.., D]: sqrt(variance + eps) [.., 1] in float32, centred for a LayerNorm."""
    x = x.float()
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + norm_eps(norm)).sqrt()


def _key_span(place: Layout, keys: int, width: int) -> tuple[int, int]:
    """The key columns of a row in an attention call with ``keys`` columns and ``width`` query columns: its queries
    end at ``col + count``, and its keys are its ``tok + count`` tokens so far."""
    end = place.col + place.count + keys - width
    return end - (place.tok + place.count), end


def _over_keys(edit: Intervention, keys: int, start: int, end: int) -> Intervention:
    """``edit`` with its vector over the row's keys placed in the call's key columns (zeros elsewhere: masked)."""
    import torch

    v = edit.vector
    full = torch.zeros((*v.shape[:-1], keys), dtype=v.dtype)
    full[..., start:end] = v[..., : end - start]
    return attrs.evolve(edit, vector=full)


def logit_scale(model: LoadedModel) -> float:
    """What the causal LM multiplies its head's logits by (Cohere's ``logit_scale``), else 1."""
    arch = arch_of(model.model.config)
    scale = getattr(model.model, arch.logit_scale, None) if arch is not None and arch.logit_scale else None
    return float(scale) if isinstance(scale, float | int) else 1.0


def unembed(model: LoadedModel, states: Any, normalized: bool) -> Any:
    """``LoadedModel.unembed``: the model's own final norm (unless ``normalized``), OPT's project_out (on a state of
    the stream's width: index N, of the embedding width, is its output already), LM head, logit scale (Cohere) and
    final logit soft-capping (Gemma 2) applied to CPU states [P, H]; float32 CPU logits [P, V]."""
    import torch

    net = model.model
    final = site_map(model).get("ln_final.hook_normalized")
    arch = arch_of(net.config)
    project = part(net.base_model, arch.project_out) if arch is not None else None
    head = net.get_output_embeddings()
    # Each module's own ``forward``, not its call: a stream's lens runs on the output processor's thread while the
    # model's thread runs the next pass, whose hooks (its captures, its edits of the final norm's output, its rows'
    # layout) are on these modules and would edit or record the lens's states, or refuse them for other rows.
    with torch.inference_mode():
        x = states.to(head.weight.device, net.dtype)  # the model's compute dtype (a quantized head's weight is not)
        if not normalized and isinstance(final, Site):
            x = final.module.forward(x)
        if project is not None and x.shape[-1] == model.hidden_size:
            x = project.forward(x)
        logits = head.forward(x) * logit_scale(model)
        cap = getattr(net.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits.float().cpu()
