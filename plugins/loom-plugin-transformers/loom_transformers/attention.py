"""Attention weights of the requested blocks, by forward hooks on their attention modules.

SDPA and flash kernels never materialise the weights, so a request that asks for them runs under eager attention:
``eager_attention`` switches the loaded model for the duration of the request and switches it back after, which in
transformers 5 is a config change (the attention function is looked up per call), not a reload.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from loom_kernel.errors import Unsupported

FIELD = "return_attention"


@contextmanager
def eager_attention(net: Any) -> Iterator[None]:
    current = getattr(net.config, "_attn_implementation", None)
    if current == "eager":
        yield
        return
    try:
        net.set_attn_implementation("eager")
    except Exception as exc:  # a model without an eager path: say so instead of failing inside the pass
        raise Unsupported(
            f"{FIELD}: {type(net).__name__} cannot switch to eager attention ({exc})", field=FIELD
        ) from None
    try:
        yield
    finally:
        net.set_attn_implementation(current)


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


class AttentionRecorder:
    """Keeps the latest call's weights [B, heads, q, k] per requested index, on CPU.

    ``rows`` selects query rows as in StateRecorder (None: all, ``[-1]``: the last). Index i is the attention of
    block i (1-based), the block whose output is hidden state i.
    """

    def __init__(self, net: Any, blocks: Sequence[Any], indices: Sequence[int]) -> None:
        self.rows: list[int] | None = None
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
            w = weights.detach()
            if self.rows is not None:
                w = w[:, :, self.rows]
            self.latest[index] = w.to("cpu", copy=True)

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
