"""Direct logit attribution, attribution patching and the weights over HTTP, against in-process references:
the same decomposition with torch hooks and the model's own weights, ``torch.autograd`` on the corrupted run, and
the model's own ``state_dict``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from loom_client import decode
from test_architectures import eps_of, load, reference_points
from test_models import app_with, concurrent_client

ARCHS = ("gpt2", "llama", "gpt_neox", "gemma2", "bloom")
TEXT = "the cat sat on the mat and looked at the"
CLEAN, CORRUPTED = "The cat sat on the mat", "The cap sat on the mat"


@pytest.fixture(scope="module")
def built(tiny_root: Any) -> Any:
    from loom_transformers.testing import build_tiny_model

    return lambda arch: str(build_tiny_model(arch, tiny_root, name=f"norms-{arch}", perturb_norms=True))


def frozen(norm: Any, x: torch.Tensor, gemma: bool) -> Any:
    """``norm`` at input ``x`` [d] as a linear map: its scale fixed at x's (TransformerLens's apply_ln_to_stack)."""
    layer = "layernorm" in type(norm).__name__.lower()
    w = norm.weight.double() + (1 if gemma else 0) if getattr(norm, "weight", None) is not None else 1.0  # OLMo's: none
    centre = (lambda v: v - v.mean(-1, keepdim=True)) if layer else (lambda v: v)
    s = (centre(x).pow(2).mean() + eps_of(norm)).sqrt()
    return lambda v: centre(v) / s * w


@pytest.mark.parametrize("arch", (*ARCHS, "olmo"))  # OLMo: a final LayerNorm without weight or bias
async def test_direct_logit_attribution_is_the_decomposition_through_the_models_own_weights(built, arch):
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    points, layers, _embeds, final = reference_points(net, arch)
    names = ["hook_embed", *(["hook_pos_embed"] if arch == "gpt2" else [])]
    for i in range(len(layers)):
        names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.attn.hook_z", f"blocks.{i}.hook_mlp_out"]
    kept: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module, side, _view = points[name]
        if side == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: kept.update({name: a[0][0]})))
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, name=name: kept.update({name: (o[0] if isinstance(o, tuple) else o)[0]})
                )
            )
    handles.append(final.register_forward_pre_hook(lambda m, a: kept.update(final_in=a[0][0])))
    sandwich = [layer.post_attention_layernorm for layer in layers] if arch == "gemma2" else None
    with torch.inference_mode():
        logits = net(**enc).logits[0].double()
    for h in handles:
        h.remove()
    a, b = 5, 9
    p = enc["input_ids"].shape[1] - 2  # a position before the last: the answer's `position`
    gemma = arch == "gemma2"
    final_map = frozen(final, kept["final_in"][p].double(), gemma)
    u = (net.lm_head.weight[a] - net.lm_head.weight[b]).double()

    def value(v: torch.Tensor) -> float:
        return float(final_map(v.double()) @ u)

    heads = int(getattr(net.config, "num_attention_heads", 0) or net.config.n_head)
    want_layers = [("hook_embed", None, value(kept["hook_embed"][p]))]
    if arch == "gpt2":
        want_layers.append(("hook_pos_embed", None, value(kept["hook_pos_embed"][p])))
    want_heads = list(want_layers)
    for i in range(len(layers)):
        at = f"blocks.{i}."
        want_layers.append((at + "hook_attn_out", None, value(kept[at + "hook_attn_out"][p])))
        o = points[at + "attn.hook_z"][0]
        z = kept[at + "attn.hook_z"][p].double().view(heads, -1)  # [heads, d_head]
        w = o.weight.double()
        w_o = w.view(heads, -1, w.shape[1]) if type(o).__name__ == "Conv1D" else w.T.reshape(heads, -1, w.shape[0])
        per_head = torch.einsum("hd,hdm->hm", z, w_o)  # z_h @ W_O[h]
        bias = o.bias.double() if o.bias is not None else torch.zeros(per_head.shape[-1], dtype=torch.float64)
        if sandwich is not None:  # Gemma 2: through its post-attention norm, frozen at the attention's output
            post = frozen(sandwich[i], per_head.sum(0) + bias, True)
            per_head, bias = post(per_head), post(bias)
        want_heads += [(at + "attn.hook_result", h, value(per_head[h])) for h in range(heads)]
        want_heads.append((at + "attn.b_O", None, value(bias)))
        want_layers.append((at + "hook_mlp_out", None, value(kept[at + "hook_mlp_out"][p])))
        want_heads.append((at + "hook_mlp_out", None, value(kept[at + "hook_mlp_out"][p])))
    bias_term = float(final.bias.double() @ u) if getattr(final, "bias", None) is not None else 0.0
    own = float(logits[p, a] - logits[p, b])
    cap = getattr(net.config, "final_logit_softcapping", None)
    if cap:  # the decomposition is of the logits before the cap
        own_uncapped = float(cap * (torch.atanh(logits[p, a] / cap) - torch.atanh(logits[p, b] / cap)))
    async with concurrent_client(app_with()) as c:
        for kind, want in (("layers", want_layers), ("heads", want_heads)):
            body = {"model": path, "text": TEXT, "position": -2, "target": {"token_ids": [a, b]}, "components": kind}
            r = await c.post("/logit_attribution", json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["position"] == p and got["difference"] is True and got["softcap"] == cap
            comps = got["components"]
            assert [(x["site"], x.get("head")) for x in comps] == [(s, h) for s, h, _ in want] + [("bias", None)]
            np.testing.assert_allclose([x["value"] for x in comps[:-1]], [v for _, _, v in want], atol=1e-5)
            assert abs(comps[-1]["value"] - bias_term) < 1e-5
            assert abs(got["logit"] - own) < 1e-5
            assert abs(got["sum"] - (own_uncapped if cap else own)) < 1e-4
            if cap:
                assert abs(got["logit_before_softcap"] - own_uncapped) < 1e-4


async def test_several_texts_run_as_one_batch_and_bad_input_is_a_4xx_naming_the_field(built):
    path = built("gpt2")
    async with concurrent_client(app_with()) as c:
        await c.post("/models/load", json={"model": path})
        batches = (await c.get("/models")).json()["loaded_models"][0]["batches"]
        body = {"model": path, "texts": [TEXT, "hello there"], "target": {"token": " the"}}
        r = await c.post("/logit_attribution", json=body)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == 2
        # A batch is counted before any of its calls is answered: both texts ran as one batch.
        assert (await c.get("/models")).json()["loaded_models"][0]["batches"] == batches + 1
        for one in results:
            alone = await c.post(
                "/logit_attribution", json={**body, "texts": None, "text": TEXT if one is results[0] else "hello there"}
            )
            assert abs(alone.json()["sum"] - one["sum"]) < 1e-5 and abs(one["sum"] - one["logit"]) < 1e-4
        for change, field in [
            ({"target": {"tokens": ["the cat", "."]}}, "target.tokens[0]"),
            ({"target": {"tokens": [" the"]}}, "target.tokens"),
            ({"target": {"token_id": 10**6}}, "target.token_id"),
            ({"target": {"token": " the", "token_id": 3}}, "target"),
            ({"position": 99}, "position"),
            ({"components": "neurons"}, None),
        ]:
            r = await c.post("/logit_attribution", json={**body, **change})
            assert 400 <= r.status_code < 500, r.text
            if field is not None:
                assert r.json()["field"] == field, r.json()


@pytest.mark.parametrize("arch", ARCHS)
async def test_attribution_patching_is_autograd_on_the_corrupted_run(built, arch):
    path = built(arch)
    net, tok = load(path, arch)
    points, _layers, _, _ = reference_points(net, arch)
    clean, corrupt = (tok(t, return_tensors="pt")["input_ids"] for t in (CLEAN, CORRUPTED))
    good, bad = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" the", "."))
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.1.attn.hook_z"]

    def run(ids: torch.Tensor, grad: bool) -> tuple[dict[str, torch.Tensor], float, dict[str, torch.Tensor]]:
        kept: dict[str, torch.Tensor] = {}
        handles = []
        for site in sites:
            module, side, view = points[site]
            view = view or (lambda t: t)

            def keep(t: torch.Tensor, site: str = site) -> None:
                if grad:
                    t.retain_grad()
                kept[site] = t

            if side == "in":
                handles.append(module.register_forward_pre_hook(lambda m, a, keep=keep: keep(a[0])))
            else:
                handles.append(
                    module.register_forward_hook(lambda m, a, o, keep=keep: keep(o[0] if isinstance(o, tuple) else o))
                )
        embed = net.get_input_embeddings()
        root = embed.register_forward_hook(lambda m, a, o: o.detach().requires_grad_()) if grad else None
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                logits = net(ids).logits[0, -1]
                metric = logits[good] - logits[bad]
                if grad:
                    metric.backward()
        finally:
            for h in handles:
                h.remove()
            if root is not None:
                root.remove()
        values = {s: points[s][2](kept[s][0].detach()) if points[s][2] else kept[s][0].detach() for s in sites}
        grads = {s: (points[s][2](kept[s].grad[0]) if points[s][2] else kept[s].grad[0]) for s in sites} if grad else {}
        return values, float(metric), grads

    net.requires_grad_(False)
    clean_v, clean_m, _ = run(clean, False)
    corrupt_v, corrupt_m, grads = run(corrupt, True)
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "clean": CLEAN, "corrupted": CORRUPTED, "sites": sites, "method": "attribution"}
        r = await c.post("/patch", json={**body, "metric": {"type": "logit_diff", "correct": " the", "incorrect": "."}})
        assert r.status_code == 200, r.text
        got = r.json()
    assert got["method"] == "attribution" and got["runs"] == 2
    assert max(abs(v) for v in got["attribution"][0]) > 1e-4  # the differing token's stream moves the metric
    assert abs(got["metric"]["clean"] - clean_m) < 1e-5 and abs(got["metric"]["corrupted"] - corrupt_m) < 1e-5
    for site, row in zip(sites, got["attribution"], strict=True):
        cell = ((clean_v[site] - corrupt_v[site]) * grads[site]).double()
        want = cell.sum(-1)  # [positions] or [positions, heads]
        np.testing.assert_allclose(np.array(row), want.numpy(), atol=1e-6, err_msg=site)
    np.testing.assert_allclose(
        np.array(got["normalized"][0]), np.array(got["attribution"][0]) / (clean_m - corrupt_m), atol=1e-6
    )


async def test_weights_are_the_models_own_and_refusals_name_the_field(built, tiny_models):
    path = built("llama")
    net, _ = load(path, "llama")
    state = net.state_dict()
    async with concurrent_client(app_with(max_response_mb=0.5)) as c:
        await c.post("/models/load", json={"model": path})
        listing = (await c.get(f"/models/{path}/weights")).json()["weights"]
        assert {k: v["shape"] for k, v in listing.items() if k in state} == {k: list(v.shape) for k, v in state.items()}
        names = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight",
            "W_U",
            "blocks.1.attn.W_O",
            "blocks.0.attn._W_K",
            "blocks.0.attn.W_K",
        ]
        for fmt in ("list", "base64", "safetensors"):
            r = await c.get(f"/models/{path}/weights", params={"names": ",".join(names[:2]), "format": fmt})
            assert r.status_code == 200, r.text
            body = decode.safetensors(r.content) if fmt == "safetensors" else decode.arrays(r.json())
            for name in names[:2]:
                np.testing.assert_array_equal(body["weights"][name], state[name].numpy())
        r = await c.get(f"/models/{path}/weights", params={"names": ",".join(names[2:])})
        got = (
            decode.safetensors(r.content)
            if r.headers["content-type"].startswith("application/vnd")
            else decode.arrays(r.json())
        )
        got = got["weights"]
        np.testing.assert_array_equal(got["W_U"], state["lm_head.weight"].T.numpy())
        o = state["model.layers.1.self_attn.o_proj.weight"]  # [d, heads * d_head]
        np.testing.assert_array_equal(got["blocks.1.attn.W_O"], o.T.reshape(4, 16, 64).numpy())
        k = state["model.layers.0.self_attn.k_proj.weight"]  # [kv * d_head, d]: two key-value heads
        np.testing.assert_array_equal(got["blocks.0.attn._W_K"], k.T.reshape(64, 2, 16).permute(1, 0, 2).numpy())
        np.testing.assert_array_equal(got["blocks.0.attn.W_K"], np.repeat(got["blocks.0.attn._W_K"], 2, axis=0))
        # A list as HTTP clients send one (names=a&names=b), and as the docs' comma-separated form: the same tensors.
        r = await c.get(f"/models/{path}/weights", params={"names": names[:2], "format": "list"})
        assert r.status_code == 200 and set(r.json()["weights"]) == set(names[:2]), r.status_code
        for name in names[:2]:
            np.testing.assert_array_equal(decode.arrays(r.json())["weights"][name], state[name].numpy())
        for params, field in [
            ({"names": "nope"}, "names"),
            ({"names": "model.embed_tokens.weight,lm_head.weight", "format": "list"}, "names"),
            ({"names": "W_U", "format": "x"}, "format"),
            ({"names": "W_U", "format": ["list", "base64"]}, "format"),
            ({"bogus": "1"}, "bogus"),
        ]:
            r = await c.get(f"/models/{path}/weights", params=params)
            assert r.status_code == 422 and r.json()["field"] == field, r.text


@pytest.mark.parametrize("arch", ("gemma", "gemma2", "gpt2"))
async def test_w_e_is_what_the_embedding_module_gives(built, arch):
    """TransformerLens's ``W_E`` is what its ``hook_embed`` reads, ``W_E[tokens]``: for Gemma, whose embedding module
    multiplies by sqrt(d_model), its conversion stores the weight times sqrt(d_model)."""
    path = built(arch)
    net, tok = load(path, arch)
    ids = tok(TEXT, return_tensors="pt")["input_ids"][0]
    with torch.inference_mode():
        want = net.get_input_embeddings()(ids)  # transformers' own module: what hook_embed is
    async with concurrent_client(app_with()) as c:
        await c.post("/models/load", json={"model": path})
        listing = (await c.get(f"/models/{path}/weights")).json()["weights"]
        assert listing["W_E"]["shape"] == list(net.get_input_embeddings().weight.shape)
        r = await c.get(f"/models/{path}/weights", params={"names": "W_E", "format": "base64"})
        assert r.status_code == 200, r.text
        w_e = decode.arrays(r.json())["weights"]["W_E"]
    np.testing.assert_array_equal(w_e[ids.numpy()], want.numpy())
