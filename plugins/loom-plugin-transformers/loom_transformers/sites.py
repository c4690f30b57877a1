"""Hook points by TransformerLens's names, and the hooks of one pass that edit them (``Batch.interventions``) and
record them (``Capture.sites``).

A point is a module's input or output. Several names can share one: hidden-state index i (0 < i < N),
``blocks.{i-1}.hook_resid_post`` and ``blocks.{i}.hook_resid_pre`` are all the output of block i-1; index 0 and
``blocks.0.hook_resid_pre`` the input of block 0; index N and ``ln_final.hook_normalized`` the final norm's output
(the last block's, for a model without a final norm). An edit at a name therefore shows in every name at its point,
and in everything computed after it. The values are the model's own (no LayerNorm folding, no centring).

Per block: ``hook_attn_out`` and ``hook_mlp_out`` are what each sublayer adds to the residual stream (for Gemma 2,
after its post-sublayer norms; for BERT, the output projection before the add and its LayerNorm).
``hook_resid_mid`` is resid_pre + attn_out; an edit there is carried by the attention output (attn_out becomes
f(resid_pre + attn_out) - resid_pre), and a parallel-residual block (GPT-NeoX) has none. For BERT's post-LN blocks
it is the attention sublayer's output after its LayerNorm. ``attn.hook_z`` is the input of the attention's output
projection, viewed as [heads, d_head].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from loom_kernel import Intervention, LoadedModel
from loom_kernel.capture import find_blocks

ATTENTION = ("self_attn", "attn", "attention")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
OUT_PROJECTIONS = ("o_proj", "c_proj", "dense", "out_proj")


@attrs.define(frozen=True)
class Site:
    module: Any
    side: str  # "in" or "out"
    kind: str = "plain"  # plain | z (viewed [heads, d_head]) | mid (resid_pre of ``block`` + the output)
    block: Any = None
    heads: int = 0

    @property
    def point(self) -> tuple[int, str]:
        return id(self.module), self.side


@attrs.define(frozen=True)
class Layout:
    """Where a row's new tokens are in a pass: columns ``col``.. of the batch, tokens ``tok``.. of its sequence."""

    col: int
    tok: int
    count: int
    prompt: int


def site_map(model: LoadedModel) -> dict[int | str, Site | str]:
    """Every hook point of ``model`` by index and name; a string says why the model has no such site."""
    if "site_map" in model.extra:
        return model.extra["site_map"]
    net, n = model.model, model.num_layers
    base, blocks = find_blocks(net, n)
    final = next((getattr(base, name) for name in FINAL_NORMS if hasattr(base, name)), None)
    config = net.config
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 0)
    parallel = bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))
    sites: dict[int | str, Site | str] = {0: Site(blocks[0], "in")}
    for i in range(1, n):
        sites[i] = Site(blocks[i - 1], "out")
    sites[n] = Site(final, "out") if final is not None else Site(blocks[n - 1], "out")
    sites["ln_final.hook_normalized"] = sites[n] if final is not None else "this model has no final norm"
    for i, block in enumerate(blocks):
        at = f"blocks.{i}."
        sites[at + "hook_resid_pre"] = sites[i]
        sites[at + "hook_resid_post"] = Site(block, "out")
        attn = next((getattr(block, name) for name in ATTENTION if hasattr(block, name)), None)
        if attn is None:
            for name in ("hook_attn_out", "hook_mlp_out", "hook_resid_mid", "attn.hook_z"):
                sites[at + name] = f"no attention module found in {type(block).__name__}"
            continue
        proj = next((m for name, m in attn.named_modules() if name.split(".")[-1] in OUT_PROJECTIONS), None)
        post_ln = hasattr(block, "intermediate") and hasattr(block, "output") and not hasattr(block, "mlp")
        if hasattr(block, "pre_feedforward_layernorm"):  # Gemma 2: each sublayer's output is normed before the add
            attn_out, mlp_out = block.post_attention_layernorm, block.post_feedforward_layernorm
        elif post_ln:  # BERT: the projections before each add-and-LayerNorm
            attn_out, mlp_out = proj, block.output.dense
        else:
            attn_out, mlp_out = attn, getattr(block, "mlp", None)
        sites[at + "hook_attn_out"] = Site(attn_out, "out")
        sites[at + "hook_mlp_out"] = Site(mlp_out, "out") if mlp_out is not None else "no MLP module found"
        if post_ln:
            sites[at + "hook_resid_mid"] = Site(attn, "out")
        elif parallel:
            sites[at + "hook_resid_mid"] = (
                "a parallel-residual block adds attention and MLP to the same input: there is no stream between them"
            )
        else:
            sites[at + "hook_resid_mid"] = Site(attn_out, "out", kind="mid", block=block)
        if proj is None or not heads:
            sites[at + "attn.hook_z"] = "no attention output projection found"
        else:
            sites[at + "attn.hook_z"] = Site(proj, "in", kind="z", heads=heads)
    model.extra["site_map"] = sites
    return sites


