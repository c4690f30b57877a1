"""``LoadedModel.attribution``: direct logit attribution on the architecture table.

The last block's output is the sum of the embeddings and what every block's sublayers add (``hook_attn_out``,
``hook_mlp_out``; the self-check at load verifies the sums). Per head, a block's attention output is the sum of its
heads' ``attn.hook_result`` and the output projection's bias, through the post-attention norm where the model has one
(Gemma, OLMo 2), frozen at its value for the position: then the parts still sum to ``hook_attn_out`` exactly. The
final norm frozen at its value for the position (TransformerLens's ``apply_ln_to_stack``) makes the head a linear
map: logit(t) = directions[t] . x + constants[t], which holds at every component of the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loom_kernel import LoadedModel
from loom_transformers.architectures import Arch, arch_of, part
from loom_transformers.sites import Site, logit_scale, norm_eps, site_map


class Attribution:
    def __init__(self, model: LoadedModel, arch: Arch) -> None:
        self.model, self.arch = model, arch
        cap = getattr(model.model.config, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self._sites = site_map(model)
        self._blocks = part(model.model.base_model, arch.blocks)

    def sites(self, kind: str) -> list[str]:
        n = self.model.num_layers
        names = [name for name in ("hook_embed", "hook_pos_embed") if isinstance(self._sites.get(name), Site)]
        for i in range(n):
            at = f"blocks.{i}."
            names += [at + ("hook_attn_out" if kind == "layers" else "attn.hook_result"), at + "hook_mlp_out"]
        return [*names, "ln_final.hook_scale"]

    def decompose(self, states: dict[str, Any], kind: str) -> list[tuple[str, int | None, Any]]:
        """The components, as float64 vectors [P, d] that sum to the last block's output."""
        out: list[tuple[str, int | None, Any]] = []
        for name in ("hook_embed", "hook_pos_embed"):
            if name in states:
                out.append((name, None, states[name].double()))
        for i, block in enumerate(self._blocks):
            at = f"blocks.{i}."
            if kind == "layers":
                out.append((at + "hook_attn_out", None, states[at + "hook_attn_out"].double()))
            else:
                out += self._heads(i, block, states[at + "attn.hook_result"].double())
            out.append((at + "hook_mlp_out", None, states[at + "hook_mlp_out"].double()))
        return out

    def _heads(self, i: int, block: Any, result: Any) -> list[tuple[str, int | None, Any]]:
        """Block ``i``'s heads [P, heads, d] and its output bias, through its post-attention norm (frozen)."""
        import torch

        o, heads = self._sites[f"blocks.{i}.attn.hook_result"].extra
        bias = (
            o.bias.detach().double().cpu()
            if getattr(o, "bias", None) is not None
            else torch.zeros(result.shape[-1], dtype=torch.float64)
        )
        bias = bias.expand(result.shape[0], -1)
        norm = part(block, self.arch.post_attn_norm)
        if norm is not None:  # linear in its input once its scale is fixed: each part keeps its share
            frozen = self._frozen(norm, result.sum(1) + bias)
            result, bias = frozen(result), frozen(bias)
        site = f"blocks.{i}.attn.hook_result"
        return [*((site, h, result[:, h]) for h in range(heads)), (f"blocks.{i}.attn.b_O", None, bias)]

    def _frozen(self, norm: Any, x: Any) -> Any:
        """The norm as a linear map at input ``x`` [P, d]: its scale (and, for a LayerNorm, the centring) fixed; its
        bias, a constant, is left out (the post-norms of the table have none)."""
        weight = self._weight(norm)
        centred = x - x.mean(-1, keepdim=True) if self.arch.norm == "layer" else x
        scale = (centred.pow(2).mean(-1, keepdim=True) + norm_eps(norm)).sqrt()

        def apply(v: Any) -> Any:
            v = v - v.mean(-1, keepdim=True) if self.arch.norm == "layer" else v
            s = scale if v.ndim == 2 else scale.unsqueeze(1)
            return v / s * weight

        return apply

    def _weight(self, norm: Any) -> Any:
        """What a norm multiplies its normalized input by: its weight (Gemma's 1 + w), or 1 where it has none (OLMo's
        LayerNorm without parameters)."""
        weight = getattr(norm, "weight", None)
        if weight is None:
            return 1.0
        weight = weight.detach().double().cpu()
        return 1 + weight if self.arch.norm == "rms1p" else weight

    def logit_map(self, states: dict[str, Any], tokens: Sequence[int]) -> tuple[Any, Any]:
        """(directions [P, k, d], constants [P, k]) in float64: the final norm frozen at ``ln_final.hook_scale``."""
        import torch

        net = self.model.model
        norm = self._sites["ln_final.hook_normalized"].module
        head = net.get_output_embeddings()
        ids = torch.tensor(list(tokens))
        scale_logits = logit_scale(self.model)
        unembed = head.weight.detach()[ids.to(head.weight.device)].double().cpu() * scale_logits  # [k, d]
        weight = self._weight(norm)
        scale = states["ln_final.hook_scale"].double()  # [P, 1]
        directions = (unembed * weight).unsqueeze(0) / scale.unsqueeze(-1)  # [P, k, d]
        if self.arch.norm == "layer":  # (x - mean x) . u = x . (u - mean u)
            directions = directions - directions.mean(-1, keepdim=True)
        constants = torch.zeros(len(tokens), dtype=torch.float64)
        if getattr(norm, "bias", None) is not None:
            constants = constants + unembed @ norm.bias.detach().double().cpu()
        if getattr(head, "bias", None) is not None:
            constants = constants + head.bias.detach()[ids.to(head.bias.device)].double().cpu() * scale_logits
        return directions, constants.expand(scale.shape[0], -1)


def attribution(model: LoadedModel) -> Attribution | None:
    """Offered for a described causal LM whose blocks have attention and an MLP, a final norm and a dense head that
    reads it (not through OPT-350m's project_out)."""
    arch = arch_of(model.model.config)
    sites = site_map(model)
    head = model.model.get_output_embeddings()
    if arch is None or arch.mixer is not None or head is None or not head.weight.is_floating_point():
        return None
    if part(model.model.base_model, arch.project_out) is not None:
        return None
    if not isinstance(sites.get("ln_final.hook_scale"), Site):
        return None
    return Attribution(model, arch)
