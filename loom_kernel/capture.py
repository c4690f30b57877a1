"""Layer, site and position resolution, and the hook-based state recorder shared by loaders.

Index space is transformers' ``output_hidden_states``: 0 is the embedding output, i the output of block i,
N the output of the last block as the base model returns it (after the final norm where there is one).
Negative indices count from the end, so -1 is N and -(N+1) is 0. A site is such an index or a hook point named as
TransformerLens names them (``blocks.{i}.hook_resid_pre``, ``blocks.{i}.attn.hook_z``, ``ln_final.hook_normalized``,
...); the loader says which a model has, with each one's per-token shape, in ``LoadedModel.sites`` (a string there
says why the model has no such site).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loom_kernel.errors import InvalidField, Unsupported, echo
from loom_kernel.types import LayerSel, LoadedModel, PositionSpec

POSITION_NAMES = ("last", "all", "prompt", "generated")
SITE_FAMILIES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
    "attn.hook_z",
)


def is_site_name(value: Any) -> bool:
    """A hook-point name: dotted (``blocks.0.hook_z``) or top-level (``hook_embed``), never an index as text."""
    return isinstance(value, str) and ("." in value or value.startswith("hook_"))


def site_names_allowed(model: LoadedModel) -> str:
    n = model.num_layers
    if not model.sites:  # a loader with hidden-state indices only
        return f"a hidden-state index from {-(n + 1)} to {n} (the {model.loader} loader has no named hook points)"
    return (
        f"a hidden-state index from {-(n + 1)} to {n}, blocks.{{0..{n - 1}}}.{{{','.join(SITE_FAMILIES)}}} "
        "or ln_final.hook_normalized (GET /models/{id}/sites lists them)"
    )


def check_site(site: Any, model: LoadedModel, field: str) -> tuple[int | str, tuple[int, ...]]:
    """(the site as the loader reads it, its per-token shape): an index made non-negative, or a name the model has."""
    n = model.num_layers
    if model.sites is None:
        raise Unsupported(
            f"{field}: the {model.loader} loader has no hook points for interventions or named sites",
            field=field,
        )
    if isinstance(site, str) and not is_site_name(site):
        try:
            site = int(site)
        except ValueError:
            raise InvalidField(
                f"{field}: unknown site {echo(site)}", field=field, allowed=site_names_allowed(model)
            ) from None
    if isinstance(site, int) and not isinstance(site, bool):
        if not -(n + 1) <= site <= n:
            raise InvalidField(
                f"{field}: layer {site} is out of range for a model with {n} layers",
                field=field,
                allowed=site_names_allowed(model),
            )
        index = site if site >= 0 else n + 1 + site
        return index, (model.final_width if index == n and model.final_width else model.hidden_size,)
    known = model.sites.get(site) if isinstance(site, str) else None
    if isinstance(known, str):
        raise InvalidField(f"{field}: {site}: {known}", field=field, allowed=site_names_allowed(model))
    if known is None:
        raise InvalidField(f"{field}: unknown site {echo(site)}", field=field, allowed=site_names_allowed(model))
    return site, tuple(known)


def resolve_layers(
    spec: str | int | Sequence[int | str] | None, num_layers: int, field: str = "hidden_state_layers"
) -> tuple[LayerSel, ...]:
    """Map what the user asked for to ``LayerSel``s; keys echo the user's spelling."""
    n = num_layers
    allowed = f'integers from {-(n + 1)} to {n}, or "all"'
    if spec is None:
        spec = [-1]
    if isinstance(spec, str):
        if spec == "all":
            return tuple(LayerSel(key=str(k), index=n + 1 + k) for k in range(-n, 0))
        spec = [spec]
    elif isinstance(spec, int):
        spec = [spec]
    out: dict[str, LayerSel] = {}
    for raw in spec:
        if isinstance(raw, str):  # a list holds indices or hook-point names (with a dot), never numbers as text
            raise InvalidField(
                f"{field}: {raw!r} is a str, neither a layer index nor a hook-point name", field=field, allowed=allowed
            )
        try:
            k = int(raw)
        except (TypeError, ValueError):
            raise InvalidField(f"{field}: {raw!r} is not a layer index", field=field, allowed=allowed) from None
        if isinstance(raw, bool) or not -(n + 1) <= k <= n:
            raise InvalidField(
                f"{field}: layer {raw} is out of range for a model with {n} layers",
                field=field,
                allowed=allowed,
            )
        key = str(raw)
        out.setdefault(key, LayerSel(key=key, index=k if k >= 0 else n + 1 + k))
    return tuple(out.values())


def split_sites(spec: Any) -> tuple[Any, list[str]]:
    """(the layer indices of a ``hidden_state_layers`` spec, the hook-point names in it)."""
    if is_site_name(spec):
        return [], [spec]
    if isinstance(spec, list):  # duplicates folded: a site named 10,000 times is read once
        names = list(dict.fromkeys(s for s in spec if is_site_name(s)))
        return ([s for s in spec if not is_site_name(s)] if names else spec), names
    return spec, []


