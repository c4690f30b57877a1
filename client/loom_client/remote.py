"""A model on a Loom server that reads like TransformerLens's ``HookedTransformer``.

    model = RemoteModel("http://127.0.0.1:8080", "gpt2")
    logits, cache = model.run_with_cache("The Eiffel Tower is in", names_filter=["blocks.0.attn.hook_pattern"])
    cache["pattern", 0]                                 # [1, heads, query, key], as TransformerLens shapes it
    logits = model.run_with_hooks(text, fwd_hooks=[("blocks.3.attn.hook_z", ops.zero(heads=[5]))])
    model.generate("Once upon a time", max_new_tokens=20)

A notebook written for TransformerLens ports by changing the constructor and its hook functions into the server's
edits (``ops``: add, set, scale, ablate, zero): the server runs them where TransformerLens would run the hooks, in
forward order, each point read when it fires. Arrays are numpy, with TransformerLens's batch dimension of one.
Differences that remain (README, "Coming from TransformerLens"): the tokenizer's own BOS rule (TransformerLens's
``to_tokens`` always prepends one), the model's own unprocessed weights (TransformerLens's ``no_processing``), and
index -1 meaning after the final norm.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loom_client.client import DEFAULT_URL, LoomClient

# TransformerLens's get_act_name short names: the hook a name means in a block (or at the top).
SHORT = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn_in": "hook_attn_in",
    "q_input": "hook_q_input",
    "k_input": "hook_k_input",
    "v_input": "hook_v_input",
    "mlp_in": "hook_mlp_in",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "attn": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
}
# get_act_name's other spellings of a name, and its compact form "k6" / "scale4ln1" (name, layer, kind).
ALIASES = {
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_post": "post",
}
COMPACT = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")
RETURN_TYPES = ("logits", "loss", "both", None)  # HookedTransformer.forward's
KEYED = ("attn.hook_attn_scores", "attn.hook_pattern")  # TransformerLens shapes these [batch, head, query, key]


def act_name(name: str, layer: int | None = None, kind: str | None = None) -> str:
    """A hook point's full name from TransformerLens's short form (``utils.get_act_name``): ``("z", 3)`` is
    ``blocks.3.attn.hook_z``, ``("normalized", 2, "ln1")`` ``blocks.2.ln1.hook_normalized``, ``("scale", None,
    "ln_final")`` ``ln_final.hook_scale``, ``"k6"`` ``blocks.6.attn.hook_k``, ``"scale4ln1"``
    ``blocks.4.ln1.hook_scale``; a full name is returned as it is."""
    if "." in name or (name.startswith("hook_") and layer is None):
        return name
    compact = COMPACT.fullmatch(name) if layer is None and kind is None else None
    if compact is not None:
        name, layer, kind = compact[1], int(compact[2]), compact[3] or None
    name = ALIASES.get(name, name)
    if name in ("normalized", "scale"):
        where = kind or ("ln_final" if layer is None else "ln1")
        return f"{where}.hook_{name}" if layer is None else f"blocks.{layer}.{where}.hook_{name}"
    if name not in SHORT:
        raise KeyError(f"{name!r} is not a hook name TransformerLens's get_act_name knows; one of {sorted(SHORT)}")
    hook = SHORT[name]
    if name in ("embed", "pos_embed"):
        return hook
    if layer is None:
        raise KeyError(f"{name!r} names a point in every block: give its layer, ({name!r}, 0)")
    return f"blocks.{layer}.{hook}"


class ops:
    """The server's edits, as a hook function's job: each returns the edit's fields without its site."""

    @staticmethod
    def add(vector: Any, scale: float = 1.0, positions: Any = "all", heads: Sequence[int] | None = None) -> dict:
        return _op("add", vector=np.asarray(vector, dtype=np.float32), scale=scale, positions=positions, heads=heads)

    @staticmethod
    def set(vector: Any, positions: Any = "all", heads: Sequence[int] | None = None) -> dict:
        return _op("set", vector=np.asarray(vector, dtype=np.float32), positions=positions, heads=heads)

    @staticmethod
    def scale(factor: float, positions: Any = "all", heads: Sequence[int] | None = None) -> dict:
        return _op("scale", scale=factor, positions=positions, heads=heads)

    @staticmethod
    def ablate(directions: Any, positions: Any = "all", heads: Sequence[int] | None = None) -> dict:
        return _op("ablate", vector=np.asarray(directions, dtype=np.float32), positions=positions, heads=heads)

    @staticmethod
    def zero(positions: Any = "all", heads: Sequence[int] | None = None) -> dict:
        return _op("zero", positions=positions, heads=heads)


def _op(op: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, **{k: v for k, v in fields.items() if v is not None}}