def site_shapes(model: LoadedModel) -> dict[str, tuple[int, ...] | str]:
    """``LoadedModel.sites``: each name's per-token shape, or why the model has none."""
    shapes: dict[str, tuple[int, ...] | str] = {}
    for name, site in site_map(model).items():
        if isinstance(name, int):
            continue
        if isinstance(site, str) or site.kind != "z":
            shapes[name] = site if isinstance(site, str) else (model.hidden_size,)
            continue
        shapes[name] = (site.heads, _in_width(site.module, model) // site.heads)
    return shapes


def _in_width(module: Any, model: LoadedModel) -> int:
    """The output projection's input width: a Linear's (quantized ones keep ``in_features``), GPT-2's Conv1D's
    (weight [in, out]), else the config's heads x head_dim."""
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    config = model.model.config
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    return heads * int(getattr(config, "head_dim", 0) or model.hidden_size // heads)


class SiteHooks:
    """The hooks of one pass: each row's edits (in its list order) at their points, then the recording of ``record``
    (names kept like ``StateRecorder`` keeps indices: ``rows`` None for every column, [-1] for the last)."""

    def __init__(
        self,
        model: LoadedModel,
        edits: Sequence[Sequence[Intervention]],
        layout: Sequence[Layout],
        record: Sequence[str] = (),
    ) -> None:
        self.rows: list[int] | None = None
        self.kept: dict[str, Any] = {}
        self._handles: list[Any] = []
        sites = site_map(model)
        points: dict[tuple[int, str], tuple[Site, list[tuple[int, Site, Intervention]], list[tuple[str, Site]]]] = {}

        def at(site: Site) -> Any:
            key = site.point if site.kind != "mid" else (id(site.module), "out")
            return points.setdefault(key, (site, [], []))

        for b, row in enumerate(edits):
            for edit in row:
                site = sites[edit.site]
                assert not isinstance(site, str)
                at(site)[1].append((b, site, edit))
        for name in record:
            site = sites[name]
            assert not isinstance(site, str)
            at(site)[2].append((name, site))
        self._layout = list(layout)
        self._inputs: dict[int, Any] = {}  # each resid_mid block's input, kept by a pre-hook on the block
        for site, row_edits, names in points.values():
            self._register(site, row_edits, names)
        used = [s for _, row_edits, names in points.values() for s in [e[1] for e in row_edits] + [n[1] for n in names]]
        for block in {id(s.block): s.block for s in used if s.kind == "mid"}.values():
            self._handles.append(block.register_forward_pre_hook(self._stash(block), with_kwargs=True))

    def _stash(self, block: Any) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self._inputs[id(block)] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _register(self, site: Site, edits: list[tuple[int, Site, Intervention]], names: list[tuple[str, Site]]) -> None:
        def run(h: Any) -> Any:
            if edits:
                h = h.clone()
                for b, s, edit in edits:
                    self._edit(h, b, s, edit)
            for name, s in names:
                self._keep(name, self._value(h, s))
            return h

        if site.side == "in":

            def pre(module: Any, args: tuple, kwargs: dict) -> Any:
                if args:
                    return (run(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": run(kwargs["hidden_states"])}

            self._handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(module: Any, args: Any, output: Any) -> Any:
                if isinstance(output, tuple):
                    return (run(output[0]), *output[1:])
                if hasattr(output, "last_hidden_state"):
                    output.last_hidden_state = run(output.last_hidden_state)
                    return output
                return run(output)

            self._handles.append(site.module.register_forward_hook(post))

    def _value(self, h: Any, site: Site) -> Any:
        if site.kind == "z":
            return h.view(*h.shape[:-1], site.heads, h.shape[-1] // site.heads)
        if site.kind == "mid":
            return self._inputs[id(site.block)] + h
        return h

    def _edit(self, h: Any, b: int, site: Site, edit: Intervention) -> None:
        import torch

        place = self._layout[b]
        columns, rows = _selected(edit, place)
        if not columns:
            return
        cols = torch.tensor(columns, device=h.device)
        x = self._value(h, site)[b].index_select(0, cols)
        if site.kind == "z" and edit.heads is not None:
            heads = torch.tensor(edit.heads, device=h.device)
            x = x.index_copy(1, heads, _apply(x.index_select(1, heads), edit, rows))
        else:
            x = _apply(x, edit, rows)
        if site.kind == "mid":
            x = x - self._inputs[id(site.block)][b].index_select(0, cols)
        target = self._value(h, site) if site.kind == "z" else h
        target[b, cols] = x.to(h.dtype)

    def _keep(self, name: str, value: Any) -> None:
        t = value.detach()
        if self.rows is not None:
            t = t[:, self.rows]
        self.kept[name] = t.to("cpu", copy=True)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _selected(edit: Intervention, place: Layout) -> tuple[list[int], list[int] | None]:
    """The pass's columns ``edit`` touches for one row, and the vector row for each (None: one vector for all)."""
    tokens = range(place.tok, place.tok + place.count)
    if edit.positions == "all":
        picked = list(tokens)
    elif edit.positions == "prompt":
        picked = [t for t in tokens if t < place.prompt]
    elif edit.positions == "generated":
        picked = [t for t in tokens if t >= place.prompt]
    else:
        wanted = {(p if p >= 0 else place.prompt + p): j for j, p in enumerate(edit.positions)}
        picked = [t for t in tokens if t in wanted]
        if edit.vector is not None and edit.vector.ndim == 2 and edit.op != "ablate":
            return [place.col + t - place.tok for t in picked], [wanted[t] for t in picked]
    return [place.col + t - place.tok for t in picked], None


def _apply(x: Any, edit: Intervention, rows: list[int] | None) -> Any:
    """``edit`` on ``x`` [m, ..., D], in float32."""
    xf = x.float()
    v = None
    if edit.vector is not None:
        v = edit.vector.to(xf.device)
        if rows is not None:
            v = v[rows]
            v = v.view(v.shape[0], *([1] * (xf.ndim - 2)), v.shape[-1])
    if edit.op == "add":
        return xf + edit.scale * v
    if edit.op == "set":
        return (v if v is not None else xf).expand_as(xf).clone()
    if edit.op == "scale":
        return edit.scale * xf
    if edit.op == "ablate":
        return xf - (xf @ v.T) @ v
    return xf.zero_()


def unembed(model: LoadedModel, states: Any, normalized: bool) -> Any:
    """``LoadedModel.unembed``: the model's own final norm (unless ``normalized``), LM head and final logit
    soft-capping (Gemma 2) applied to CPU states [P, H]; float32 CPU logits [P, V]."""
    import torch

    net = model.model
    final = site_map(model).get("ln_final.hook_normalized")
    head = net.get_output_embeddings()
    with torch.inference_mode():
        x = states.to(head.weight.device, net.dtype)  # the model's compute dtype (a quantized head's weight is not)
        if not normalized and not isinstance(final, str):
            x = final.module(x)
        logits = head(x)
        cap = getattr(net.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits.float().cpu()