def check_positions(spec: Any, field: str = "positions", max_context: int | None = None) -> PositionSpec:
    """A position spec as written, checked as far as it can be before the sequence is known: a list holds
    distinct integers, at most ``max_context`` of them (a sequence has no more tokens)."""
    if isinstance(spec, str) and spec in POSITION_NAMES:
        return spec  # type: ignore[return-value]
    if isinstance(spec, list) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        if max_context is not None and len(spec) > max_context:
            raise InvalidField(
                f"{field}: {len(spec)} positions, more than the model's context of {max_context} tokens",
                field=field,
                allowed=f"at most {max_context} distinct token indices",
            )
        if len(set(spec)) < len(spec):
            raise InvalidField(
                f"{field}: token index {_first_repeat(spec)} is listed twice", field=field, allowed="distinct indices"
            )
        return list(spec)
    raise InvalidField(
        f"{field}: {echo(spec)} is not a position spec",
        field=field,
        allowed=[*POSITION_NAMES, "a non-empty list of token indices"],
    )


def resolve_positions(spec: PositionSpec, total: int, prompt_len: int, field: str = "positions") -> list[int]:
    """Token indices of the final sequence (prompt + generated) that ``spec`` selects."""
    if spec == "last":
        return [total - 1]
    if spec == "all":
        return list(range(total))
    if spec == "prompt":
        return list(range(prompt_len))
    if spec == "generated":
        return list(range(prompt_len, total))
    out = []
    for i in spec:
        j = i if i >= 0 else total + i
        if not 0 <= j < total:
            raise InvalidField(
                f"{field}: token index {i} is out of range for a sequence of {total} tokens",
                field=field,
                allowed=f"integers from {-total} to {total - 1}",
            )
        out.append(j)
    if len(set(out)) < len(out):
        raise InvalidField(
            f"{field}: {list(spec)} names token {_first_repeat(out)} twice in a sequence of {total} tokens",
            field=field,
            allowed="distinct indices (a negative index counts from the end)",
        )
    return out


def _first_repeat(values: Sequence[int]) -> int | None:
    seen: set[int] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def find_blocks(model: Any, num_layers: int) -> tuple[Any, Any]:
    """The base model and its ModuleList of ``num_layers`` transformer blocks (the shallowest such list)."""
    import torch

    base = getattr(model, "base_model", None) or model
    best: tuple[int, Any] | None = None
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, module)
    if best is None:
        raise ValueError(f"no list of {num_layers} blocks found in {type(model).__name__}")
    return base, best[1]


def _hidden(value: Any) -> Any:
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    if isinstance(value, tuple | list):
        return value[0]
    return value


class StateRecorder:
    """Forward hooks on the requested indices only; each call's output rows are kept as the caller selects. The one
    recorder of hidden-state indices: every loader that records indices on blocks (and the kernel's runner for
    declared parts) uses it.

    Before each forward the caller sets ``rows``: None keeps every row of that call, a list of offsets keeps
    those (e.g. ``[-1]``). With ``replace=True`` a call's rows replace what was kept (cheap "last" capture).
    ``edit(index, hidden)``, at the indices of ``edited``, returns the state that goes on in the pass (and is kept).
    ``taken()`` returns index -> tensor [B, kept, H] on CPU.
    """

    def __init__(
        self,
        base: Any,
        blocks: Sequence[Any],
        indices: Sequence[int],
        final: Any = None,
        edit: Callable[[int, Any], Any] | None = None,
        edited: Sequence[int] = (),
    ) -> None:
        self.rows: list[int] | None = None
        self.replace = False
        self.enabled = True
        self._kept: dict[int, list[Any]] = {i: [] for i in indices}
        self._edit = edit
        self._edited = set(edited) if edit is not None else set()
        self._handles: list[Any] = []
        n = len(blocks)
        final = base if final is None else final
        for i in sorted({*indices, *self._edited}):
            if i == 0:
                self._handles.append(blocks[0].register_forward_pre_hook(self._pre_hook(0), with_kwargs=True))
            elif i == n:
                self._handles.append(final.register_forward_hook(self._hook(i)))
            else:
                self._handles.append(blocks[i - 1].register_forward_hook(self._hook(i)))

    def _pass_on(self, index: int, tensor: Any) -> Any:
        """``tensor`` edited where asked, kept where asked; what goes on in the pass (None: unchanged)."""
        changed = self._edit(index, tensor) if index in self._edited and self._edit is not None else None
        if index in self._kept and self.enabled:
            t = (tensor if changed is None else changed).detach()
            if self.rows is not None:
                t = t[:, self.rows]
            t = t.to("cpu", copy=True)
            if self.replace:
                self._kept[index] = [t]
            else:
                self._kept[index].append(t)
        return changed

    def _pre_hook(self, index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            changed = self._pass_on(index, args[0] if args else kwargs["hidden_states"])
            if changed is None:
                return None
            if args:
                return (changed, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": changed}

        return hook

    def _hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            changed = self._pass_on(index, _hidden(output))
            if changed is None:
                return None
            if hasattr(output, "last_hidden_state"):
                output.last_hidden_state = changed
                return output
            return (changed, *output[1:]) if isinstance(output, tuple | list) else changed

        return hook

    def taken(self) -> dict[int, Any]:
        import torch

        return {i: torch.cat(chunks, dim=1) for i, chunks in self._kept.items() if chunks}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> StateRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
