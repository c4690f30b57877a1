"""What the server reads out of states where they already are: the logit lens, stored linear probes and sparse
autoencoders, and the rules that stop a generation on a probe's score.

A request's ``Readouts`` resolve against the loaded model into a ``Plan``: the extra states to capture (layer
indices keyed ``~i`` so they never mix with the answer's ``hidden_states``, hook points by name) and how to read
them. Scores are computed from the captured CPU states in float64; the lens runs the model's own final norm and LM
head (``LoadedModel.unembed``).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from loom_interp.stores import Stored, TensorStore
from loom_kernel import (
    InvalidField,
    LayerSel,
    LoadedModel,
    Unsupported,
    chars_per_token,
    check_site,
    echo,
    fit_text,
    resolve_layers,
    split_sites,
    token_texts,
)

LINEAR_ACTIVATIONS = ("linear", "sigmoid", "softmax")
SAE_ACTIVATIONS = ("relu", "jumprelu", "topk")
KINDS = ("linear", "sae", "tuned_lens")
DEFAULT_TOP_FEATURES = 16
MAX_LABEL_CHARS = 128
LABEL_RULE = f"a name of at most {MAX_LABEL_CHARS} characters"
MAX_TOP_FEATURES = 1024  # features an SAE's answer may list per position
MAX_LENS_TOP_K = 100
NUMBER_BYTES = 24  # a float in JSON, with its separator
ENTRY_BYTES = 64  # {"token_id": ..., "logprob": ...} or {"index": ..., "value": ...} without a token's text


@attrs.define(frozen=True)
class Readouts:
    """``lens``: {"layers", "top_k", "tokens"}; ``probes``: stored probe names; ``stop_when``: rules
    {"probe", "label", "above"}."""

    lens: Any = None
    probes: tuple[str, ...] = ()
    stop_when: tuple[Any, ...] = ()
    store: TensorStore | None = None
    owner: str = ""  # whose names these are (an API key's owner; "" without keys)

    def __bool__(self) -> bool:
        return self.lens is not None or bool(self.probes) or bool(self.stop_when)

    def plan(self, model: LoadedModel) -> Plan:
        """Every name and shape checked against ``model``: 422s name ``logit_lens.*``, ``probes[i]``,
        ``stop_when[i].*``."""
        plan = Plan()
        if self.lens is not None:
            tuned = self.find(self.lens.tuned, "logit_lens.tuned") if self.lens.tuned is not None else None
            plan.add_lens(model, self.lens, tuned)
        for i, name in enumerate(self.probes):
            if name in plan.items:  # named twice: read once
                continue
            item = plan.items[name] = self.find(name, f"probes[{i}]")
            plan.probes.append((name, plan.state_for(probe_site(item, model, f"probes[{i}]"))))
        for i, rule in enumerate(self.stop_when):
            at = f"stop_when[{i}]"
            item = self.find(rule.probe, f"{at}.probe")
            key = plan.state_for(probe_site(item, model, f"{at}.probe"))
            plan.stops.append((rule, item, key, column(item, rule.label, f"{at}.label")))
        return plan

    def find(self, name: str, field: str) -> Stored:
        item = self.store.find(name, self.owner) if self.store is not None else None
        if item is None:
            known = self.store.names(self.owner) if self.store is not None else []
            raise InvalidField(f"{field}: no probe named {echo(name)}", field=field, allowed=known)
        return item


@attrs.define
class Plan:
    layers: list[LayerSel] = attrs.field(factory=list)  # layer indices, keyed by the index
    sites: list[str] = attrs.field(factory=list)  # extra hook points, keyed by name
    # (answer key, state key, already normalized, the tuned lens's translator (weight, bias) or None)
    lens: list[tuple[str, str, bool, Any]] = attrs.field(factory=list)
    lens_top_k: int = 5
    lens_tokens: list[tuple[str, int]] = attrs.field(factory=list)
    probes: list[tuple[str, str]] = attrs.field(factory=list)  # (probe name, state key)
    items: dict[str, Stored] = attrs.field(factory=dict)
    stops: list[tuple[Any, Stored, str, int]] = attrs.field(factory=list)  # (rule, probe, state key, column)

    def state_for(self, site: int | str) -> str:
        """The key under which the states of ``site`` (an index made non-negative, or a name) are captured."""
        if isinstance(site, int):
            key = str(site)
            if all(sel.key != key for sel in self.layers):
                self.layers.append(LayerSel(key=key, index=site))
            return key
        if site not in self.sites:
            self.sites.append(site)
        return site

    def add_lens(self, model: LoadedModel, spec: Any, tuned: Stored | None = None) -> None:
        if model.unembed is None:
            raise Unsupported(
                f"logit_lens: {model.ref.id!r} has no LM head and final norm the loader knows to read states through "
                f"({model.kind} model)",
                field="logit_lens",
            )
        if not 1 <= spec.top_k <= MAX_LENS_TOP_K:
            raise InvalidField(
                f"logit_lens.top_k: {spec.top_k} is out of range",
                field="logit_lens.top_k",
                allowed=f"1 to {MAX_LENS_TOP_K}",
            )
        self.lens_top_k = spec.top_k
        indices, names = split_sites(spec.layers)
        n = model.num_layers
        if tuned is not None:
            check_tuned_lens(tuned, model, bool(names))
        for sel in resolve_layers(indices, n, field="logit_lens.layers") if indices != [] else ():
            # Index N is the final norm's output already (where the model has one); the LM head reads it as it is.
            # A tuned lens has a translator for each index below N; at N it is the model's own logits.
            translator = translator_of(tuned, sel.index) if tuned is not None and sel.index < n else None
            self.lens.append((sel.key, self.state_for(sel.index), sel.index == n and has_final_norm(model), translator))
        for name in names:
            site, shape = check_site(name, model, "logit_lens.layers")
            if shape != (model.hidden_size,):
                raise InvalidField(
                    f"logit_lens.layers: {name} is not a residual-width site",
                    field="logit_lens.layers",
                    allowed="hidden-state indices and hook points of the model's width",
                )
            self.lens.append((name, self.state_for(site), name == "ln_final.hook_normalized", None))
        for i, text in enumerate(spec.tokens or ()):
            self.lens_tokens.append((text, one_token(model, text, f"logit_lens.tokens[{i}]")))

    @property
    def streams(self) -> bool:
        return bool(self.lens or self.probes)

    def bytes_per_position(self, model: LoadedModel) -> int:
        """An upper bound of the JSON bytes ``read`` gives one position: every lens entry (its ``top_k`` tokens,
        each with a text of up to the vocabulary's longest, and the tokens it follows), every probe's scores, every
        SAE's listed features with their values (its ``top_features``, at most its width) and errors."""
        text = 2 * chars_per_token(model)  # a token's text in JSON, escapes included
        lens = (self.lens_top_k * (ENTRY_BYTES + text) + len(self.lens_tokens) * 2 * NUMBER_BYTES) * len(self.lens)
        probes = 0
        for name, _ in self.probes:
            item = self.items[name]
            if item.meta["kind"] == "sae":
                probes += top_features(item) * ENTRY_BYTES + 3 * NUMBER_BYTES
            else:
                probes += int(item.tensors["weight"].shape[0]) * NUMBER_BYTES
        return lens + probes + (len(self.lens) + len(self.probes)) * NUMBER_BYTES  # each entry's position

    def read(self, model: LoadedModel, states: dict[str, Any], positions: list[int] | None) -> dict[str, Any]:
        """``logit_lens`` and ``probe_scores`` of one row's states at ``positions`` (each state [P, ...]; a token
        event's one state has no ``positions``)."""
        where = {} if positions is None else {"positions": positions}
        out: dict[str, Any] = {}
        if self.lens:
            out["logit_lens"] = {
                key: {**where, **self._lens(model, states[state], normalized, translator)}
                for key, state, normalized, translator in self.lens
            }
        if self.probes:
            out["probe_scores"] = {
                name: {**where, **score(self.items[name], states[state])} for name, state in self.probes
            }
        return out

    def _lens(self, model: LoadedModel, states: Any, normalized: bool, translator: Any) -> dict[str, Any]:
        import torch

        assert model.unembed is not None
        if translator is not None:  # tuned-lens's transform_hidden: the residual plus its affine translation
            weight, bias = translator
            states = states + torch.nn.functional.linear(states.float(), weight, bias).to(states.dtype)
        logp = torch.log_softmax(model.unembed(states, normalized).double(), dim=-1)
        values, ids = torch.topk(logp, min(self.lens_top_k, logp.shape[-1]), dim=-1)
        tok = model.tokenizer

        def text(i: int) -> str:
            return token_texts(tok, [i])[0]

        answer: dict[str, Any] = {
            "top_k": [
                [{"token_id": int(i), "token": text(int(i)), "logprob": float(v)} for v, i in zip(vs, is_, strict=True)]
                for vs, is_ in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        }
        if self.lens_tokens:
            answer["tokens"] = {
                word: {
                    "token_id": tid,
                    "logprob": logp[:, tid].tolist(),
                    "rank": (logp > logp[:, tid : tid + 1]).sum(dim=-1).tolist(),
                }
                for word, tid in self.lens_tokens
            }
        return answer

    def stop(self, states: dict[str, Any]) -> dict[str, Any] | None:
        """The first rule whose probe's score of this one token crosses its bound, with the score; else None."""
        for rule, item, key, col in self.stops:
            value = float(raw_scores(item, states[key])[-1, col])
            if value > rule.above:
                return {"probe": rule.probe, "label": rule.label, "above": rule.above, "score": value}
        return None


def translator_of(item: Stored, index: int) -> tuple[Any, Any]:
    return item.tensors[f"layer_translators.{index}.weight"], item.tensors[f"layer_translators.{index}.bias"]


def translators(tensors: dict[str, Any]) -> int:
    """How many layers a tuned lens's tensors translate (``layer_translators.{i}.weight`` and ``.bias``)."""
    return sum(key.endswith(".weight") for key in tensors)


def check_tuned_lens(item: Stored, model: LoadedModel, names: bool) -> None:
    """A stored tuned lens, as ``logit_lens.tuned`` names it: made for this model's depth and width, read at
    hidden-state indices only (its translators are per index)."""
    field = "logit_lens.tuned"
    if item.meta["kind"] != "tuned_lens":
        raise InvalidField(
            f"{field}: {item.shown!r} is a {item.meta['kind']} probe, not a tuned lens",
            field=field,
            allowed="a name stored with POST /probes/{name}?kind=tuned_lens",
        )
    layers, width = translators(item.tensors), int(item.tensors["layer_translators.0.bias"].shape[0])
    if (layers, width) != (model.num_layers, model.hidden_size):
        raise InvalidField(
            f"{field}: {item.shown!r} translates {layers} layers of width {width}; this model has {model.num_layers} "
            f"of width {model.hidden_size}",
            field=field,
            allowed="a tuned lens trained for this model",
        )
    if names:
        raise InvalidField(
            "logit_lens.layers: a tuned lens reads hidden-state indices (its translators are per index), not hook "
            "points",
            field="logit_lens.layers",
            allowed="hidden-state indices",
        )


def has_final_norm(model: LoadedModel) -> bool:
    return isinstance((model.sites or {}).get("ln_final.hook_normalized"), tuple)


def one_token(model: LoadedModel, text: str, field: str) -> int:
    tok = model.tokenizer
    text = fit_text(model, text, field, tokens=1)
    ids = tok(text, add_special_tokens=False)["input_ids"] if tok is not None and text else []
    if len(ids) != 1:
        raise InvalidField(
            f"{field}: {echo(text)} is {len(ids)} tokens for this model's tokenizer ({echo(ids)}), not one",
            field=field,
            allowed="the text of one token, with its leading space where the tokenizer has one",
        )
    return int(ids[0])


# -- stored probes ---------------------------------------------------------------------------------------------


def site_of(meta: dict[str, str]) -> int | str:
    site = meta["site"]
    return int(site) if site.lstrip("-").isdigit() else site


def probe_site(item: Stored, model: LoadedModel, field: str) -> int | str:
    """The probe's site on ``model``, checked: it exists and its width is the probe's input width."""
    if item.meta["kind"] == "tuned_lens":
        raise InvalidField(
            f"{field}: {item.shown!r} is a tuned lens, which logit_lens.tuned reads",
            field=field,
            allowed="a linear probe or an SAE",
        )
    site, shape = check_site(site_of(item.meta), model, field)
    width = input_width(item)
    if len(shape) != 1 or shape[0] != width:
        raise InvalidField(
            f"{field}: probe {item.shown!r} reads {width} dimensions; {site} of this model has shape {list(shape)}",
            field=field,
            allowed="a probe made for this model's site",
        )
    return site


def input_width(item: Stored) -> int:
    return int(item.tensors["W_enc"].shape[0] if item.meta["kind"] == "sae" else item.tensors["weight"].shape[1])


def labels_of(item: Stored) -> list[str]:
    return json.loads(item.meta.get("labels", "[]"))


def column(item: Stored, label: str | int, field: str) -> int:
    """The score column a stop rule watches: a label's index for a linear probe, a feature index for an SAE."""
    count = item.tensors["W_enc"].shape[1] if item.meta["kind"] == "sae" else item.tensors["weight"].shape[0]
    labels = labels_of(item)
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < count:
        return label
    raise InvalidField(
        f"{field}: {echo(label)} is not a label of probe {item.shown!r}",
        field=field,
        allowed=labels if labels and item.meta["kind"] != "sae" else f"0 to {count - 1}",
    )


def raw_scores(item: Stored, x: Any) -> Any:
    """A linear probe's activated scores [P, C], or an SAE's feature activations [P, F], of states x [P, H]."""
    import torch

    x = x.double()
    t = {role: v.double() for role, v in item.tensors.items()}
    act = item.meta["activation"]
    if item.meta["kind"] != "sae":
        z = x @ t["weight"].T + t["bias"]
        return torch.sigmoid(z) if act == "sigmoid" else torch.softmax(z, -1) if act == "softmax" else z
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if act == "relu":
        return torch.relu(pre)
    if act == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"])
    top = torch.topk(pre, int(item.meta["k"]), dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def score(item: Stored, x: Any) -> dict[str, Any]:
    scores = raw_scores(item, x)
    if item.meta["kind"] != "sae":
        return {"labels": labels_of(item), "data": scores.tolist()}
    import torch

    k = min(top_features(item), scores.shape[-1])
    values, ids = torch.topk(scores, k, dim=-1)
    out: dict[str, Any] = {
        "top_features": [
            [{"index": int(i), "value": float(v)} for v, i in zip(vs, is_, strict=True) if v > 0]
            for vs, is_ in zip(values.tolist(), ids.tolist(), strict=True)
        ],
        "l0": (scores > 0).sum(-1).tolist(),
    }
    if "W_dec" in item.tensors:
        recon = scores @ item.tensors["W_dec"].double() + item.tensors["b_dec"].double()
        err = (x.double() - recon).norm(dim=-1)
        out["reconstruction_error"] = err.tolist()
        out["relative_error"] = (err / x.double().norm(dim=-1).clamp_min(1e-30)).tolist()
    return out


def top_features(item: Stored) -> int:
    """Features an SAE's answer lists per position: its stored ``top_features`` (checked on the way in), at most its
    width."""
    return min(int(item.meta.get("top_features", DEFAULT_TOP_FEATURES)), int(item.tensors["W_enc"].shape[1]))


def check_probe(tensors: dict[str, Any], meta: dict[str, Any], field: str = "") -> None:
    """A probe's tensors and fields against its kind and activation, made ready to store (``labels``, ``k`` and
    ``top_features`` as text); 422s name the tensor or field at fault."""
    kind, act = meta["kind"], meta["activation"]
    if kind not in KINDS:
        raise InvalidField(f"kind: {echo(kind)} is not a kind of probe", field="kind", allowed=list(KINDS))
    if kind == "tuned_lens":
        check_translators(tensors)
        for key in ("labels", "k", "top_features"):
            meta.pop(key, None)
        return
    if kind == "linear":
        need = {"weight": 2, "bias": 1}
        allowed = list(LINEAR_ACTIVATIONS)
    else:
        need = {"W_enc": 2, "b_enc": 1, "b_dec": 1} | ({"threshold": 1} if act == "jumprelu" else {})
        allowed = list(SAE_ACTIVATIONS)
    if act not in allowed:
        raise InvalidField(
            f"activation: {echo(act)} is not one of the {kind} activations", field="activation", allowed=allowed
        )
    for role, ndim in need.items():
        if role not in tensors:
            raise InvalidField(f"{role}: missing for a {kind} probe", field=role, allowed=f"a {ndim}-D tensor")
        if tensors[role].ndim != ndim:
            raise InvalidField(
                f"{role}: {tensors[role].ndim}-D, must be {ndim}-D", field=role, allowed=f"a {ndim}-D tensor"
            )
    if kind == "linear":
        if meta.get("top_features") is not None:
            raise InvalidField(
                "top_features: a linear probe answers every class; top_features is an SAE's", field="top_features"
            )
        c, h = tensors["weight"].shape
        _dim(tensors["bias"], 0, c, "bias", "[C], C the weight's rows")
        labels = meta.get("labels") or [str(i) for i in range(c)]
        if len(labels) != c or len(set(labels)) != c:
            raise InvalidField(
                f"labels: {len(labels)} distinct names for {c} classes", field="labels", allowed=f"{c} distinct names"
            )
        long = next((i for i, label in enumerate(labels) if len(label) > MAX_LABEL_CHARS), None)
        if long is not None:
            raise InvalidField(
                f"labels[{long}]: {len(labels[long])} characters", field=f"labels[{long}]", allowed=LABEL_RULE
            )
        meta["labels"] = json.dumps(labels)
        return
    h, f = tensors["W_enc"].shape
    _dim(tensors["b_enc"], 0, f, "b_enc", "[F], F the columns of W_enc")
    _dim(tensors["b_dec"], 0, h, "b_dec", "[H], H the rows of W_enc")
    if act == "jumprelu":
        _dim(tensors["threshold"], 0, f, "threshold", "[F]")
    if "W_dec" in tensors and list(tensors["W_dec"].shape) != [f, h]:
        raise InvalidField(f"W_dec: shape {list(tensors['W_dec'].shape)}", field="W_dec", allowed=f"[{f}, {h}]")
    if act == "topk":
        k = meta.get("k")
        if not _count(k, f):
            raise InvalidField(f"k: {echo(k)} for a topk SAE of {f} features", field="k", allowed=f"1 to {f}")
        meta["k"] = str(k)
    top = meta.get("top_features")
    if top is not None:
        most = min(f, MAX_TOP_FEATURES)
        if not _count(top, most):
            raise InvalidField(
                f"top_features: {echo(top)} for an SAE of {f} features",
                field="top_features",
                allowed=f"1 to {most} (the SAE's width, at most {MAX_TOP_FEATURES})",
            )
        meta["top_features"] = str(top)
    meta.pop("labels", None)


def check_translators(tensors: dict[str, Any]) -> None:
    """A tuned lens's tensors as tuned-lens's ``TunedLens`` names them: ``layer_translators.{i}.weight`` [d, d] and
    ``.bias`` [d] for every i from 0."""
    layers = translators(tensors)
    want = {f"layer_translators.{i}.{part}" for i in range(layers) for part in ("weight", "bias")}
    allowed = "layer_translators.{i}.weight [d, d] and layer_translators.{i}.bias [d], i from 0"
    odd = sorted(set(tensors) ^ want)
    if not layers or odd:
        what = f"tensor {echo(odd[0])}" if odd else "no translators"
        raise InvalidField(f"body: {what} does not fit a tuned lens", field="body", allowed=allowed)
    d = int(tensors["layer_translators.0.bias"].shape[0])
    for i in range(layers):
        w, b = tensors[f"layer_translators.{i}.weight"], tensors[f"layer_translators.{i}.bias"]
        if list(w.shape) != [d, d] or list(b.shape) != [d]:
            field = f"layer_translators.{i}"
            raise InvalidField(
                f"{field}: shapes {list(w.shape)} and {list(b.shape)}", field=field, allowed=f"[{d}, {d}] and [{d}]"
            )


def _count(value: Any, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def typed_meta(meta: dict[str, str]) -> dict[str, Any]:
    """A probe's metadata as a file keeps it (text) back to the types ``check_probe`` takes: ``k`` and
    ``top_features`` integers (as decimal digits, else a 422 naming them), ``labels`` a list."""
    out: dict[str, Any] = dict(meta)
    for key in ("k", "top_features"):
        if key in meta:
            text = meta[key].strip()
            if not text.isdecimal():
                raise InvalidField(
                    f"{key}: {echo(meta[key])} in the file's metadata is not a whole number",
                    field=key,
                    allowed="a positive integer",
                )
            out[key] = int(text)
    if "labels" in meta:
        try:
            labels = json.loads(meta["labels"])
        except ValueError:
            labels = None
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise InvalidField("labels: not a JSON list of names", field="labels", allowed="a JSON list of names")
        out["labels"] = labels
    return out


def check_stored_probe(item: Stored) -> None:
    """An entry read from the probes' directory, checked as one stored through the API is: a file that would fail
    every request naming it (a ``top_features`` of -5, a ``k`` of "abc") is not served."""
    if "kind" not in item.meta or "activation" not in item.meta or "site" not in item.meta:
        raise InvalidField("kind, activation and site: missing from the file's metadata", field="body")
    check_probe(dict(item.tensors), typed_meta(item.meta))


def _dim(t: Any, axis: int, want: int, role: str, allowed: str) -> None:
    if t.shape[axis] != want:
        raise InvalidField(f"{role}: shape {list(t.shape)}", field=role, allowed=allowed)


def feature_vector(store: TensorStore | None, owner: str, probe: str, index: int, field: str) -> tuple[int | str, Any]:
    """(the SAE's site, row ``index`` of its W_dec): what an intervention's ``feature`` adds."""
    item = Readouts(store=store, owner=owner).find(probe, f"{field}.probe")
    if item.meta["kind"] != "sae" or "W_dec" not in item.tensors:
        raise InvalidField(
            f"{field}.probe: {probe!r} is not an SAE with a decoder (W_dec)", field=f"{field}.probe", allowed=None
        )
    rows = item.tensors["W_dec"].shape[0]
    if not 0 <= index < rows:
        raise InvalidField(
            f"{field}.index: {index} is out of range", field=f"{field}.index", allowed=f"0 to {rows - 1}"
        )
    return site_of(item.meta), item.tensors["W_dec"][index]
