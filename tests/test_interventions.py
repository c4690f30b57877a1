"""Hook points and interventions over HTTP, against transformers' own modules edited in-process with torch hooks.

The reference here is written from each architecture's own module tree (``layer.self_attn``, ``layer.attn.c_proj``,
``layer.post_feedforward_layernorm``, ...), not from the plugin's discovery, and its edits count token positions
per forward call, as a researcher's hooks around ``generate`` would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loom_transformers.testing import build_tiny_model
from test_batching import arrays, together
from test_models import app_with, concurrent_client

SITE_ARCHS = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gemma2", "bert")
EDIT_ARCHS = ("llama", "gpt2", "gemma2")
TEXT = "the cat sat on the mat and looked at the"


@pytest.fixture(scope="module")
def paths(tiny_root: Path) -> dict[str, str]:
    return {arch: str(build_tiny_model(arch, tiny_root)) for arch in SITE_ARCHS}


def load(path: str, arch: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference_points(net: Any, arch: str) -> tuple[dict[int | str, tuple[Any, str]], Any, int]:
    """Each site's module and side, from the architecture's own source: (points, layers, N)."""
    if arch == "bert":
        base, final = net, None
        layers = net.encoder.layer
    elif arch == "gpt2":
        base, final = net.transformer, net.transformer.ln_f
        layers = base.h
    elif arch == "gpt_neox":
        base, final = net.gpt_neox, net.gpt_neox.final_layer_norm
        layers = base.layers
    else:
        base, final = net.model, net.model.norm
        layers = base.layers
    n = len(layers)
    points: dict[int | str, tuple[Any, str]] = {0: (layers[0], "in")}
    for i in range(1, n):
        points[i] = (layers[i - 1], "out")
    points[n] = (final, "out") if final is not None else (layers[-1], "out")
    if final is not None:
        points["ln_final.hook_normalized"] = (final, "out")
    for i, layer in enumerate(layers):
        at = f"blocks.{i}."
        points[at + "hook_resid_pre"] = (layer, "in")
        points[at + "hook_resid_post"] = (layer, "out")
        if arch == "bert":  # TransformerLens's BertBlock: resid_mid is resid_pre + attn_out, before the LayerNorm
            attn, mlp, z = layer.attention.output.dense, layer.output.dense, layer.attention.output.dense
            mid = (layer.attention.output.LayerNorm, "in")
            points[at + "hook_resid_post"] = (layer.output.LayerNorm, "in")  # ln1 out + mlp_out, before ln2
        elif arch == "gpt2":
            attn, mlp, mid, z = layer.attn, layer.mlp, (layer.ln_2, "in"), layer.attn.c_proj
        elif arch == "gpt_neox":
            attn, mlp, mid, z = layer.attention, layer.mlp, None, layer.attention.dense
        elif arch == "gemma2":
            attn, mlp = layer.post_attention_layernorm, layer.post_feedforward_layernorm
            mid, z = (layer.pre_feedforward_layernorm, "in"), layer.self_attn.o_proj
        else:
            attn, mlp, mid, z = (
                layer.self_attn,
                layer.mlp,
                (layer.post_attention_layernorm, "in"),
                layer.self_attn.o_proj,
            )
        points[at + "hook_attn_out"] = (attn, "out")
        points[at + "hook_mlp_out"] = (mlp, "out")
        points[at + "attn.hook_z"] = (z, "in")
        if mid is not None:
            points[at + "hook_resid_mid"] = mid
    return points, layers, n


def first(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) else value


def heads_of(net: Any) -> int:
    return int(getattr(net.config, "num_attention_heads", 0) or net.config.n_head)


def record(points: dict, names: list[Any], store: dict, heads: int) -> list[Any]:
    """Hooks that copy each named point's tensor into ``store`` (z sites viewed as [.., heads, d_head])."""
    handles = []
    for name in names:
        module, side = points[name]

        def keep(t: Any, name: Any = name) -> None:
            t = t.detach().clone()
            store[name] = t.view(*t.shape[:-1], heads, -1) if str(name).endswith("hook_z") else t

        if side == "in":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, kw, keep=keep: keep(a[0] if a else kw["hidden_states"]), with_kwargs=True
                )
            )
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, keep=keep: keep(first(out))))
    return handles


