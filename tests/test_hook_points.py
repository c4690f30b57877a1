"""TransformerLens's hook-point vocabulary and semantics over HTTP, against the same edits done in-process.

The reference edits the transformers modules with torch hooks (``test_architectures.reference_points`` names each
point's module and view), and the points inside attention with an attention function written here from transformers' own
``eager_attention_forward``, registered with transformers for the reference run (GPT-Neo's, which computes its own: its
``_attn`` written here from transformers' ``GPTNeoSelfAttention._attn``, put on its modules for the run). Rotary points
are checked against the model's own ``apply_rotary_pos_emb``. Then TransformerLens's rules: a state is what its point
saw when it fired, edits at different points apply in forward order, and per-head patching equals a loop of patched
runs.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest
import torch
from test_architectures import (
    FAMILIES,
    VARIANTS,
    build,
    close,
    eps_of,
    grouped,
    heads,
    hooked_run,
    load,
    not_offered,
    record,
    reference_points,
)
from test_batching import arrays
from test_interventions import reference_apply
from test_models import app_with, concurrent_client
from test_patching import assert_normalized

ARCHS = ("gpt2", "llama", "gpt_neox", "gemma2", "falcon_sequential", "gpt_neo", "opt", "opt_post_ln", "bloom")
# Llama's block with one thing of its own each (OLMo's clamped q/k/v and LayerNorm without parameters, post-norm and
# sliding windows, experts, NoPE blocks, sandwich norms and a fused gate): the edits of ``SHORT`` that each one's
# blocks have (the survey in test_architectures.py checks all their points), so that each costs a second or two.
SHORT = (
    "blocks.0.attn.hook_rot_k",  # block 0 rotates in each (SmolLM3's and EXAONE 4's block 1 is NoPE)
    "blocks.0.attn.hook_pattern",
    "blocks.1.mlp.hook_post",  # absent in a sparse block (OLMoE's)
    "blocks.1.ln1.hook_scale",  # absent where nothing norms a sublayer's input (OLMo 3, EXAONE 4)
)
OWN = {"gpt_neo": "_attn", "bloom": "forward"}  # the attention code of the model's own the reference replaces
TEXT = "the cat sat on the mat and looked at the"
REF = "loom_test_reference"


@pytest.fixture(scope="module")
def built(tiny_root: Any) -> Any:
    return lambda arch: build(arch, tiny_root)


# -- the reference: edits as torch hooks, and an eager attention with edits inside ---------------------------------


def picked(item: dict[str, Any], tokens: list[int], prompt: int) -> tuple[list[int], list[int] | None]:
    """The call's columns ``item`` edits, and the vector row of each (None: one vector for all)."""
    pos = item.get("positions", "all")
    if pos == "all":
        return list(range(len(tokens))), None
    if pos in ("prompt", "generated"):
        keep = [j for j, t in enumerate(tokens) if (t < prompt) == (pos == "prompt")]
        return keep, None
    wanted = [p if p >= 0 else prompt + p for p in pos]
    cols = [j for j, t in enumerate(tokens) if t in wanted]
    vector = item.get("vector")
    rows = [wanted.index(tokens[j]) for j in cols] if vector is not None and np.ndim(vector) == 2 else None
    return cols, rows


def edit_view(view: torch.Tensor, item: dict[str, Any], tokens: list[int], prompt: int) -> None:
    """``item`` written into ``view`` [1, T, ...] (batch of one row, this call's tokens)."""
    cols, rows = picked(item, tokens, prompt)
    if not cols:
        return
    x = view[0, cols]
    if "heads" in item:
        x[:, item["heads"]] = reference_apply(x[:, item["heads"]].float(), item, rows).to(x.dtype)
    else:
        x = reference_apply(x.float(), item, rows).to(x.dtype)
    view[0, cols] = x


class Counter:
    def __init__(self) -> None:
        self.seen = 0

    def take(self, count: int) -> list[int]:
        self.seen += count
        return list(range(self.seen - count, self.seen))


def reference_attention(
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
    """transformers' eager attention (``eager_attention_forward``), with the test's edits at rot_q, rot_k, scores
    (masked keys stay masked) and pattern, and a record of each."""
    ref = getattr(module, "_reference", None)
    tokens = ref["counter"].take(query.shape[2]) if ref else []
    if ref:
        for kind, item in ref["edits"]:
            if kind == "rot_q":
                query = query.clone()
                edit_view(query.transpose(1, 2), item, tokens, ref["prompt"])
            elif kind == "rot_k":  # in place: the cache keeps the edited keys
                edit_view(key[:, :, key.shape[2] - len(tokens) :].transpose(1, 2), item, tokens, ref["prompt"])
    groups = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query.float(), keys.float().transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    masked = None
    if attention_mask is not None:
        masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        scores = (scores + attention_mask).masked_fill(masked, torch.finfo(torch.float32).min)
    pattern = edited_inside(ref, tokens, query, key, scores, masked, kwargs.get("s_aux"))
    out = torch.matmul(pattern.to(values.dtype), values)
    return out.transpose(1, 2).contiguous(), pattern


def reference_neo_attn(module: Any, query: Any, key: Any, value: Any, attention_mask: Any = None) -> tuple[Any, Any]:
    """transformers' ``GPTNeoSelfAttention._attn`` (unscaled float32 scores, its causal or local-window mask
    ``module.bias`` filled with float32's min, plus the attention mask), with the test's edits at scores (masked keys
    stay masked, at float32's min) and pattern, and a record of each."""
    ref = getattr(module, "_reference", None)
    tokens = ref["counter"].take(query.shape[2]) if ref else []
    scores = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(-1, -2))
    query_length, key_length = query.size(-2), key.size(-2)
    causal = module.bias[:, :, key_length - query_length : key_length, :key_length]
    low = torch.finfo(torch.float32).min
    scores = torch.where(causal, scores, torch.tensor(low, dtype=scores.dtype, device=scores.device))
    masked = ~causal
    if attention_mask is not None:
        scores = scores + attention_mask
        masked = masked | (attention_mask <= torch.finfo(attention_mask.dtype).min / 2)
    scores = scores.masked_fill(masked, low)  # GPT-Neo's sum of the two masks may hold -inf: one masked value
    pattern = edited_inside(ref, tokens, query, key, scores, masked)
    pattern = module.attn_dropout(pattern.to(value.dtype))
    return torch.matmul(pattern, value), pattern


