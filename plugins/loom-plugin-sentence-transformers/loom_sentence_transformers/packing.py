"""Packed forward passes: a batch's rows laid end to end, with no padding for the dense layers to multiply.

A merged batch of short texts of different lengths is mostly padding once padded to its longest row (16 texts of
6-14 words: about a third), and on CPU the dense layers cost the same for a padding token as for a real one.
Packing puts several rows into one sequence, each row attending only to itself (a block-diagonal 4D attention
mask) and counting its positions from 0 (``position_ids``), so each row computes what it computes alone; the
outputs are scattered back to the padded [n, T, H] layout that the rest of the pipeline (Pooling, Dense,
Normalize) and the state capture expect.

Whether a model honours ``position_ids`` and a 4D mask is not declared anywhere, so it is measured: the first batch
worth packing runs both ways, and the model packs from then on only if the two agree (``model.extra["packing"]``).
"""

from __future__ import annotations

import math
from typing import Any

# Tokens per packed sequence (or the longest row, when longer): attention inside a pack grows with its square.
# Measured in process, alternating, on merged groups of 16 MiniLM texts: 128 ran 1.15x 256 for 6-14 words (7
# of 7 rounds) and 1.10x for 4-60 words (6 of 7); 64 lost to 128 for the mixed lengths.
PACK_TOKENS = 128
MIN_SAVING = 0.2  # pack only when it removes at least this share of the padded tokens
# A model that ignores the mask or the positions differs by O(0.1); float noise between the layouts is ~1e-7 in
# float32 and ~1e-3 in half precision.
AGREE_RTOL, AGREE_RTOL_HALF = 1e-4, 1e-2


class Layout:
    """Where each row's real tokens sit in the packed [P, L] layout, and the flat indices that move them."""

    def __init__(self, mask: Any, cap: int = PACK_TOKENS) -> None:
        import torch

        self.n, self.width = mask.shape
        real = mask.bool()
        lengths = real.sum(1).tolist()
        cap = max(cap, *lengths)  # a row longer than the cap is a pack of its own; the others fill packs that long
        # As few packs as the cap allows, filled evenly (longest row first, each to the emptiest pack): every pack
        # is padded to the longest one, so uneven packs would bring the padding back.
        bins = [0] * max(1, min(self.n, math.ceil(sum(lengths) / cap)))  # tokens in each pack
        where: list[tuple[int, int]] = [(0, 0)] * self.n  # row -> (pack, offset)
        for i in sorted(range(self.n), key=lambda r: -lengths[r]):
            b = min(range(len(bins)), key=bins.__getitem__)
            where[i] = (b, bins[b])
            bins[b] += lengths[i]
        self.packs, self.length = len(bins), max(bins)
        padded, packed, segment, position = [], [], [], []
        for i, (b, offset) in enumerate(where):
            cols = real[i].nonzero().flatten()
            padded.append(i * self.width + cols)
            packed.append(b * self.length + offset + torch.arange(lengths[i]))
            segment.append(torch.full((lengths[i],), i))
            position.append(torch.arange(lengths[i]))
        self.padded_index = torch.cat(padded)
        self.packed_index = torch.cat(packed)
        self.segment = torch.full((self.packs * self.length,), -1)  # -1: a pack's tail, attending only to itself
        self.segment[self.packed_index] = torch.cat(segment)
        self.position = torch.zeros(self.packs * self.length, dtype=torch.long)
        self.position[self.packed_index] = torch.cat(position)

    @property
    def worth_it(self) -> bool:
        return self.n > 1 and self.packs * self.length <= (1 - MIN_SAVING) * self.n * self.width

    def pack(self, features: dict[str, Any], dtype: Any, device: Any) -> dict[str, Any]:
        """The model's inputs in packed form: every [n, T] feature, ``position_ids`` and the 4D mask."""
        import torch

        out: dict[str, Any] = {}
        for key, value in features.items():
            if key == "attention_mask" or not (torch.is_tensor(value) and tuple(value.shape) == (self.n, self.width)):
                continue  # ST's bookkeeping (modality, ...) is not the model's; the 2D mask is replaced below
            flat = torch.zeros(self.packs * self.length, dtype=value.dtype, device=value.device)
            flat[self.packed_index.to(value.device)] = value.reshape(-1)[self.padded_index.to(value.device)]
            out[key] = flat.view(self.packs, self.length)
        seg = self.segment.view(self.packs, self.length).to(device)
        apart = seg[:, :, None] != seg[:, None, :]
        mask = torch.zeros(apart.shape, dtype=dtype, device=device).masked_fill(apart, torch.finfo(dtype).min)
        out["attention_mask"] = mask[:, None]  # [P, 1, L, L]: additive, broadcast over heads
        out["position_ids"] = self.position.view(self.packs, self.length).to(device)
        return out

    def unpack(self, packed: Any) -> Any:
        """[P, L, H] back to [n, T, H], zeros where the padded layout has padding."""
        import torch

        flat = packed.reshape(self.packs * self.length, *packed.shape[2:])
        out = torch.zeros(self.n * self.width, *packed.shape[2:], dtype=packed.dtype, device=packed.device)
        out[self.padded_index.to(packed.device)] = flat[self.packed_index.to(packed.device)]
        return out.view(self.n, self.width, *packed.shape[2:])


