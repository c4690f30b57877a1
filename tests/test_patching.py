"""POST /patch against an in-process loop of patched forward passes on transformers' own modules."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from test_interventions import first, load, reference_points
from test_models import app_with, concurrent_client
from transformers import AutoConfig, AutoTokenizer

CLEAN, CORRUPTED = "The cat sat on the mat", "The cap sat on the mat"  # the same token count in both tokenizers


def in_process(
    path: str,
    arch: str,
    sites: list[Any],
    positions: list[int] | None,
    metric: dict,
    texts: tuple[str, str] = (CLEAN, CORRUPTED),
) -> dict[str, Any]:
    """The clean run with each site's output kept, then one corrupted forward pass per (site, position) with a hook
    that writes the clean value there."""
    net, tok = load(path, arch)
    points, _, _ = reference_points(net, arch)
    clean = tok(texts[0], return_tensors="pt")["input_ids"]
    corrupt = tok(texts[1], return_tensors="pt")["input_ids"]
    total = clean.shape[1]
    positions = list(range(total)) if positions is None else [p % total for p in positions]

    def score(logits: torch.Tensor) -> float:
        if metric["type"] == "logit_diff":
            good, bad = (tok(metric[k], add_special_tokens=False)["input_ids"][0] for k in ("correct", "incorrect"))
            return float(logits[good] - logits[bad])
        token = tok(metric["token"], add_special_tokens=False)["input_ids"][0]
        return float(torch.log_softmax(logits.double(), -1)[token])

    kept: dict[Any, torch.Tensor] = {}
    handles = []
    for site in sites:
        module, side = points[site]
        if side == "in":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, kw, s=site: kept.__setitem__(s, (a[0] if a else kw["hidden_states"]).clone()),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                module.register_forward_hook(lambda m, a, out, s=site: kept.__setitem__(s, first(out).clone()))
            )
    with torch.inference_mode():
        clean_m = score(net(clean).logits[0, -1])
    for h in handles:
        h.remove()
    with torch.inference_mode():
        corrupt_m = score(net(corrupt).logits[0, -1])
    matrix = []
    for site in sites:
        module, side = points[site]
        mid = str(site).endswith("hook_resid_mid")
        block_input: dict[str, torch.Tensor] = {}
        if mid:  # the stream between the sublayers is set through what attention adds to it: clean - resid_pre
            module, side = points[site.replace("hook_resid_mid", "hook_attn_out")]
            block = points[site.replace("hook_resid_mid", "hook_resid_pre")][0]
            stash = block.register_forward_pre_hook(
                lambda m, a, kw, s=block_input: s.__setitem__("x", a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            )
        row = []
        for p in positions:

            def put(
                h: torch.Tensor, site: Any = site, p: int = p, mid: bool = mid, s: dict = block_input
            ) -> torch.Tensor:
                h = h.clone()
                h[0, p] = kept[site][0, p] - (s["x"][0, p] if mid else 0)
                return h

            if side == "in":
                handle = module.register_forward_pre_hook(
                    lambda m, a, kw, put=put: (
                        ((put(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": put(kw["hidden_states"])})
                    ),
                    with_kwargs=True,
                )
            else:
                handle = module.register_forward_hook(
                    lambda m, a, out, put=put: (put(out[0]), *out[1:]) if isinstance(out, tuple) else put(out)
                )
            with torch.inference_mode():
                row.append(score(net(corrupt).logits[0, -1]))
            handle.remove()
        if mid:
            stash.remove()
        matrix.append(row)
    return {"clean": clean_m, "corrupted": corrupt_m, "patched": matrix, "positions": positions}


def assert_normalized(got: dict) -> None:
    """A /patch answer's ``normalized`` is its ``patched`` over its own clean and corrupted runs (each of which a test
    holds to its reference within 1e-5: the reference's normalization would differ by 1e-5 over the gap)."""
    clean, corrupted = got["metric"]["clean"], got["metric"]["corrupted"]
    want = (np.array(got["patched"]) - corrupted) / (clean - corrupted)
    np.testing.assert_allclose(np.array(got["normalized"]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("arch", "sites", "positions", "metric"),
    [
        ("llama", "resid_pre", None, {"type": "logprob", "token": "."}),
        (
            "gpt2",
            ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", 2],
            [4, -1],
            {"type": "logit_diff", "correct": " the", "incorrect": "."},
        ),
        ("llama", "resid_mid", [3, 4, 5], {"type": "logit_diff", "correct": " the", "incorrect": "."}),
    ],
)
async def test_patch_matrix_matches_an_in_process_loop_and_runs_batched(tiny_models, arch, sites, positions, metric):
    path = str(tiny_models[arch])
    net_sites = [f"blocks.{i}.hook_{sites}" for i in range(3)] if isinstance(sites, str) else sites
    want = in_process(path, arch, net_sites, positions, metric)
    app = app_with(max_batch_size=8)
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        before = (await c.get("/models")).json()["loaded_models"][0]["batches"]
        body = {"model": path, "clean": CLEAN, "corrupted": CORRUPTED, "sites": sites, "metric": metric}
        if positions is not None:
            body["positions"] = positions
        r = await c.post("/patch", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        after = (await c.get("/models")).json()["loaded_models"][0]["batches"]
    assert got["sites"] == [str(s) for s in net_sites] and got["positions"] == want["positions"]
    assert abs(got["metric"]["clean"] - want["clean"]) < 1e-5
    assert abs(got["metric"]["corrupted"] - want["corrupted"]) < 1e-5
    for got_row, want_row in zip(got["patched"], want["patched"], strict=True):
        assert max(abs(a - b) for a, b in zip(got_row, want_row, strict=True)) < 1e-5, (got_row, want_row)
    assert_normalized(got)
    tok = AutoTokenizer.from_pretrained(path)
    for side, text in (("clean", CLEAN), ("corrupted", CORRUPTED)):
        ids = tok(text)["input_ids"]
        assert got["token_ids"][side] == ids  # the pieces' text, as the lens shows tokens; the ids beside them
        assert got["tokens"][side] == [tok.decode([i]) for i in ids] and not any("Ġ" in t for t in got["tokens"][side])
    runs = 2 + len(net_sites) * len(want["positions"])
    assert got["runs"] == runs and got["calls"] == math.ceil(runs / 8)
    assert after - before == 1 + got["calls"] < runs  # the clean capture, then the runs in batches of 8 rows


async def test_texts_that_fill_the_models_context_are_patched(tiny_models):
    """The metric is read off each run's own last logits: a prompt of the model's whole context leaves no room for a
    token after it, and needs none."""
    path = str(tiny_models["gpt2"])
    tok = AutoTokenizer.from_pretrained(path)
    context = AutoConfig.from_pretrained(path).n_positions
    texts = (" the" * context, " the" * (context - 1) + " a")
    assert [len(tok(t)["input_ids"]) for t in texts] == [context, context]
    metric = {"type": "logit_diff", "correct": " the", "incorrect": "."}
    sites, positions = ["blocks.1.hook_resid_pre", 3], [3, -1]
    want = in_process(path, "gpt2", sites, positions, metric, texts=texts)
    async with concurrent_client(app_with(max_batch_size=8)) as c:
        body = {"model": path, "clean": texts[0], "corrupted": texts[1], "sites": sites, "positions": positions}
        r = await c.post("/patch", json={**body, "metric": metric})
        assert r.status_code == 200, r.text
        got = r.json()
    assert abs(got["metric"]["clean"] - want["clean"]) < 1e-5
    assert abs(got["metric"]["corrupted"] - want["corrupted"]) < 1e-5
    for got_row, want_row in zip(got["patched"], want["patched"], strict=True):
        assert max(abs(a - b) for a, b in zip(got_row, want_row, strict=True)) < 1e-5, (got_row, want_row)


async def test_patch_refusals_name_the_field(tiny_models):
    path = str(tiny_models["llama"])
    base = {
        "model": path,
        "clean": CLEAN,
        "corrupted": CORRUPTED,
        "sites": "resid_pre",
        "metric": {"type": "logprob", "token": "."},
    }
    async with concurrent_client(app_with(options={"interventions_patch_max_rows": 10})) as c:
        cases = [
            ({"corrupted": "The dog sat on the mat"}, "corrupted", "tokens"),
            ({}, "sites", "limit of 10"),
            ({"sites": "resid_side"}, "sites", "unknown family"),
            ({"sites": "z", "positions": [1, 2]}, "sites", "limit of 10"),  # per head: 3 x 2 x 4 runs + 2
            ({"positions": [99]}, "positions", "distinct tokens"),
            (
                {"sites": [1], "positions": [1], "metric": {"type": "logprob", "token": "the cat"}},
                "metric.token",
                "not one",
            ),
            # A field of the other kind of metric was ignored, and a missing one read as "'' is 0 tokens".
            (
                {"sites": [1], "positions": [1], "metric": {"type": "logprob", "token": ".", "correct": " the"}},
                "metric.correct",
                "logprob",
            ),
            (
                {"sites": [1], "positions": [1], "metric": {"type": "logit_diff", "token": "."}},
                "metric.correct",
                "required",
            ),
            (
                {
                    "sites": [1],
                    "positions": [1],
                    "metric": {"type": "logit_diff", "correct": ".", "incorrect": " the", "token": "."},
                },
                "metric.token",
                "logit_diff",
            ),
        ]
        for change, field, words in cases:
            r = await c.post("/patch", json={**base, **change})
            assert r.status_code == 422, r.text
            assert r.json()["field"] == field and words in r.json()["detail"], r.json()
        bert = await c.post("/patch", json={**base, "model": str(tiny_models["bert"]), "sites": [1]})
        assert bert.status_code == 422 and bert.json()["field"] == "model"