@pytest.mark.parametrize("arch", SITE_ARCHS)
async def test_every_hook_point_is_the_modules_own_input_or_output(paths, arch):
    net, tok = load(paths[arch], arch)
    points, _, n = reference_points(net, arch)
    names = [k for k in points if isinstance(k, str)]
    store: dict[Any, Any] = {}
    handles = record(points, names, store, heads_of(net))
    with torch.inference_mode():
        out = net(**tok(TEXT, return_tensors="pt"), output_hidden_states=True)
    for h in handles:
        h.remove()
    async with concurrent_client(app_with()) as c:
        body = {"model": paths[arch], "text": TEXT, "hidden_state_layers": names, "positions": "all"}
        r = await c.post("/extract", json=body)
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
        assert sorted(got) == sorted(names)
        for name in names:
            np.testing.assert_allclose(got[name], store[name][0].numpy(), atol=1e-5, rtol=0, err_msg=name)
        for i in range(n):  # hook_resid_pre of block i is hidden-state index i
            np.testing.assert_allclose(got[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i][0].numpy(), atol=1e-5)
        sites = (await c.get(f"/models/{paths[arch]}/sites")).json()
        assert set(names) <= set(sites["sites"])  # and more: tests/test_architectures.py checks every one
        if arch == "gpt_neox":
            assert "parallel-residual" in sites["unavailable"]["blocks.0.hook_resid_mid"]
            r = await c.post("/extract", json={**body, "hidden_state_layers": ["blocks.0.hook_resid_mid"]})
            assert r.status_code == 422 and "parallel-residual" in r.json()["detail"]
        if arch == "bert":
            r = await c.post("/extract", json={**body, "hidden_state_layers": ["ln_final.hook_normalized"]})
            assert r.status_code == 422 and r.json()["field"] == "hidden_state_layers"


# -- edits ---------------------------------------------------------------------------------------------------------


def reference_apply(x: torch.Tensor, item: dict[str, Any], rows: list[int] | None) -> torch.Tensor:
    """One edit on x [m, ..., D], written from its definition."""
    op, scale = item["op"], item.get("scale", 1.0)
    v = torch.tensor(item["vector"], dtype=torch.float32) if "vector" in item else None
    if v is not None and v.ndim == 2 and op != "ablate":
        v = v[rows].view(len(rows), *([1] * (x.ndim - 2)), -1)
    if op == "add":
        return x + scale * v
    if op == "set":
        return v.expand_as(x).clone()
    if op == "scale":
        return scale * x
    if op == "ablate":  # minus the projection on the row space of v: x V^T (V V^T)^-1 V, in float64
        vd, xd = v.double().reshape(-1, x.shape[-1]), x.double()
        return (xd - xd @ vd.T @ torch.linalg.inv(vd @ vd.T) @ vd).float()
    return torch.zeros_like(x)


def edit_hooks(points: dict, layers: Any, items: list[dict[str, Any]], prompt: int, heads: int) -> list[Any]:
    """The request's edits as torch hooks on one unpadded row; each hook counts the tokens it has seen, so it knows
    which positions each forward call (a prefill, then one token a step) holds."""
    handles = []
    for item in items:
        site = item["site"]
        mid = str(site).endswith("hook_resid_mid")
        module, side = points[site] if not mid else points[site.replace("hook_resid_mid", "hook_attn_out")]
        block_input: dict[str, Any] = {}
        if mid:
            block = layers[int(site.split(".")[1])]
            handles.append(
                block.register_forward_pre_hook(
                    lambda m, a, kw, s=block_input: s.update(x=a[0] if a else kw["hidden_states"]), with_kwargs=True
                )
            )
        seen = [0]

        def edit(h: torch.Tensor, item: dict = item, seen: list = seen, mid: bool = mid, s: dict = block_input) -> Any:
            count = h.shape[1]
            tokens = list(range(seen[0], seen[0] + count))
            seen[0] += count
            pos = item.get("positions", "all")
            if pos == "all":
                picked, rows = tokens, None
            elif pos == "prompt":
                picked, rows = [t for t in tokens if t < prompt], None
            elif pos == "generated":
                picked, rows = [t for t in tokens if t >= prompt], None
            else:
                wanted = [p if p >= 0 else prompt + p for p in pos]
                picked = [t for t in tokens if t in wanted]
                rows = [wanted.index(t) for t in picked]
            if not picked:
                return h
            h = h.clone()
            cols = [t - tokens[0] for t in picked]
            z = str(item["site"]).endswith("hook_z")
            view = h.view(*h.shape[:-1], heads, -1) if z else h
            x = view[0, cols]
            if mid:
                x = x + s["x"][0, cols]
            if z and "heads" in item:
                x[:, item["heads"]] = reference_apply(x[:, item["heads"]], item, rows)
            else:
                x = reference_apply(x, item, rows)
            if mid:
                x = x - s["x"][0, cols]
            view[0, cols] = x
            return h

        if side == "in":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, kw, edit=edit: (
                        ((edit(a[0]), *a[1:]), kw) if a else (a, {**kw, "hidden_states": edit(kw["hidden_states"])})
                    ),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, out, edit=edit: (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)
                )
            )
    return handles