def reference_bloom_forward(
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
    """transformers' ``BloomAttention.forward`` (its ALiBi bias added to q.k^T / sqrt(d_head) by ``baddbmm``, the
    causal mask added), with the test's edits at scores (masked keys stay masked, at float32's min) and pattern, and a
    record of each."""
    ref = getattr(module, "_reference", None)
    batch, queries, _ = hidden_states.shape
    tokens = ref["counter"].take(queries) if ref else []
    heads, d_head = module.num_heads, module.head_dim
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    scores = alibi.baddbmm(
        batch1=query.reshape(batch * heads, -1, d_head),
        batch2=key.reshape(batch * heads, -1, d_head).transpose(-1, -2),
        beta=module.beta,
        alpha=module.inv_norm_factor,
    ).view(batch, heads, queries, -1)
    masked = None
    if attention_mask is not None:
        masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        scores = (scores + attention_mask).masked_fill(masked, torch.finfo(torch.float32).min)
    pattern = module.attention_dropout(edited_inside(ref, tokens, query, key, scores, masked).to(query.dtype))
    context = torch.bmm(pattern.view(batch * heads, queries, -1), value.reshape(batch * heads, -1, d_head))
    output = module.dense(module._merge_heads(context))
    return residual + torch.nn.functional.dropout(output, module.hidden_dropout, module.training), pattern


def edited_inside(
    ref: Any, tokens: list[int], query: Any, key: Any, scores: Any, masked: Any, sinks: Any = None
) -> Any:
    """The pattern of ``scores`` with the test's edits at the scores and the pattern, each kind recorded; with
    ``sinks`` (GPT-OSS's eager attention), the softmax over the scores and each head's sink logit, the sink's column
    dropped."""
    for kind, item in ref["edits"] if ref else ():
        if kind == "scores":
            scores = scores.clone()
            edit_view(scores.transpose(1, 2), item, tokens, ref["prompt"])
            if masked is not None:
                scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
    if sinks is None:
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32)
    else:
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).float()
        pattern = torch.softmax(torch.cat([scores.float(), sink], -1), dim=-1)[..., :-1]
    for kind, item in ref["edits"] if ref else ():
        if kind == "pattern":
            pattern = pattern.clone()
            edit_view(pattern.transpose(1, 2), item, tokens, ref["prompt"])
    if ref:
        ref["kept"].update({"rot_q": query.transpose(1, 2)[0], "rot_k": key[:, :, -len(tokens) :].transpose(1, 2)[0]})
        ref["kept"].update({"scores": scores.transpose(1, 2)[0], "pattern": pattern.transpose(1, 2)[0]})
    return pattern


def register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REF, reference_attention)
    AttentionMaskInterface.register(REF, eager_mask)


