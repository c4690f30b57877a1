"""TransformerLens's per-sublayer copies of the stream: ``hook_attn_in`` and ``hook_q/k/v_input`` (one copy per head:
``use_attn_in``, ``use_split_qkv_input``) and ``hook_mlp_in`` (``use_hook_mlp_in``). An edit there reaches only the
sublayer (or the head's q, k or v) that reads the copy, never the stream flowing past it.

The reference is two in-process runs of transformers' own model with torch hooks: one with the edit on the input of
the norm before attention (so the whole attention reads the edited stream, the residual does not), whose projection
outputs are kept; then one that splices the edited head's q, k or v from the first run into an otherwise plain run.
``hook_mlp_in`` against the same edit on the input of the norm before the MLP.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from test_architectures import build, load
from test_batching import arrays
from test_models import app_with, concurrent_client

TEXT = "the cat sat on the mat and looked at the"
BLOCK = 1
POSITIONS = [1, 3]


@pytest.fixture(scope="module")
def built(tiny_root: Any) -> Any:
    return lambda arch: build(arch, tiny_root)


def layout(net: Any, arch: str) -> dict[str, Any]:
    """Block ``BLOCK``'s modules, and how each of q, k and v sits in its projection's output (module, start, heads)."""
    d = net.config.hidden_size
    if arch == "gpt2":
        block = net.transformer.h[BLOCK]
        heads = net.config.n_head
        attn = block.attn.c_attn
        d_head = d // heads
        return {
            "ln1": block.ln_1,
            "ln2": block.ln_2,
            "mlp": block.mlp,
            "d_head": d_head,
            "q": (attn, 0, heads),
            "k": (attn, d, heads),
            "v": (attn, 2 * d, heads),
        }
    block = net.model.layers[BLOCK]
    a = block.self_attn
    d_head = a.head_dim
    return {
        "ln1": block.input_layernorm,
        "ln2": block.post_attention_layernorm,
        "mlp": block.mlp,
        "d_head": d_head,
        "q": (a.q_proj, 0, net.config.num_attention_heads),
        "k": (a.k_proj, 0, net.config.num_key_value_heads),
        "v": (a.v_proj, 0, net.config.num_key_value_heads),
    }


def add_at(vector: torch.Tensor) -> Any:
    """A forward pre-hook adding ``vector`` at ``POSITIONS`` of a module's input (a new tensor: the caller's stays),
    in the pass over the prompt only (a decoding step's one token is past them)."""

    def hook(module: Any, args: tuple) -> tuple | None:
        if args[0].shape[1] <= max(POSITIONS):
            return None
        x = args[0].clone()
        x[:, POSITIONS] += vector
        return (x, *args[1:])

    return hook


def run(net: Any, enc: Any, hooks: list[tuple[Any, str, Any]]) -> Any:
    handles = [m.register_forward_pre_hook(f) if side == "pre" else m.register_forward_hook(f) for m, side, f in hooks]
    try:
        with torch.inference_mode():
            return net(**enc, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()


def spliced(net: Any, enc: Any, parts: dict[str, Any], which: tuple[str, ...], head: int, vector: Any) -> Any:
    """The plain run with head ``head`` of each of ``which`` (q, k, v) taken from a run whose attention in block
    ``BLOCK`` reads the edited stream."""
    kept: dict[str, torch.Tensor] = {}

    def keep(x: str) -> Any:
        return lambda m, a, out: kept.__setitem__(x, out.detach().clone())

    run(net, enc, [(parts["ln1"], "pre", add_at(vector)), *((parts[x][0], "out", keep(x)) for x in which)])
    d_head = parts["d_head"]

    def splice(x: str) -> Any:
        _, start, _ = parts[x]
        cols = slice(start + head * d_head, start + (head + 1) * d_head)

        def hook(m: Any, a: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[..., cols] = kept[x][..., cols]
            return out

        return hook

    # GPT-2's q, k and v share one projection: its hooks run in turn, each splicing its own columns.
    return run(net, enc, [(parts[x][0], "out", splice(x)) for x in which])


async def extract(c: Any, path: str, layers: list[Any], edits: Sequence[dict[str, Any]] = ()) -> dict[str, np.ndarray]:
    """The server's states of ``layers`` at every position of ``TEXT`` under ``edits``."""
    body = {"model": path, "text": TEXT, "interventions": list(edits), "hidden_state_layers": layers}
    r = await c.post("/extract", json={**body, "positions": "all"})
    assert r.status_code == 200, r.text
    return arrays(r.json(), "sequence_hidden_states")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
async def test_an_edited_heads_copy_feeds_only_that_heads_q_k_or_v(built, arch):
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    parts = layout(net, arch)
    d = net.config.hidden_size
    vector = torch.from_numpy(np.random.default_rng(3).standard_normal(d).astype(np.float32)) * 4
    plain = run(net, enc, [])
    n = len(plain.hidden_states) - 1
    cases = [("hook_q_input", ("q",), 2), ("hook_k_input", ("k",), 1), ("hook_v_input", ("v",), 0)]
    if arch == "gpt2":  # one key-value head per query head: hook_attn_in's copy feeds all three
        cases.append(("hook_attn_in", ("q", "k", "v"), 3))
    at = f"blocks.{BLOCK}."
    async with concurrent_client(app_with()) as c:
        if arch == "llama":  # grouped-query attention: a query head has no key and value of its own
            assert (await c.post("/models/load", json={"model": path})).status_code == 200
            sites = (await c.get(f"/models/{path}/sites")).json()
            assert "key-value heads" in sites["unavailable"][at + "hook_attn_in"]
            assert sites["sites"][at + "hook_k_input"] == [parts["k"][2], d]
        for name, which, head in cases:
            want = spliced(net, enc, parts, which, head, vector)
            edit = {"site": at + name, "op": "add", "vector": vector.tolist(), "heads": [head], "positions": POSITIONS}
            layers = [n, at + name, at + "hook_resid_pre", at + "hook_attn_out", at + "hook_resid_post"]
            got = await extract(c, path, layers, [edit])
            np.testing.assert_allclose(got[str(n)], want.hidden_states[n][0].numpy(), atol=1e-5, rtol=0, err_msg=name)
            assert not np.allclose(got[str(n)], plain.hidden_states[n][0].numpy(), atol=1e-4), name
            # The stream the block reads is untouched; the copy shows the edit at its head and positions only.
            pre = got[at + "hook_resid_pre"]
            np.testing.assert_allclose(pre, plain.hidden_states[BLOCK][0].numpy(), atol=1e-6, rtol=0)
            copies = got[at + name]
            edited = pre.copy()
            edited[POSITIONS] += vector.numpy()
            for h in range(copies.shape[1]):
                np.testing.assert_allclose(copies[:, h], edited if h == head else pre, atol=1e-5, rtol=0)
            np.testing.assert_allclose(
                got[at + "hook_resid_post"], want.hidden_states[BLOCK + 1][0].numpy(), atol=1e-5, rtol=0
            )
        # Every head's copy edited alike is the attention reading the edited stream.
        edit = {"site": at + "hook_q_input", "op": "add", "vector": vector.tolist(), "positions": POSITIONS}
        both = {**edit, "site": at + "hook_k_input"}
        third = {**edit, "site": at + "hook_v_input"}
        got = await extract(c, path, [n], [edit, both, third])
        want = run(net, enc, [(parts["ln1"], "pre", add_at(vector))])
        np.testing.assert_allclose(got[str(n)], want.hidden_states[n][0].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
async def test_an_edit_at_hook_mlp_in_reaches_the_mlp_and_not_the_stream(built, arch):
    """The same edit on the input of the norm before the MLP, in a forward pass and in a greedy generation; the
    stream between the sublayers (``hook_resid_mid``) is the plain run's."""
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    parts = layout(net, arch)
    vector = torch.from_numpy(np.random.default_rng(4).standard_normal(net.config.hidden_size).astype(np.float32)) * 4
    hooks = [(parts["ln2"], "pre", add_at(vector))]
    want = run(net, enc, hooks)
    n = len(want.hidden_states) - 1
    at = f"blocks.{BLOCK}."
    edit = {"site": at + "hook_mlp_in", "op": "add", "vector": vector.tolist(), "positions": POSITIONS}
    async with concurrent_client(app_with()) as c:
        plain = await extract(c, path, [at + "hook_resid_mid"])
        got = await extract(c, path, [n, at + "hook_resid_mid", at + "hook_mlp_in"], [edit])
        np.testing.assert_allclose(got[str(n)], want.hidden_states[n][0].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got[at + "hook_resid_mid"], plain[at + "hook_resid_mid"], atol=0, rtol=0)
        mid = plain[at + "hook_resid_mid"].copy()
        mid[POSITIONS] += vector.numpy()
        np.testing.assert_allclose(got[at + "hook_mlp_in"], mid, atol=1e-5, rtol=0)
        handles = [parts["ln2"].register_forward_pre_hook(add_at(vector))]
        try:
            with torch.inference_mode():
                tokens = net.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        finally:
            handles[0].remove()
        g = await c.post(
            "/generate",
            json={"model": path, "prompt": TEXT, "max_tokens": 8, "temperature": 0, "interventions": [edit]},
        )
        assert g.status_code == 200, g.text
        assert g.json()["token_ids"] == tokens[0, enc["input_ids"].shape[1] :].tolist()
