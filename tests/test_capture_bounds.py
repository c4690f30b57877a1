"""What /patch and /logit_attribution capture, and its bound: ``capture_bytes`` against the bytes of the tensors a
pass really returns, the narrowed capture against transformers' own hidden states, and the 422 (never a 500) that
names the field to shrink and a bound that then passes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from loom_interp.bounds import CAPTURE_MAX_MB, capture_bytes
from test_models import app_with, concurrent_client

from loom_kernel import Batch, Capture, Gradient, LoadOptions, resolve_layers
from loom_kernel.cli import build_parser, build_settings
from loom_kernel.config import ConfigError, load_settings
from loom_kernel.resolve import resolve_model

LONG_CLEAN, LONG_CORRUPTED = "The cat sat on the mat. " * 12, "The cap sat on the mat. " * 12


@pytest.fixture(scope="module")
def loaded(tiny_models: Any) -> dict[str, Any]:
    from loom_kernel.plugins import create_plugin_manager

    pm = create_plugin_manager()
    return {
        arch: (
            pm.hook,
            pm.hook.load(
                model=resolve_model(str(tiny_models[arch])), loader="transformers", options=LoadOptions(), kernel=None
            ),
        )
        for arch in ("llama", "gpt2")
    }


def held(rows: list[Any]) -> dict[str, int]:
    """The bytes of the tensors the rows hold."""

    def size(ts: Any) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    return {
        "states": size(t for r in rows for t in r.states.values()),
        "gradients": size(t for r in rows for t in r.gradients.values()),
        "logits": size(r.logits for r in rows if r.logits is not None),
    }


def route_captures(m: Any) -> dict[str, Capture]:
    n = m.num_layers
    return {
        "dla heads": Capture(sites=tuple(m.attribution.sites("heads")), positions=[-1], logits=True),
        "dla layers at -2": Capture(sites=tuple(m.attribution.sites("layers")), positions=[-2], logits=True),
        "patch clean resid_pre": Capture(sites=tuple(f"blocks.{i}.hook_resid_pre" for i in range(n)), positions="all"),
        "patch clean z at 1, 3": Capture(sites=tuple(f"blocks.{i}.attn.hook_z" for i in range(n)), positions=[1, 3]),
        "attribution pattern": Capture(
            sites=tuple(f"blocks.{i}.attn.hook_pattern" for i in range(n)),
            positions="all",
            logits=True,
            gradient=Gradient(metric="logprob", tokens=(5,)),
        ),
        "attribution result at 2": Capture(
            layers=tuple(resolve_layers([1], n)),
            sites=tuple(f"blocks.{i}.attn.hook_result" for i in range(n)),
            positions=[2],
            logits=True,
            gradient=Gradient(metric="logit_diff", tokens=(5, 6)),
        ),
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_bytes_is_what_the_pass_returns(loaded, arch):
    """States and gradients count twice (the padded batch and each row's copy coexist as the pass ends), logits
    once: with token ids of one length the estimate is exact."""
    hooks, m = loaded[arch]
    ids = tuple(m.tokenizer(LONG_CLEAN)["input_ids"])
    for name, capture in route_captures(m).items():
        batch = Batch(token_ids=(ids, ids) if capture.gradient is not None else (ids,))
        rows = hooks.forward_with_states(model=m, batch=batch, capture=capture).rows
        got = held(rows)
        # Besides the logits, the pass keeps the final norm's output [rows, kept, d] they are read from (and, with
        # a gradient, its gradient).
        final = sum(len(r.positions) for r in rows) * m.hidden_size * 4 * (2 if capture.gradient else 1)
        want = capture_bytes(m, batch, capture)
        assert want == {
            "states": 2 * got["states"],
            "gradients": 2 * got["gradients"],
            "attentions": 0,
            "logits": got["logits"] + (final if capture.logits else 0),
            "graph": want["graph"],  # an estimate: test_the_graph_estimate_covers_what_autograd_keeps
        }, name
        assert (want["graph"] > 0) == (capture.gradient is not None), name
    # Texts of several lengths: the estimate (a text as a token a character, padded) is never below.
    texts = ("hello there", LONG_CLEAN)
    for name, capture in route_captures(m).items():
        if capture.gradient is None:
            got = held(hooks.forward_with_states(model=m, batch=Batch(texts=texts), capture=capture).rows)
            want = capture_bytes(m, Batch(texts=texts), capture)
            assert all(want[k] >= (2 if k == "states" else 1) * got[k] for k in got), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_graph_estimate_covers_what_autograd_keeps(loaded, arch):
    """A gradient pass's graph as torch's own saved-tensor hooks count it (each storage once, the frozen weights
    left out) is within the estimate, and the estimate at most three times it: under SDPA (per-head results read)
    and under eager attention (patterns read, each head's [T, T] kept)."""
    hooks, m = loaded[arch]
    ids = tuple(m.tokenizer(LONG_CLEAN)["input_ids"])
    batch = Batch(token_ids=(ids, ids))
    weights = {p.untyped_storage().data_ptr() for p in m.model.parameters()}
    for name in ("attribution pattern", "attribution result at 2"):
        capture = route_captures(m)[name]
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor, kept: dict[int, int] = kept) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hooks.forward_with_states(model=m, batch=batch, capture=capture)
        got, want = sum(kept.values()), capture_bytes(m, batch, capture)["graph"]
        assert got <= want <= 3 * got, (name, got, want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_listed_positions_keep_those_rows_only_and_equal_transformers(loaded, arch):
    """Rows of different lengths in one pass, each keeping its own listed positions and its last: the states equal
    the full capture's rows there and transformers' own hidden states of the row run alone; logits the LM head's."""
    hooks, m = loaded[arch]
    texts = ("hello there friend", LONG_CLEAN)
    sites = ("blocks.0.attn.hook_result", "blocks.1.attn.hook_pattern", "ln_final.hook_scale")
    layers = tuple(resolve_layers([1, -1], m.num_layers))
    some = hooks.forward_with_states(
        model=m, batch=Batch(texts=texts), capture=Capture(layers=layers, sites=sites, positions=[0, -2], logits=True)
    ).rows
    full = hooks.forward_with_states(
        model=m, batch=Batch(texts=texts), capture=Capture(layers=layers, sites=sites, positions="all")
    ).rows
    for row, whole in zip(some, full, strict=True):
        total = len(row.token_ids)
        assert row.positions == [0, total - 2, total - 1]
        for key, t in row.states.items():
            torch.testing.assert_close(t, whole.states[key][row.positions], rtol=0, atol=0)
        with torch.inference_mode():
            out = m.model(input_ids=torch.tensor([row.token_ids]), output_hidden_states=True)
        torch.testing.assert_close(row.states["-1"], out.hidden_states[-1][0, row.positions], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row.logits, out.logits[0, [0, total - 2]].float(), rtol=1e-4, atol=1e-4)


def test_the_bound_is_the_interp_plugins_setting():
    options = [CAPTURE_MAX_MB]
    assert CAPTURE_MAX_MB.of(load_settings(env={}, options=options)) == 4096
    env = {"LOOM_INTERVENTIONS_MAX_CAPTURE_MB": "12.5"}
    assert CAPTURE_MAX_MB.of(load_settings(env=env, options=options)) == 12.5
    args = build_parser(options).parse_args(["serve", "--max-capture-mb", "3"])
    assert CAPTURE_MAX_MB.of(build_settings(args, env={}, options=options)) == 3
    assert "--max-capture-mb" in _serve_help(options)
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError) as e:
            load_settings(env={"LOOM_INTERVENTIONS_MAX_CAPTURE_MB": bad}, options=options)
        assert e.value.field == "interventions_max_capture_mb"


def _serve_help(options: list[Any]) -> str:
    parser = build_parser(options)
    action = next(a for a in parser._subparsers._group_actions if a.choices)
    return action.choices["serve"].format_help()


async def test_oversized_captures_are_a_422_naming_the_field_and_a_bound_that_passes(tiny_models):
    path = str(tiny_models["llama"])
    patch = {
        "model": path,
        "clean": LONG_CLEAN,
        "corrupted": LONG_CORRUPTED,
        "sites": "pattern",
        "metric": {"type": "logprob", "token": "."},
        "method": "attribution",
    }
    texts = [f"text number {i} " * (1 + i % 5) for i in range(64)]
    dla = {"model": path, "texts": texts, "target": {"token": " the"}, "components": "heads"}
    exact = {**patch, "method": "exact", "sites": "resid_pre", "positions": list(range(40))}
    # Attribution patching keeps a graph for its backward pass that grows with the text alone: under a bound below
    # it the field to shrink is the text (a short one passes); with room for it, the positions.
    async with concurrent_client(app_with(options={"interventions_max_capture_mb": 0.5})) as c:
        r = await c.post("/patch", json=patch)
        got = r.json()
        assert r.status_code == 422 and got["field"] == "clean" and got["allowed"] == "a shorter text", got
        graph, total = got["parts"]["graph"], got["estimate_bytes"]
        assert 0 < graph < total, got
        short = {**patch, "clean": "The cat sat", "corrupted": "The cap sat"}
        r = await c.post("/patch", json=short)
        assert r.status_code == 200, r.text
    for limit, route, body, field in [
        ((graph + (total - graph) / 2) / 2**20, "/patch", patch, "positions"),
        (0.03, "/patch", exact, "positions"),
        (0.25, "/logit_attribution", dla, "texts"),
    ]:
        async with concurrent_client(app_with(options={"interventions_max_capture_mb": limit})) as c:
            r = await c.post(route, json=body)
            assert r.status_code == 422, r.text
            got = r.json()
            assert got["field"] == field and got["title"] == "Capture too large", got
            assert got["estimate_bytes"] > got["limit_bytes"] == int(limit * 2**20), got
            assert got["parts"]["graph"] == (graph if body is patch else 0), got
            fits = int(got["allowed"].split()[2])  # "at most N <unit> with these sites": N pass, N + 1 do not
            for n, status in ((fits, 200), (fits + 1, 422)):
                smaller = {**body, "texts": texts[:n]} if field == "texts" else {**body, "positions": list(range(n))}
                assert (await c.post(route, json=smaller)).status_code == status, (route, n)
    # One position of these sites is already too many: the field to shrink is the sites.
    async with concurrent_client(app_with(options={"interventions_max_capture_mb": 0.001})) as tiny:
        r = await tiny.post("/patch", json={**exact, "positions": [0]})
        assert r.status_code == 422 and r.json()["field"] == "sites", r.text
        assert (await tiny.get("/health")).status_code == 200
    # 0 turns the bound off.
    async with concurrent_client(app_with(options={"interventions_max_capture_mb": 0})) as free:
        assert (await free.post("/patch", json=patch)).status_code == 200


async def test_patch_on_an_encoder_names_the_missing_lm_head(tiny_models):
    async with concurrent_client(app_with()) as c:
        body = {
            "model": str(tiny_models["bert"]),
            "clean": "The cat sat",
            "corrupted": "The cap sat",
            "sites": [1],
            "metric": {"type": "logprob", "token": "."},
        }
        for method in ("exact", "attribution"):
            r = await c.post("/patch", json={**body, "method": method})
            assert r.status_code == 422 and r.json()["field"] == "model", r.text
            detail = r.json()["detail"]
            assert "cannot generate" not in detail and "causal LM head" in detail, detail


def test_a_merged_calls_logits_are_cut_back_to_its_positions():
    """Merged with a call of other positions, a pass keeps every position: each call gets its own logits back."""
    from loom_kernel.merging import merge_captures, restrict
    from loom_kernel.types import SequenceOutput

    total, vocab = 6, 5
    logits = torch.arange(total * vocab, dtype=torch.float32).reshape(total, vocab)
    states = {"hook_embed": torch.zeros(total, 2)}
    row = SequenceOutput(
        token_ids=list(range(total)), prompt_tokens=total, logits=logits, states=states, gradients=states
    )
    one = Capture(sites=("hook_embed",), positions=[-2], logits=True)
    merged = merge_captures([one, Capture(sites=("hook_embed",), positions="all")])
    assert merged.positions == "all"
    torch.testing.assert_close(restrict(row, one, merged).logits, logits[[total - 2]])
    graded = Capture(
        sites=("hook_embed",), positions=[1], logits=True, gradient=Gradient(metric="logprob", tokens=(0,))
    )
    merged = merge_captures([graded, Capture(sites=("hook_embed",), positions=[2], gradient=graded.gradient)])
    torch.testing.assert_close(restrict(row, graded, merged).logits, logits[[1, total - 1]])


@pytest.mark.parametrize("first", ["reader", "scorer"])
def test_a_scored_run_merged_with_a_listed_capture_gets_its_last_logits(loaded, first):
    """A /patch run (logits at the last position, no states) merged with a call that keeps listed positions only
    (an /extract or /logit_attribution): in either order each gets its own logits, the scored run's at its last
    token as transformers' own model gives them, not those at the other call's position."""
    from loom_kernel.merging import merge_captures, restrict

    hooks, m = loaded["gpt2"]
    reader = Capture(layers=tuple(resolve_layers([1], m.num_layers)), positions=[1], logits=True)
    scorer = Capture(logits=True, positions="last")
    captures = [reader, scorer] if first == "reader" else [scorer, reader]
    merged = merge_captures(captures)
    texts = ("hello there friend", "the cat sat on the mat and looked at the")
    rows = hooks.forward_with_states(model=m, batch=Batch(texts=texts), capture=merged).rows
    for row, capture in zip(rows, captures, strict=True):
        with torch.inference_mode():
            want = m.model(input_ids=torch.tensor([row.token_ids])).logits[0].float()
        at = [1] if capture is reader else [len(row.token_ids) - 1]
        torch.testing.assert_close(restrict(row, capture, merged).logits, want[at], rtol=1e-4, atol=1e-4)


def test_passes_keeping_tensors_at_other_positions_never_merge(loaded):
    """A pass keeps logits [vocab], states and attention at its positions only: merged with one keeping them
    elsewhere (or none) it would keep them at every position of every row, which neither request's bound counted,
    so such calls are never merged; calls keeping the same positions still are."""
    from loom_kernel.calls import Call, Ticket

    _, m = loaded["gpt2"]
    layers = tuple(resolve_layers([1], m.num_layers))
    captures = {
        "scored run": Capture(logits=True, positions="last"),
        "attribution at 1": Capture(sites=("blocks.0.hook_resid_post",), positions=[1], logits=True),
        "attribution at 2": Capture(sites=("blocks.0.hook_resid_post",), positions=[2], logits=True),
        "extract at 1": Capture(layers=layers, positions=[1]),
        "extract at 2": Capture(layers=layers, positions=[2]),
        "extract of the last": Capture(layers=layers, positions="last"),
        "extract of all": Capture(layers=layers, positions="all"),
        "pattern at 1": Capture(layers=layers, positions=[1], states=False, attention=True),
    }
    batch = Batch(token_ids=((1, 2, 3, 4),))

    def key(capture: Capture) -> tuple:
        return Call(pm=None, model=m, batch=batch, capture=capture, ticket=Ticket()).key()

    keys = {name: key(c) for name, c in captures.items()}
    # Those keeping the same positions may share a pass (its logits cost a row [vocab] per kept position); attention
    # weights run under another attention, so the pattern keeps a pass of its own.
    together = [
        {"scored run", "extract of the last"},
        {"attribution at 1", "extract at 1"},
        {"attribution at 2", "extract at 2"},
    ]
    for group in together:
        assert len({keys[name] for name in group}) == 1, group
    assert len(set(keys.values())) == len(keys) - len(together), keys
    other_layer = Capture(layers=tuple(resolve_layers([2], m.num_layers)), positions=[1])
    assert key(other_layer) == keys["extract at 1"]  # other layers at the same positions merge
    assert key(Capture(positions=[3])) == key(Capture(positions="last"))  # nothing per position kept: positions moot
    again = Call(pm=None, model=m, batch=batch, capture=Capture(logits=True, positions="last"), ticket=Ticket())
    assert again.key() == keys["scored run"]  # /patch's runs still merge with each other