class Reference:
    """The edits of one request as torch hooks (and attention edits) on ``net``; ``kept`` the edited site's value."""

    def __init__(self, net: Any, arch: str, items: list[dict[str, Any]], prompt: int) -> None:
        self.net, self.kept, self.handles, self.cores = net, {}, [], []
        self.own = OWN.get(VARIANTS.get(arch, (arch, {}))[0])  # its attention is its modules' own code
        self.counters: list[Counter] = []
        points, layers, _, final = reference_points(net, arch)
        h = heads_of(net)
        for item in items:
            site, counter = item["site"], Counter()
            self.counters.append(counter)
            name = site.split(".")[-1]
            if name in ("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern"):
                block = int(site.split(".")[1])
                core = attention_core(layers[block], arch)
                kind = {"hook_rot_q": "rot_q", "hook_rot_k": "rot_k", "hook_attn_scores": "scores"}.get(name, "pattern")
                ref = core.__dict__.setdefault("_reference", {"counter": counter, "edits": [], "prompt": prompt})
                ref["edits"].append((kind, item))
                ref["kept"] = self.kept.setdefault(site, {})
                self.cores.append(core)
            elif name == "hook_result":
                o = points[site.replace("hook_result", "hook_z")][0]
                self.handles.append(o.register_forward_hook(self._result(o, item, counter, prompt, h)))
            elif name == "hook_scale":  # the norm whose output the reference names hook_normalized
                norm = final if site.startswith("ln_final") else points[site.replace("scale", "normalized")][0]
                self._scale(norm, item, counter, prompt)
            else:
                module, side, view = points[site]
                self.handles += self._module(module, side, view or (lambda t: t), item, counter, prompt)

    def _module(self, module: Any, side: str, view: Any, item: Any, counter: Counter, prompt: int) -> list[Any]:
        def edit(t: torch.Tensor) -> torch.Tensor:
            flat = t.dim() == 2  # OPT's MLP side: the batch of one flattened to [T, D]
            t = t.unsqueeze(0) if flat else t
            if t.shape[0] != 1:  # a learned position embedding of [1, T, D]: already one row
                raise AssertionError(t.shape)
            t = t.clone()
            edit_view(view(t), item, counter.take(t.shape[1]), prompt)
            self.kept[item["site"]] = view(t)[0].detach().clone()
            return t[0] if flat else t

        if side == "in":
            return [
                module.register_forward_pre_hook(
                    lambda m, a, kw: (
                        ((edit(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": edit(kw["hidden_states"])})
                    ),
                    with_kwargs=True,
                )
            ]
        return [module.register_forward_hook(lambda m, a, o: (edit(o[0]), *o[1:]) if isinstance(o, tuple) else edit(o))]

    def _result(self, o: Any, item: Any, counter: Counter, prompt: int, h: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> Any:
            z = heads(args[0], h)
            w = o.weight
            w_o = w.reshape(h, -1, w.shape[1]) if type(o).__name__ == "Conv1D" else w.T.reshape(h, -1, w.shape[0])
            result = torch.einsum("bthd,hdm->bthm", z, w_o)
            edit_view(result, item, counter.take(z.shape[1]), prompt)
            self.kept[item["site"]] = result[0].detach().clone()
            return result.sum(2) + (o.bias if o.bias is not None else 0)

        return hook

    def _scale(self, norm: Any, item: Any, counter: Counter, prompt: int) -> None:
        """A norm's output for its input divided by an edited sqrt(variance + eps): (y - b) * s / s' + b."""
        inputs: dict[str, torch.Tensor] = {}
        self.handles.append(norm.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0])))

        def hook(module: Any, args: Any, y: torch.Tensor) -> torch.Tensor:
            x = inputs["x"].float()
            x = x.unsqueeze(0) if x.dim() == 2 else x  # OPT's MLP side: the batch of one flattened to [T, D]
            centred = x - x.mean(-1, keepdim=True) if "layernorm" in type(norm).__name__.lower() else x
            s = (centred.pow(2).mean(-1, keepdim=True) + eps_of(norm)).sqrt()
            new = s.clone()
            edit_view(new, item, counter.take(x.shape[1]), prompt)
            self.kept[item["site"]] = new[0].clone()
            b = norm.bias.float() if getattr(norm, "bias", None) is not None else 0
            return ((y.float() - b) * (s / new).reshape(*y.shape[:-1], 1) + b).to(y.dtype)

        self.handles.append(norm.register_forward_hook(hook))

    def run(self, fn: Any) -> Any:
        current = self.net.config._attn_implementation
        if self.cores and self.own:
            reference = reference_neo_attn if self.own == "_attn" else reference_bloom_forward
            for core in self.cores:
                setattr(core, self.own, lambda *a, core=core, reference=reference, **kw: reference(core, *a, **kw))
        elif self.cores:
            register_reference()
            self.net.set_attn_implementation(REF)
        try:
            with torch.inference_mode():
                return fn()
        finally:
            if self.cores and self.own:
                for core in self.cores:
                    core.__dict__.pop(self.own, None)
            elif self.cores:
                self.net.set_attn_implementation(current)
            for counter in self.counters:  # the next run counts its tokens from the first again
                counter.seen = 0
            for core in self.cores:
                core._reference["counter"].seen = 0

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for core in self.cores:
            core.__dict__.pop("_reference", None)


def heads_of(net: Any) -> int:
    return int(getattr(net.config, "num_attention_heads", 0) or net.config.n_head)


def attention_core(layer: Any, arch: str) -> Any:
    cores = {
        "gpt2": lambda: layer.attn,
        "gpt_neo": lambda: layer.attn.attention,
        "gpt_neox": lambda: layer.attention,
        "falcon": lambda: layer.self_attention,
        "bloom": lambda: layer.self_attention,
    }
    return cores.get(VARIANTS.get(arch, (arch, {}))[0], lambda: layer.self_attn)()


# -- the new points' values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma2", "smollm3"])
async def test_rotary_points_are_the_models_own_rotary_embedding_of_hook_q_and_hook_k(built, arch):
    """SmolLM3: in the blocks that rotate; its NoPE block offers none (the survey checks that)."""
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    points, layers, _, _ = reference_points(net, arch)
    rotating = [i for i in range(len(layers)) if f"blocks.{i}.attn.hook_rot_q" not in not_offered(net, arch)]
    rotary = importlib.import_module(type(net).__module__).apply_rotary_pos_emb
    store, handles = record({k: v for k, v in points.items() if k.endswith(("hook_q", "hook_k"))})
    cos_sin: dict[int, Any] = {}
    for i, layer in enumerate(layers):
        core = attention_core(layer, arch)
        handles.append(
            core.register_forward_pre_hook(
                lambda m, a, kw, i=i: cos_sin.update({i: kw["position_embeddings"]}), with_kwargs=True
            )
        )
    with torch.inference_mode():
        net(**enc)
    for handle in handles:
        handle.remove()
    async with concurrent_client(app_with()) as c:
        names = [f"blocks.{i}.attn.hook_rot_{x}" for i in rotating for x in "qk"]
        r = await c.post(
            "/extract", json={"model": path, "text": TEXT, "hidden_state_layers": names, "positions": "all"}
        )
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
    assert len(rotating) == len(layers) - (arch == "smollm3")
    for i in rotating:
        q, k = (store[f"blocks.{i}.attn.hook_{x}"].transpose(0, 1)[None] for x in "qk")  # [1, heads, T, d_head]
        rot_q, rot_k = rotary(q, k, *cos_sin[i])
        close(got[f"blocks.{i}.attn.hook_rot_q"], rot_q[0].transpose(0, 1), f"{i} rot_q")
        close(got[f"blocks.{i}.attn.hook_rot_k"], rot_k[0].transpose(0, 1), f"{i} rot_k")


async def test_grouped_falcon_rotary_keys_have_its_key_value_heads(built):
    """Falcon's new_decoder_architecture fuses each group of query heads with its one key and value head: hook_rot_k
    has the config's num_kv_heads heads, and the rotary points and the pattern are the model's own (the grouped split
    as its attention module does it, its ``apply_rotary_pos_emb``, eager ``output_attentions``)."""
    path = built("falcon_grouped")
    net, tok = load(path, "falcon_grouped")
    enc = tok(TEXT, return_tensors="pt")
    kv, d_head = net.config.num_kv_heads, net.config.hidden_size // net.config.num_attention_heads
    rotary = importlib.import_module(type(net).__module__).apply_rotary_pos_emb
    fused: dict[int, Any] = {}
    cos_sin: dict[int, Any] = {}
    handles = []
    for i, layer in enumerate(net.transformer.h):
        attn = layer.self_attention
        handles.append(attn.query_key_value.register_forward_hook(lambda m, a, o, i=i: fused.update({i: o})))
        handles.append(
            attn.register_forward_pre_hook(
                lambda m, a, kw, i=i: cos_sin.update({i: kw["position_embeddings"]}), with_kwargs=True
            )
        )
    net.set_attn_implementation("eager")
    with torch.inference_mode():
        patterns = net(**enc, output_attentions=True).attentions
    for handle in handles:
        handle.remove()
    n = len(net.transformer.h)
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        listing = (await c.get(f"/models/{path}/sites")).json()
        assert listing["sites"]["blocks.0.attn.hook_rot_k"] == [kv, d_head], listing["sites"]
        names = [f"blocks.{i}.attn.{x}" for i in range(n) for x in ("hook_rot_q", "hook_rot_k", "hook_pattern")]
        r = await c.post(
            "/extract", json={"model": path, "text": TEXT, "hidden_state_layers": names, "positions": "all"}
        )
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
    for i in range(n):
        groups = fused[i].unflatten(-1, (kv, -1, d_head))  # [1, T, kv, heads per kv + 2, d_head]
        q = groups[..., :-2, :].flatten(-3, -2).transpose(1, 2)  # [1, heads, T, d_head]
        rot_q, rot_k = rotary(q, groups[..., -2, :].transpose(1, 2), *cos_sin[i])
        close(got[f"blocks.{i}.attn.hook_rot_q"], rot_q[0].transpose(0, 1), f"{i} rot_q")
        close(got[f"blocks.{i}.attn.hook_rot_k"], rot_k[0].transpose(0, 1), f"{i} rot_k")
        close(got[f"blocks.{i}.attn.hook_pattern"], patterns[i][0].transpose(0, 1), f"{i} pattern")


async def test_edits_at_grouped_falcons_q_k_v_and_their_inputs_are_edits_of_its_own_grouped_projection(built):
    """Falcon-40B's query_key_value is [kv, heads per kv + 2, d_head] (each group's query heads, then its key and
    value): query head 3 is group 1's second. An edit at hook_q, hook_k or hook_v is a torch hook writing the same
    numbers into that slice of the projection's output; one at hook_q_input / hook_k_input is a hook putting in that
    slice what ln_attn and query_key_value give for the edited block input. The last layer within 1e-5 and greedy
    tokens alone; in a batch with a shorter, left-padded row, each row's tokens as alone."""
    path = built("falcon_grouped")
    net, tok = load(path, "falcon_grouped")
    enc = tok(TEXT, return_tensors="pt")
    prompt, cfg = enc["input_ids"].shape[1], net.config
    h, kv, n = cfg.num_attention_heads, cfg.num_kv_heads, cfg.num_hidden_layers
    per, d, d_head = h // kv, cfg.hidden_size, cfg.hidden_size // h
    gen = torch.Generator().manual_seed(5)
    v_head, v_stream = torch.randn(d_head, generator=gen), torch.randn(d, generator=gen)
    # (the edit, its block, the (group, slot) of the projection's output it writes, what it writes there from what
    # is there: "input" recomputes it from the edited block input)
    cases: list[tuple[dict[str, Any], int, tuple[int, int], Any]] = [
        (
            {"site": "blocks.1.attn.hook_q", "op": "add", "vector": v_head.tolist(), "heads": [3], "scale": 2.0},
            1,
            (1, 1),
            lambda s: s + 2.0 * v_head,
        ),
        (
            {"site": "blocks.0.attn.hook_k", "op": "set", "vector": v_head.tolist(), "heads": [1]},
            0,
            (1, per),
            lambda s: v_head.expand_as(s),
        ),
        ({"site": "blocks.2.attn.hook_v", "op": "zero", "heads": [0]}, 2, (0, per + 1), lambda s: s * 0),
        ({"site": "blocks.1.hook_q_input", "op": "add", "vector": v_stream.tolist(), "heads": [2]}, 1, (1, 0), "input"),
        (
            {"site": "blocks.2.hook_k_input", "op": "add", "vector": v_stream.tolist(), "heads": [0]},
            2,
            (0, per),
            "input",
        ),
    ]
    failures = []
    stream: dict[str, torch.Tensor] = {}  # the edited block's input, kept by a pre-hook for the input edits

    def keep(m: Any, a: tuple, kw: dict) -> None:
        stream["x"] = a[0] if a else kw["hidden_states"]

    with torch.inference_mode():
        plain = net(**enc, output_hidden_states=True).hidden_states[n]
    async with concurrent_client(app_with()) as c:
        for item, i, (group, slot), how in cases:
            layer = net.transformer.h[i]
            qkv = layer.self_attention.query_key_value

            def write(m: Any, a: Any, o: torch.Tensor, group=group, slot=slot, how=how, layer=layer) -> torch.Tensor:
                o = o.clone()
                at = grouped(o, kv, h)[..., group, slot, :]
                if how == "input":  # the head's q or k from the edited block input, as the block computes it
                    y = m.forward(layer.ln_attn(stream["x"] + v_stream))
                    at[...] = grouped(y, kv, h)[..., group, slot, :]
                else:
                    at[...] = how(at)
                return o

            handles = [layer.register_forward_pre_hook(keep, with_kwargs=True), qkv.register_forward_hook(write)]
            out, want = hooked_run(net, tok, enc, handles)
            assert not torch.allclose(out.hidden_states[n], plain, atol=1e-3), item  # the edit shows
            body = {"model": path, "interventions": [item]}
            r = await c.post("/extract", json={**body, "text": TEXT, "hidden_state_layers": [n], "positions": "all"})
            assert r.status_code == 200, (item, r.text)
            if not np.allclose(arrays(r.json(), "sequence_hidden_states")[str(n)], out.hidden_states[n][0], atol=1e-5):
                failures.append((item["site"], "states"))
            ask = {"max_tokens": 8, "temperature": 0}
            g = await c.post("/generate", json={**body, **ask, "prompt": TEXT})
            assert g.status_code == 200, (item, g.text)
            if g.json()["token_ids"] != want[0, prompt:].tolist():
                failures.append((item["site"], "tokens"))
            # A shorter row left-padded beside it in one batch: each row what it gets alone.
            short = await c.post("/generate", json={**body, **ask, "prompt": "hello"})
            batch = await c.post("/generate/batch", json={**body, **ask, "prompts": [TEXT, "hello"]})
            assert batch.status_code == 200, (item, batch.text)
            if [row["token_ids"] for row in batch.json()["results"]] != [
                want[0, prompt:].tolist(),
                short.json()["token_ids"],
            ]:
                failures.append((item["site"], "tokens in a batch"))
    assert not failures, failures


def cases(arch: str, n: int, d: int, d_head: int, d_mlp: int) -> list[dict[str, Any]]:
    """An edit at each kind of new point."""
    gen = torch.Generator().manual_seed(3)

    def vec(*shape: int) -> list:
        return torch.randn(*shape, generator=gen).tolist()

    def neuron(j: int, value: float = 1.0) -> list[float]:
        return [value if i == j else 0.0 for i in range(d_mlp)]

    out = [
        {"site": "hook_embed", "op": "add", "vector": vec(d), "positions": [1, -1]},
        {"site": "blocks.1.ln1.hook_normalized", "op": "ablate", "vector": vec(2, d)},
        {"site": "blocks.0.ln2.hook_normalized", "op": "scale", "scale": 1.5},
        {"site": "blocks.1.attn.hook_q", "op": "add", "vector": vec(d_head), "heads": [1], "scale": 2.0},
        {"site": "blocks.0.attn.hook_k", "op": "set", "vector": vec(2, d_head), "positions": [1, -1]},
        {"site": "blocks.2.attn.hook_v", "op": "zero", "heads": [0]},
        {"site": "blocks.1.attn.hook_attn_scores", "op": "scale", "scale": 0.25, "heads": [1], "positions": [3, -1]},
        {"site": "blocks.0.attn.hook_attn_scores", "op": "zero", "heads": [0, 2], "positions": "generated"},
        {"site": "blocks.0.attn.hook_pattern", "op": "zero", "heads": [2]},
        {"site": "blocks.2.attn.hook_pattern", "op": "scale", "scale": 2.0, "positions": "generated"},
        {"site": "blocks.1.attn.hook_result", "op": "zero", "heads": [0]},
        {"site": "blocks.0.attn.hook_result", "op": "add", "vector": vec(d), "heads": [3], "positions": [2]},
        {"site": "blocks.1.mlp.hook_pre", "op": "scale", "scale": 0.5},
        {"site": "blocks.2.mlp.hook_post", "op": "ablate", "vector": neuron(5)},  # neuron 5 zeroed
        {"site": "blocks.1.mlp.hook_post", "op": "add", "vector": neuron(7), "scale": 4.0, "positions": "all"},
        {"site": "ln_final.hook_scale", "op": "scale", "scale": 2.0, "positions": "prompt"},
        {"site": "blocks.1.ln1.hook_scale", "op": "scale", "scale": 0.5, "positions": [2, -1]},
        {"site": "blocks.2.ln2.hook_scale", "op": "add", "vector": [abs(v) + 0.5 for v in vec(1)]},
    ]
    if arch == "opt_post_ln":  # no final norm: index N is the last block's output through project_out
        out = [item for item in out if not item["site"].startswith("ln_final")]
        out.append({"site": "blocks.2.hook_resid_post", "op": "add", "vector": vec(d), "positions": [1, -1]})
        out.append({"site": "blocks.1.hook_resid_mid", "op": "scale", "scale": 0.5})
    if arch in ("gpt2", "gpt_neo", "opt", "opt_post_ln"):  # learned positions, no rotary
        out.append({"site": "hook_pos_embed", "op": "scale", "scale": 0.0, "positions": "prompt"})
    elif arch == "bloom":  # ALiBi: neither
        out.append({"site": "blocks.1.hook_resid_mid", "op": "add", "vector": vec(d), "positions": "generated"})
    else:
        out.append({"site": "blocks.1.attn.hook_rot_q", "op": "scale", "scale": 3.0, "heads": [0, 2]})
        out.append({"site": "blocks.0.attn.hook_rot_k", "op": "add", "vector": vec(d_head), "positions": [2]})
    if arch in ("llama", "gemma2"):
        out.append({"site": "blocks.0.mlp.hook_pre_linear", "op": "add", "vector": vec(d_mlp), "scale": 0.5})
    return out


def own_edits(arch: str, cfg: Any) -> list[dict[str, Any]]:
    """Edits at what a family has of its own, beyond ``SHORT``: Llama 4's experts (its feed_forward returns the
    stream flattened to [B * T, d] beside its router logits) and its NoPE block's q_proj, whose output attention
    reads only after a per-position temperature scales it; Cohere 2's NoPE global block's keys and its parallel
    MLP's output; the output of GLM-4.5's, ERNIE 4.5's and DeepSeek's
    experts with their shared experts; DeepSeek's latent attention, its q per head (q_b_proj's
    output, or V2-Lite's q_proj's) of qk_nope_head_dim + qk_rope_head_dim, the rotated q attention reads, and z per
    head of v_head_dim."""
    gen = torch.Generator().manual_seed(4)

    def vec(n: int) -> list[float]:
        return torch.randn(n, generator=gen).tolist()

    if arch == "llama4_text":
        return [
            {"site": "blocks.1.hook_mlp_out", "op": "add", "vector": vec(cfg.hidden_size)},
            {"site": "blocks.1.attn.hook_q", "op": "add", "vector": vec(cfg.head_dim)},
        ]
    # Block 1's experts plus shared experts: what they add together.
    moe = [{"site": "blocks.1.hook_mlp_out", "op": "add", "vector": vec(cfg.hidden_size), "positions": [2, -1]}]
    if arch in ("glm4_moe", "ernie4_5_moe"):
        return moe
    if arch == "cohere2":  # its global block 1 is NoPE: k_proj's output is the key its scores read
        return [
            {"site": "blocks.1.attn.hook_k", "op": "add", "vector": vec(cfg.head_dim), "heads": [1], "scale": 3.0},
            {"site": "blocks.1.hook_mlp_out", "op": "scale", "scale": 0.5, "positions": "generated"},
        ]
    if arch in ("deepseek_v3", "deepseek_v2"):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        return [
            *moe,
            {"site": "blocks.1.attn.hook_q", "op": "add", "vector": vec(qk), "heads": [1], "scale": 2.0},
            {"site": "blocks.0.attn.hook_rot_q", "op": "set", "vector": vec(qk), "heads": [2], "positions": [2]},
            {"site": "blocks.1.attn.hook_z", "op": "add", "vector": vec(cfg.v_head_dim), "heads": [3]},
            {"site": "blocks.0.attn.hook_result", "op": "zero", "heads": [0]},
        ]
    return []


def in_block(net: Any, arch: str, site: str) -> bool:
    """Whether the reference's module tree has ``site``: a point it names, one computed from such a point (a head's
    result from its z, a scale from its norm's output), or a point inside an attention that computes it."""
    points = reference_points(net, arch)[0]
    if site in not_offered(net, arch):
        return False
    if site.endswith(("hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern")):
        return True
    return site.replace("hook_result", "hook_z").replace("hook_scale", "hook_normalized") in points


# Ministral's and Seed-OSS's blocks are Llama's, Arcee's Llama's with Starcoder 2's ungated MLP: the survey checks
# their points, and their edits would repeat those of ARCHS.
EDITED_FAMILIES = tuple(f for f in FAMILIES if f not in ("ministral", "seed_oss", "arcee"))


@pytest.mark.parametrize("arch", (*ARCHS, *EDITED_FAMILIES))
async def test_an_edit_at_each_new_point_matches_the_same_edit_in_process(built, arch):
    """The edited site's own value and the last layer within 1e-5, and 10 greedy tokens identical."""
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    prompt = enc["input_ids"].shape[1]
    cfg = net.config
    d = cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d // heads_of(net)
    d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * d
    n = cfg.num_hidden_layers
    failures = []
    items = cases(arch, n, d, d_head, d_mlp)
    if arch in FAMILIES:
        items = [item for item in items if item["site"] in SHORT and in_block(net, arch, item["site"])]
        items += own_edits(arch, cfg)
    if arch == "cohere2":  # one norm for both sublayers: ln1's scale is attention's copy of it, which the reference's
        # hook on the norm's output cannot edit alone (test_architectures.py checks that rule on GPT-J's block)
        items = [item for item in items if not item["site"].endswith("ln1.hook_scale")]
    async with concurrent_client(app_with()) as c:
        for item in items:
            ref = Reference(net, arch, [item], prompt)
            try:
                out = ref.run(lambda: net(**enc, output_hidden_states=True))
                kept = {k: dict(v) if isinstance(v, dict) else v for k, v in ref.kept.items()}
                tokens = ref.run(
                    lambda: net.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
                )
            finally:
                ref.close()
            body = {"model": path, "interventions": [item]}
            r = await c.post(
                "/extract", json={**body, "text": TEXT, "hidden_state_layers": [n, item["site"]], "positions": "all"}
            )
            assert r.status_code == 200, (item, r.text)
            got = arrays(r.json(), "sequence_hidden_states")
            site_value = kept[item["site"]]
            if isinstance(site_value, dict):  # inside attention: the reference kept each kind
                kind = item["site"].split(".hook_")[-1]
                site_value = site_value[{"attn_scores": "scores"}.get(kind, kind)]
            for key, want in ((str(n), out.hidden_states[n][0]), (item["site"], site_value)):
                if not np.allclose(got[key], want.float().numpy(), atol=1e-5, rtol=0):
                    failures.append((item["site"], item["op"], "states at " + key))
            g = await c.post("/generate", json={**body, "prompt": TEXT, "max_tokens": 10, "temperature": 0})
            assert g.status_code == 200, (item, g.text)
            if g.json()["token_ids"] != tokens[0, prompt:].tolist():
                failures.append((item["site"], item["op"], "tokens"))
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
async def test_knocking_out_a_heads_pattern_is_zeroing_its_z(built, arch):
    path = built(arch)
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "text": TEXT, "hidden_state_layers": [-1, "blocks.1.attn.hook_z"], "positions": "all"}
        knock = {"site": "blocks.1.attn.hook_pattern", "op": "zero", "heads": [2], "positions": [4, -1]}
        zero_z = {"site": "blocks.1.attn.hook_z", "op": "zero", "heads": [2], "positions": [4, -1]}
        a = arrays((await c.post("/extract", json={**body, "interventions": [knock]})).json(), "sequence_hidden_states")
        b = arrays(
            (await c.post("/extract", json={**body, "interventions": [zero_z]})).json(), "sequence_hidden_states"
        )
        plain = arrays((await c.post("/extract", json=body)).json(), "sequence_hidden_states")
    np.testing.assert_allclose(a["-1"], b["-1"], atol=1e-5)
    assert not np.allclose(a["-1"], plain["-1"], atol=1e-3)
    assert not a["blocks.1.attn.hook_z"][[4, -1], 2].any() and a["blocks.1.attn.hook_z"][[4, -1], 1].any()