@dataclass(frozen=True)
class Config:
    """What TransformerLens's ``model.cfg`` says, as far as the server's sites tell it."""

    model_name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_key_value_heads: int
    d_mlp: int | None


class ActivationCache(dict):
    """Arrays by hook name; ``cache["resid_pre", 3]``, ``cache["resid_post", -1]`` (the last block),
    ``cache["normalized", 1, "ln2"]``, ``cache["pattern2"]`` and ``cache["embed"]`` take TransformerLens's short
    forms, as its ``ActivationCache`` does."""

    def __init__(self, *args: Any, n_layers: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_layers = n_layers

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, str) and key not in self:
            key = act_name(key)
        elif isinstance(key, tuple):
            name, *rest = key
            if rest and isinstance(rest[0], int) and rest[0] < 0 and self.n_layers is not None:
                rest[0] += self.n_layers  # TransformerLens counts a negative layer from the last block
            key = act_name(name, *rest)
        return super().__getitem__(key)


class RemoteModel:
    """One model of a Loom server, read and edited as TransformerLens's ``HookedTransformer`` is.

    ``input`` is a text (a batch of one) or a list of texts of the same token count (a batch). The texts are
    tokenized with the model's own rule (``add_special_tokens``: the tokenizer's special tokens, True by default).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        name: str = "",
        *,
        api_key: str | None = None,
        client: LoomClient | None = None,
        add_special_tokens: bool = True,
        **load: Any,
    ) -> None:
        if not name:
            raise ValueError("RemoteModel(url, name): name the model (an id or path the server loads)")
        self.client = client or LoomClient(url, api_key=api_key)
        self.name = name
        self.add_special_tokens = add_special_tokens
        self._hooks: list[tuple[Any, dict[str, Any]]] = []
        self.client.load_model(name, **load)
        listing = self.client.sites(name)
        self.hook_points: dict[str, list[int]] = listing["sites"]
        self.unavailable: dict[str, str] = listing.get("unavailable", {})
        self.cfg = self._config(listing)

    def _config(self, listing: dict[str, Any]) -> Config:
        sites = listing["sites"]
        z, k = sites.get("blocks.0.attn.hook_z"), sites.get("blocks.0.attn.hook_k")
        post = sites.get("blocks.0.mlp.hook_post")
        return Config(
            model_name=self.name,
            n_layers=int(listing["num_layers"]),
            d_model=int(listing["hidden_state_indices"]["shape"][0]),
            n_heads=z[0] if z else 0,
            d_head=z[1] if z else 0,
            n_key_value_heads=k[0] if k else 0,
            d_mlp=post[0] if post else None,
        )

    # -- TransformerLens's entry points ------------------------------------------------------------------------

    def run_with_cache(
        self,
        input: str | list[str],
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        fwd_hooks: Sequence[tuple[Any, dict[str, Any]]] = (),
        return_type: str | None = "logits",
    ) -> tuple[Any, ActivationCache]:
        """(the forward's answer, the cache of the points ``names_filter`` selects: every point when None), the
        edits of ``fwd_hooks`` (and of an enclosing ``hooks``) applied. The answer is TransformerLens's for
        ``return_type``: "logits" [batch, pos, vocab], "loss" (the mean next-token cross-entropy), "both"
        (logits, loss), or None."""
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type: one of {RETURN_TYPES}, not {return_type!r}")
        names = self._names(names_filter)
        logits_wanted = return_type is not None
        rows = [self._extract(text, names, fwd_hooks, logits_wanted) for text in _texts(input)]
        cache = ActivationCache(n_layers=self.cfg.n_layers)
        for name in names:
            cache[name] = _stack([_tl_shape(name, r["sequence_hidden_states"][name]) for r in rows], name)
        if not logits_wanted:
            return None, cache
        logits = _stack([r["logits"] for r in rows], "logits")
        if return_type == "logits":
            return logits, cache
        loss = _next_token_loss(logits, np.asarray([r["token_ids"] for r in rows]))
        return (loss if return_type == "loss" else (logits, loss)), cache

    def run_with_hooks(
        self,
        input: str | list[str],
        fwd_hooks: Sequence[tuple[Any, dict[str, Any]]] = (),
        return_type: str | None = "logits",
    ) -> Any:
        """The logits [batch, pos, vocab] (or what ``return_type`` asks for, as ``run_with_cache``) with the edits
        of ``fwd_hooks``: (a hook name, or a filter on names, and an edit from ``ops``)."""
        return self.run_with_cache(input, names_filter=[], fwd_hooks=fwd_hooks, return_type=return_type)[0]

    def __call__(self, input: str | list[str], return_type: str | None = "logits") -> Any:
        return self.run_with_hooks(input, (), return_type)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[Any, dict[str, Any]]] = ()) -> Iterator[RemoteModel]:
        """Every call inside applies ``fwd_hooks`` (TransformerLens's ``with model.hooks(fwd_hooks=...)``)."""
        self._hooks.extend(fwd_hooks)
        try:
            yield self
        finally:
            del self._hooks[len(self._hooks) - len(fwd_hooks) :]

    def generate(
        self,
        input: str,
        max_new_tokens: int = 10,
        temperature: float = 0.0,
        fwd_hooks: Sequence[tuple[Any, dict[str, Any]]] = (),
        **fields: Any,
    ) -> str:
        """The prompt and its continuation as one string (TransformerLens's ``generate`` on a string); the edits
        of ``fwd_hooks`` apply at every step (``positions`` in an edit: prompt, generated or all)."""
        answer = self.client.generate(
            self.name,
            input,
            max_tokens=max_new_tokens,
            temperature=temperature,
            add_special_tokens=self.add_special_tokens,
            interventions=self._edits(fwd_hooks),
            **fields,
        )
        return input + answer["text"]

    def weight(self, name: str) -> np.ndarray:
        """A weight by TransformerLens's name (``blocks.3.attn.W_O``) or the model's own, as numpy."""
        return self.client.weights(self.name, [name])["weights"][name]

    @property
    def W_U(self) -> np.ndarray:
        return self.weight("W_U")

    @property
    def W_E(self) -> np.ndarray:
        return self.weight("W_E")

    def logit_attribution(self, input: str, target: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """POST /logit_attribution of ``input``: TransformerLens's decompose_resid / stack_head_results through
        apply_ln_to_stack, onto the target's unembedding direction, in one call."""
        return self.client.logit_attribution(
            self.name, target, text=input, add_special_tokens=self.add_special_tokens, **fields
        )

    def to_tokens(self, input: str) -> np.ndarray:
        """The token ids [1, pos] the server runs for ``input``."""
        return np.asarray([self._tokenized(input)["token_ids"]])

    def to_str_tokens(self, input: str) -> list[str]:
        return list(self._tokenized(input)["tokens"])

    # -- the requests ----------------------------------------------------------------------------------------------

    def _tokenized(self, text: str) -> dict[str, Any]:
        return self.client.extract(
            self.name, text, hidden_state_layers=[-1], add_special_tokens=self.add_special_tokens
        )

    def _extract(self, text: str, names: list[str], fwd_hooks: Any, logits: bool) -> dict[str, Any]:
        return self.client.extract(
            self.name,
            text,
            hidden_state_layers=names or [-1],
            positions="all",
            return_logits=logits,
            add_special_tokens=self.add_special_tokens,
            interventions=self._edits(fwd_hooks),
        )

    def _names(self, names_filter: Any) -> list[str]:
        if names_filter is None:
            return list(self.hook_points)
        if callable(names_filter):
            return [name for name in self.hook_points if names_filter(name)]
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        return [act_name(*n) if isinstance(n, tuple) else n for n in names_filter]

    def _edits(self, fwd_hooks: Any) -> list[dict[str, Any]]:
        out = []
        for where, edit in [*self._hooks, *fwd_hooks]:
            names = [name for name in self.hook_points if where(name)] if callable(where) else [where]
            out += [{"site": act_name(*n) if isinstance(n, tuple) else n, **edit} for n in names]
        return out


def _texts(input: Any) -> list[str]:
    if isinstance(input, str):
        return [input]
    if isinstance(input, list | tuple) and input and all(isinstance(t, str) for t in input):
        return list(input)
    raise TypeError(
        "input: a text or a list of texts (the server tokenizes with the model's own tokenizer; token ids are not "
        "taken here, see 'Coming from TransformerLens' in the README)"
    )


def _tl_shape(name: str, value: np.ndarray) -> np.ndarray:
    """A point's rows [pos, ...] as TransformerLens shapes one batch row: pattern and scores [head, query, key]."""
    return np.swapaxes(value, 0, 1) if name.endswith(KEYED) else value


def _next_token_loss(logits: np.ndarray, tokens: np.ndarray) -> float:
    """TransformerLens's ``lm_cross_entropy_loss``: minus the mean log-probability of each next token, over the batch
    and every position but the last (in float64, from the float32 logits)."""
    wide = logits[:, :-1].astype(np.float64)
    top = wide.max(-1, keepdims=True)
    log_norm = np.log(np.exp(wide - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(wide, tokens[:, 1:, None], axis=-1)[..., 0]
    return float((log_norm - picked).mean())


def _stack(rows: list[np.ndarray], what: str) -> np.ndarray:
    if len({r.shape for r in rows}) > 1:
        raise ValueError(f"{what}: the texts have different token counts, so their rows do not stack")
    return np.stack(rows)