def packable(st: Any) -> bool:
    """A text model whose first module is a plain sentence-transformers Transformer, the rest per-row modules."""
    modules = list(st.children())
    names = [type(m).__name__ for m in modules]
    return bool(modules) and names[0] == "Transformer" and "Router" not in names and hasattr(modules[0], "model")


def window(config: Any) -> int | None:
    """How many tokens a text may have and still pack, where some of the model's blocks attend to a window of keys
    (Mistral's, Gemma's and ModernBERT's local blocks: ``sliding_window``, keys fewer than that many back, or as
    far either side); None where every block attends to every key. The model builds its window into the masks it
    makes from the 2-D padding mask, and a 4-D mask given instead is used as it is, so a packed pass would attend
    past the window for a longer text; packing's check on a first batch of short texts cannot tell."""
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None  # Qwen2's and Qwen3's sliding_window is set but used by no block
    size = getattr(config, "sliding_window", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def run_packed(st: Any, features: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """The pipeline's output features, as ``st(features)`` gives them, computed on the packed rows."""
    import torch

    first, *rest = st.children()
    param = next(first.parameters())
    inputs = layout.pack(features, param.dtype, param.device)
    out = first(dict(inputs))
    result = dict(features)
    for key, value in out.items():
        if key in inputs:
            continue
        if torch.is_tensor(value) and tuple(value.shape[:2]) == (layout.packs, layout.length):
            result[key] = layout.unpack(value)
        elif key == "all_layer_embeddings":
            result[key] = [layout.unpack(v) for v in value]
        else:
            result[key] = value
    for module in rest:
        result = module(result)
    return result


def agrees(st: Any, features: dict[str, Any], layout: Layout) -> bool:
    """Whether the packed pass gives what the padded one does, on this batch (the decision for the model)."""
    import torch

    padded = st(dict(features))
    packed = run_packed(st, features, layout)
    real = features["attention_mask"].bool()
    dtype = padded["token_embeddings"].dtype
    rtol = AGREE_RTOL if dtype in (torch.float32, torch.float64) else AGREE_RTOL_HALF
    for a, b in (
        (padded["token_embeddings"][real], packed["token_embeddings"][real]),
        (padded["sentence_embedding"], packed["sentence_embedding"]),
    ):
        a, b = a.float(), b.float()
        if not torch.isfinite(b).all() or (a - b).abs().max() > rtol * (1 + a.abs().max()):
            return False
    return True