def cases(n: int, d: int, d_head: int, heads: int) -> list[dict[str, Any]]:
    """Each op at each kind of site."""
    gen = torch.Generator().manual_seed(0)

    def vec(*shape: int) -> list:
        return torch.randn(*shape, generator=gen).tolist()

    sites = [0, 1, n, "blocks.1.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"]
    sites += ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "ln_final.hook_normalized"]
    out = []
    for site in sites:
        width = d_head if str(site).endswith("hook_z") else d
        out += [
            {"site": site, "op": "add", "vector": vec(width), "scale": 2.0},
            {"site": site, "op": "set", "vector": vec(2, width), "positions": [1, -1]},
            {"site": site, "op": "scale", "scale": 0.25, "positions": "prompt"},
            {"site": site, "op": "ablate", "vector": vec(2, width)},
            {"site": site, "op": "zero", "positions": [0, 2]},
        ]
        if str(site).endswith("hook_z"):
            out.append({"site": site, "op": "zero", "heads": [1, 2]})
            out.append({"site": site, "op": "add", "vector": vec(width), "heads": [0], "positions": "generated"})
    return out


@pytest.mark.parametrize("arch", EDIT_ARCHS)
async def test_each_op_at_each_site_matches_the_same_edit_in_process(paths, arch):
    """Captured states within 1e-5 (at the edited site and at the last layer) and 16 greedy tokens identical."""
    net, tok = load(paths[arch], arch)
    points, layers, n = reference_points(net, arch)
    heads = heads_of(net)
    d = net.config.hidden_size
    d_head = (getattr(net.config, "head_dim", None) or d // heads) if arch == "gemma2" else d // heads
    enc = tok(TEXT, return_tensors="pt")
    prompt = enc["input_ids"].shape[1]
    failures = []
    async with concurrent_client(app_with()) as c:
        for item in cases(n, d, d_head, heads):
            store: dict[Any, Any] = {}
            handles = edit_hooks(points, layers, [item], prompt, heads)
            handles += record(points, [n, item["site"]], store, heads)
            with torch.inference_mode():
                net(**enc)
            for h in handles:
                h.remove()
            handles = edit_hooks(points, layers, [item], prompt, heads)  # counting from the first token again
            with torch.inference_mode():
                ref_tokens = net.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            for h in handles:
                h.remove()
            body = {"model": paths[arch], "interventions": [item]}
            r = await c.post(
                "/extract", json={**body, "text": TEXT, "hidden_state_layers": [n, item["site"]], "positions": "all"}
            )
            assert r.status_code == 200, (item, r.text)
            got = arrays(r.json(), "sequence_hidden_states")
            for key, want in ((str(n), store[n]), (str(item["site"]), store[item["site"]])):
                if not np.allclose(got[key], want[0].numpy(), atol=1e-5, rtol=0):
                    failures.append((item["site"], item["op"], "states at " + key))
            g = await c.post("/generate", json={**body, "prompt": TEXT, "max_tokens": 16, "temperature": 0})
            assert g.status_code == 200, (item, g.text)
            if g.json()["token_ids"] != ref_tokens[0, prompt:].tolist():
                failures.append((item["site"], item["op"], "tokens"))
    assert not failures, "\n".join(map(str, failures))


async def test_ablating_a_direction_leaves_no_projection_on_it(paths):
    path = paths["llama"]
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    async with concurrent_client(app_with()) as c:
        for site in ("blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", 2):
            body = {
                "model": path,
                "text": TEXT,
                "hidden_state_layers": [site],
                "positions": "all",
                "interventions": [{"site": site, "op": "ablate", "vector": (direction * 7).tolist()}],
            }
            r = await c.post("/extract", json=body)
            assert r.status_code == 200, r.text
            states = arrays(r.json(), "sequence_hidden_states")[str(site)]
            before = await c.post("/extract", json={**body, "interventions": []})
            plain = arrays(before.json(), "sequence_hidden_states")[str(site)]
            unit = (direction / direction.norm()).numpy()
            assert np.abs(states @ unit).max() < 1e-6 < np.abs(plain @ unit).max()


async def test_rows_with_different_interventions_merge_and_each_gets_what_it_gets_alone(paths):
    path = paths["llama"]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(2)).tolist()
    bodies = [
        {"interventions": [{"site": 1, "op": "add", "vector": vector, "scale": 4.0}]},
        {},
        {"interventions": [{"site": "blocks.0.attn.hook_z", "op": "zero", "heads": [0, 3]}]},
        {"interventions": [{"site": 2, "op": "scale", "scale": 0.0, "positions": "generated"}]},
    ]
    extract = {"text": TEXT, "hidden_state_layers": [1, -1], "positions": "all"}
    generate = {"prompt": TEXT, "max_tokens": 12, "temperature": 0, "return_hidden_states": True, "positions": "all"}
    app = app_with()
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        for route, fields in (("/extract", extract), ("/generate", generate)):
            alone = []
            for body in bodies:
                r = await c.post(route, json={"model": path, **fields, **body})
                assert r.status_code == 200, r.text
                alone.append(r.json())
            counters = (await c.get("/models")).json()["loaded_models"][0]
            results = await together(app, c, path, [(route, {**fields, **body}) for body in bodies])
            after = (await c.get("/models")).json()["loaded_models"][0]
            for r, want in zip(results, alone, strict=True):
                assert r.status_code == 200, r.text
                got = r.json()
                assert got["token_ids"] == want["token_ids"]
                for key, state in arrays(want, "sequence_hidden_states").items():
                    np.testing.assert_allclose(arrays(got, "sequence_hidden_states")[key], state, atol=1e-5, rtol=0)
            assert after["batches"] - counters["batches"] < len(bodies)  # they ran together, not one by one