# -- TransformerLens's rules: read when fired, forward order ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
async def test_each_point_is_read_when_it_fires_and_edits_run_in_forward_order(built, arch):
    path = built(arch)
    net, tok = load(path, arch)
    points, _, _, _ = reference_points(net, arch)
    store, handles = record(points)
    with torch.inference_mode():
        net(**tok(TEXT, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    h = store["blocks.0.hook_resid_post"].numpy()
    v = np.random.default_rng(0).standard_normal(h.shape[-1]).astype(np.float32)
    names = [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_pre",
        1,
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
    ]
    async with concurrent_client(app_with()) as c:

        async def states(edits: list[dict[str, Any]]) -> dict[str, np.ndarray]:
            body = {
                "model": path,
                "text": TEXT,
                "hidden_state_layers": names,
                "positions": "all",
                "interventions": edits,
            }
            r = await c.post("/extract", json=body)
            assert r.status_code == 200, r.text
            return arrays(r.json(), "sequence_hidden_states")

        # 1. An edit at blocks.1.hook_resid_pre is not in blocks.0.hook_resid_post, which fired before it; index 1
        #    reads like blocks.1.hook_resid_pre.
        got = await states([{"site": "blocks.1.hook_resid_pre", "op": "add", "vector": v.tolist()}])
        close(got["blocks.0.hook_resid_post"], h, "resid_post before the later edit")
        close(got["blocks.1.hook_resid_pre"], h + v, "resid_pre with the edit")
        close(got["1"], h + v, "index 1")
        # 2. Forward order, whatever the list order: blocks.0.hook_resid_post fires first, so 2h + v, not 2(h + v).
        edits = [
            {"site": "blocks.1.hook_resid_pre", "op": "add", "vector": v.tolist()},
            {"site": "blocks.0.hook_resid_post", "op": "scale", "scale": 2.0},
        ]
        got = await states(edits)
        close(got["blocks.1.hook_resid_pre"], 2 * h + v, "forward order")
        close(got["blocks.0.hook_resid_post"], 2 * h, "resid_post as its own edit left it")
        # At one point, list order: (h + v) * 2 one way, 2h + v the other.
        same = [{"site": 1, "op": "add", "vector": v.tolist()}, {"site": 1, "op": "scale", "scale": 2.0}]
        close((await states(same))["1"], 2 * (h + v), "list order at one point")
        close((await states(same[::-1]))["1"], 2 * h + v, "list order at one point, reversed")
        # 3. An edit at hook_resid_mid is not in hook_attn_out, which fired before it.
        got = await states([{"site": "blocks.0.hook_resid_mid", "op": "scale", "scale": 2.0}])
        close(got["blocks.0.hook_attn_out"], store["blocks.0.hook_attn_out"].numpy(), "attn_out before the mid edit")
        close(got["blocks.0.hook_resid_mid"], 2 * store["blocks.0.hook_resid_mid"].numpy(), "resid_mid edited")


# -- per-head patching ----------------------------------------------------------------------------------------------

CLEAN, CORRUPTED = "The cat sat on the mat", "The cap sat on the mat"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
async def test_per_head_patching_matches_an_in_process_loop(built, arch):
    path = built(arch)
    net, tok = load(path, arch)
    points = reference_points(net, arch)[0]
    h = heads_of(net)
    clean, corrupt = (tok(t, return_tensors="pt")["input_ids"] for t in (CLEAN, CORRUPTED))
    total = clean.shape[1]
    positions = [2, total - 1]
    good, bad = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" the", "."))
    sites = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_result", "blocks.2.attn.hook_pattern"]

    def metric(ids: torch.Tensor, items: list[dict[str, Any]], keep: bool = False) -> Any:
        ref = Reference(net, arch, items, total)
        store: dict[str, Any] = {}
        hooks = []
        if keep:
            store, hooks = record({s: points[s] for s in sites if s in points})
        try:
            logits = ref.run(lambda: net(ids).logits[0, -1])
        finally:
            ref.close()
            for handle in hooks:
                handle.remove()
        return float(logits[good] - logits[bad]), store

    # The clean values of each site (the result and the pattern through a no-op edit that keeps them).
    clean_m, clean_z = metric(clean, [], keep=True)
    kept: dict[str, torch.Tensor] = {"blocks.0.attn.hook_z": clean_z["blocks.0.attn.hook_z"]}
    for site in sites[1:]:
        ref = Reference(net, arch, [{"site": site, "op": "scale", "scale": 1.0}], total)
        ref.run(lambda: net(clean))
        ref.close()
        value = ref.kept[site]
        kept[site] = value["pattern"] if isinstance(value, dict) else value
    corrupt_m, _ = metric(corrupt, [])
    want = []
    for site in sites:
        rows = []
        for p in positions:
            rows.append(
                [
                    metric(
                        corrupt,
                        [
                            {
                                "site": site,
                                "op": "set",
                                "vector": kept[site][p, j : j + 1].tolist(),
                                "positions": [p],
                                "heads": [j],
                            }
                        ],
                    )[0]
                    for j in range(h)
                ]
            )
        want.append(rows)
    async with concurrent_client(app_with(max_batch_size=16)) as c:
        body = {"model": path, "clean": CLEAN, "corrupted": CORRUPTED, "sites": sites, "positions": [2, -1]}
        r = await c.post("/patch", json={**body, "metric": {"type": "logit_diff", "correct": " the", "incorrect": "."}})
        assert r.status_code == 200, r.text
        got = r.json()
    assert got["heads"] == [h, h, h] and got["runs"] == 2 + 3 * 2 * h
    assert abs(got["metric"]["clean"] - clean_m) < 1e-5 and abs(got["metric"]["corrupted"] - corrupt_m) < 1e-5
    np.testing.assert_allclose(np.array(got["patched"]), np.array(want), atol=1e-5)
    assert_normalized(got)


BAD_EDITS = [
    ({"site": "blocks.0.attn.hook_pattern", "op": "add", "vector": [1.0] * 8}, "interventions[0].op", "knock-out"),
    ({"site": "blocks.0.attn.hook_attn_scores", "op": "set", "vector": [0.0]}, "interventions[0].op", "scale or"),
    ({"site": "blocks.0.mlp.hook_post", "op": "zero", "heads": [0]}, "interventions[0].heads", "per-head"),
    ({"site": "blocks.0.attn.hook_k", "op": "zero", "heads": [2]}, "interventions[0].heads", "0 to 1"),  # 2 kv heads
    ({"site": "blocks.0.attn.hook_rot_q", "op": "add", "vector": [1.0] * 64}, "interventions[0].vector", "[16]"),
    ({"site": "hook_pos_embed", "op": "zero"}, "interventions[0].site", "rotary"),
]


async def test_bad_edits_at_the_new_points_are_422_naming_the_field(built):
    async with concurrent_client(app_with()) as c:
        for item, field, words in BAD_EDITS:
            r = await c.post("/extract", json={"model": built("llama"), "text": TEXT, "interventions": [item]})
            assert r.status_code == 422, r.text
            assert r.json()["field"] == field and words in r.text, r.json()


async def test_the_answer_size_estimate_counts_a_points_shape(built):
    """A pattern is [heads, keys] a token: a request for every block's over a long text is refused before the
    pass (413/422 naming hidden_state_layers), not built; one over a short text is served."""
    path = built("gpt2")
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(3)]
    async with concurrent_client(app_with(max_response_mb=1)) as c:
        body = {"model": path, "hidden_state_layers": names, "positions": "all", "hidden_state_format": "base64"}
        assert (await c.post("/extract", json={**body, "text": TEXT})).status_code == 200
        r = await c.post("/extract", json={**body, "text": " ".join([TEXT] * 40)})
        assert r.status_code in (413, 422) and r.json()["field"] == "hidden_state_layers", r.text