async def test_an_edit_on_generated_positions_edits_every_decoding_step_and_only_those(paths):
    path = paths["llama"]
    body = {"model": path, "prompt": TEXT, "max_tokens": 10, "temperature": 0, "hidden_state_layers": [2, 3]}
    edit = [{"site": 2, "op": "scale", "scale": 3.0, "positions": "generated"}]
    async with concurrent_client(app_with()) as c:
        plain = (await c.post("/generate", json={**body, "positions": "all"})).json()
        edited = (await c.post("/generate", json={**body, "positions": "all", "interventions": edit})).json()
    prompt = plain["prompt_tokens"]
    a, b = arrays(plain, "sequence_hidden_states"), arrays(edited, "sequence_hidden_states")
    np.testing.assert_allclose(b["2"][:prompt], a["2"][:prompt], atol=1e-6)  # the prompt is untouched
    first = edited["token_ids"][0]  # chosen from the prompt's last position: unedited, so the same token
    assert first == plain["token_ids"][0]
    # The first generated token's state is three times what the same sequence gives without the edit.
    net, tok = load(path, "llama")
    with torch.inference_mode():
        ids = tok(TEXT, return_tensors="pt")["input_ids"]
        full = torch.cat([ids, torch.tensor([edited["token_ids"]])], dim=1)
        ref = net(full, output_hidden_states=True).hidden_states[2][0]
    # Every generated position's state is three times what the same sequence gives without the edit (index 2 is
    # computed from unedited layers below it), and every prompt position is untouched.
    np.testing.assert_allclose(b["2"][prompt:], 3.0 * ref[prompt:].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(b["2"][:prompt], ref[:prompt].numpy(), atol=1e-5, rtol=0)


async def test_streams_and_batches_carry_the_same_edits(paths):
    path = paths["llama"]
    edit = [{"site": "blocks.1.hook_mlp_out", "op": "scale", "scale": 4.0}]
    ask = {"model": path, "max_tokens": 10, "temperature": 0, "interventions": edit}
    async with concurrent_client(app_with()) as c:
        alone = (await c.post("/generate", json={**ask, "prompt": TEXT})).json()
        plain = (await c.post("/generate", json={**ask, "prompt": TEXT, "interventions": []})).json()
        assert alone["token_ids"] != plain["token_ids"]
        batch = (await c.post("/generate/batch", json={**ask, "prompts": [TEXT, "hello"]})).json()
        assert batch["results"][0]["token_ids"] == alone["token_ids"]
        streamed = []
        async with c.stream("POST", "/generate/stream", json={**ask, "prompt": TEXT}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:") and '"token_id"' in line:
                    streamed.append(json.loads(line[5:])["token_id"])
        assert streamed == alone["token_ids"]


@pytest.mark.parametrize(
    ("item", "field", "allowed"),
    [
        ({"site": 9, "op": "zero"}, "interventions[0].site", "hidden-state index"),
        ({"site": "blocks.7.hook_mlp_out", "op": "zero"}, "interventions[0].site", "GET /models"),
        ({"site": 1, "op": "steer"}, "interventions[0].op", ["add", "set", "scale", "ablate", "zero"]),
        ({"site": 1, "op": "add", "vector": [1.0, 2.0]}, "interventions[0].vector", "[64]"),
        ({"site": 1, "op": "add"}, "interventions[0].vector", "[64]"),
        ({"site": 1, "op": "set", "vector": [[0.0] * 64] * 2}, "interventions[0].vector", "list of P positions"),
        ({"site": "blocks.0.attn.hook_z", "op": "zero", "heads": [4]}, "interventions[0].heads", "0 to 3"),
        ({"site": 1, "op": "zero", "heads": [0]}, "interventions[0].heads", None),
        ({"site": 1, "op": "zero", "positions": "most"}, "interventions[0].positions", "all"),
        ({"site": 1, "op": "scale"}, "interventions[0].scale", "finite"),  # it would do nothing
        ({"site": 1, "op": "scale", "scale": 1e300}, "interventions[0].scale", "3.402823e+38"),  # inf in float32
        ({"site": 1, "op": "set", "vector": [0.0] * 64, "scale": 2.0}, "interventions[0].scale", None),  # ignored
        ({"site": 1, "op": "zero", "scale": 0.5}, "interventions[0].scale", None),
        ({"site": 1, "op": "ablate", "vector": [[1.0] * 64, [2.0] * 64]}, "interventions[0].vector", "[64]"),
        (
            {
                "site": 1,
                "op": "add",
                "vector": {"data": "AAAA", "shape": [64], "dtype": "float32", "encoding": "base64"},
            },
            "interventions[0].vector",
            "data",
        ),
    ],
)
async def test_bad_interventions_are_422_naming_the_item_and_field(paths, item, field, allowed):
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={"model": paths["llama"], "text": "hi", "interventions": [item]})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == field, body
        if allowed is not None:
            assert allowed == body["allowed"] if isinstance(allowed, list) else allowed in str(body["allowed"]), body
        assert (await c.get("/health")).status_code == 200


async def test_a_wire_tensor_from_an_answer_is_a_vector(paths):
    """A state the server returned (base64, as the client asks) goes back in as an edit's vector unchanged."""
    path = paths["llama"]
    async with concurrent_client(app_with()) as c:
        other = await c.post(
            "/extract",
            json={"model": path, "text": "hello", "hidden_state_layers": [1], "hidden_state_format": "base64"},
        )
        wire = other.json()["hidden_states"]["1"]
        vector = arrays(other.json(), "hidden_states")["1"][0]
        assert wire["shape"] == [1, 64] and wire["encoding"] == "base64"
        body = {"model": path, "text": TEXT, "hidden_state_layers": [1], "positions": "all"}
        item = {"site": 1, "op": "set", "vector": wire, "positions": [-1]}  # one row: one position
        by_wire = await c.post("/extract", json={**body, "interventions": [item]})
        assert by_wire.status_code == 200, by_wire.text
        got = arrays(by_wire.json(), "sequence_hidden_states")["1"]
        np.testing.assert_array_equal(got[-1], vector)


async def test_without_the_interp_plugin_its_fields_are_a_422_naming_them(paths):
    """The kernel keeps the fields; the interp plugin reads them. Without it a request that gives one is refused
    by name, and one that gives none is served as before."""
    from loom_kernel.plugins import create_plugin_manager

    pm = create_plugin_manager()
    pm.unregister(name="interp")
    app = app_with(pm=pm)
    async with concurrent_client(app) as c:
        edit = {"site": 1, "op": "zero"}
        for field, value in (("interventions", [edit]), ("logit_lens", {"layers": [1]}), ("probes", ["p"])):
            r = await c.post("/extract", json={"model": paths["gpt2"], "text": TEXT, field: value})
            assert r.status_code == 422, r.text
            assert r.json()["field"] == field
        r = await c.post("/extract", json={"model": paths["gpt2"], "text": TEXT, "hidden_state_layers": [1]})
        assert r.status_code == 200
        assert (await c.get("/vectors")).status_code == 404