def test_a_scale_edit_leaves_the_rows_and_positions_it_does_not_edit_bit_for_bit(built):
    """An edited norm scale rescales the norm's output where the edit is (old / new); elsewhere the ratio is 1 and
    the output must be the norm's own, not (y - b) * 1 + b (a LayerNorm's bias rounds there): a row beside an edited
    one in a batch, and a scale edit by 1, leave every state exactly as the unedited pass has it."""
    from loom_kernel import Batch, Capture, Intervention, LoadOptions
    from loom_kernel.capture import resolve_layers
    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.resolve import resolve_model

    pm = create_plugin_manager()
    pm.check_pending()
    model = pm.hook.load(model=resolve_model(built("gpt2")), loader="transformers", options=LoadOptions(), kernel=None)
    texts = (TEXT, "the mat and the")
    capture = Capture(layers=resolve_layers([-1], model.num_layers), positions="all")

    def states(edits: tuple[tuple[Intervention, ...], ...]) -> list[np.ndarray]:
        out = pm.hook.forward_with_states(model=model, batch=Batch(texts=texts, interventions=edits), capture=capture)
        return [np.asarray(next(iter(row.states.values()))) for row in out.rows]

    plain = states(((), ()))
    for site in ("blocks.1.ln1.hook_scale", "blocks.0.ln2.hook_scale", "ln_final.hook_scale"):
        edited = states(((Intervention(site=site, op="scale", scale=2.0, positions=[-1]),), ()))
        assert np.array_equal(edited[1], plain[1]), site  # the other row
        assert np.array_equal(edited[0][:-1], plain[0][:-1]), site  # the positions before the edited last one
        assert not np.allclose(edited[0][-1], plain[0][-1]), site
        same = states(((Intervention(site=site, op="scale", scale=1.0),), ()))
        assert all(np.array_equal(a, b) for a, b in zip(same, plain, strict=True)), site


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neo", "opt", "bloom"])
async def test_a_scale_edit_with_edits_at_resid_pre_and_normalized_applies_them_in_forward_order(built, arch):
    """TransformerLens's order in a block: resid_pre, then the norm's scale (of the edited stream), then
    hook_normalized (of the rescaled output); one request with all three equals the three torch hooks in process,
    in its states and its greedy tokens."""
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    prompt = enc["input_ids"].shape[1]
    n, d = net.config.num_hidden_layers, net.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    items = [
        {"site": "blocks.1.hook_resid_pre", "op": "add", "vector": torch.randn(d, generator=gen).tolist()},
        {"site": "blocks.1.ln1.hook_scale", "op": "scale", "scale": 0.5, "positions": [1, -1]},
        {"site": "blocks.1.ln1.hook_normalized", "op": "add", "vector": torch.randn(d, generator=gen).tolist()},
        {"site": "blocks.0.ln2.hook_scale", "op": "scale", "scale": 3.0, "positions": "generated"},
        {"site": "blocks.0.ln2.hook_normalized", "op": "scale", "scale": 0.5},
    ]
    ref = Reference(net, arch, items, prompt)
    try:
        out = ref.run(lambda: net(**enc, output_hidden_states=True))
        tokens = ref.run(lambda: net.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id))
    finally:
        ref.close()
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "interventions": items}
        r = await c.post("/extract", json={**body, "text": TEXT, "hidden_state_layers": [2, n], "positions": "all"})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
        g = await c.post("/generate", json={**body, "prompt": TEXT, "max_tokens": 10, "temperature": 0})
        assert g.status_code == 200, g.text
    for i in (2, n):
        np.testing.assert_allclose(got[str(i)], out.hidden_states[i][0].numpy(), atol=1e-5, rtol=0)
    assert g.json()["token_ids"] == tokens[0, prompt:].tolist()
