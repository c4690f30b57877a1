"""The language model of a multimodal checkpoint (Gemma 3 4B and up, Mistral Small 3.1, LLaVA, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3-VL-MoE, Llama 4), served alone.

Tiny random checkpoints of each wrapper (a 2-block language model under a 2-block vision tower, norms perturbed) are
saved as the hub's are. The reference is the wrapper itself, loaded here by transformers as its own class
(``Gemma3ForConditionalGeneration``...) and run on text: every point against forward hooks on its language model's
modules (which module each point is comes from ``test_architectures.reference_points``, written from each family's
module tree), hidden states against its ``output_hidden_states``, the lens of the last layer against its
log-softmax, greedy tokens against its ``generate``, an edit against the same edit done by torch hooks on it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import torch
from test_architectures import (
    TEXT,
    assert_lens_and_generation,
    close,
    eager_patterns,
    hooked_run,
    record,
    reference_points,
)
from test_batching import arrays
from test_models import app_with, concurrent_client

# Each wrapper's language model, as test_architectures' reference names its family.
FAMILY = {
    "gemma3": "gemma3_text",
    "mistral3": "mistral",
    "llava": "llama",
    "qwen2_vl": "qwen2",
    "qwen2_5_vl": "qwen2",
    "llama4": "llama4_text",
    "qwen3_vl": "qwen3",
    "qwen3_vl_moe": "qwen3_moe",
}


@pytest.fixture(scope="module")
def wrapped(tiny_root: Path) -> Any:
    """(checkpoint directory, the wrapper as transformers loads it, its tokenizer) of a model_type, built once."""
    from loom_transformers.testing import build_tiny_wrapper
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    cache: dict[str, tuple[str, Any, Any]] = {}

    def get(model_type: str) -> tuple[str, Any, Any]:
        if model_type not in cache:
            path = build_tiny_wrapper(model_type, tiny_root)
            net = AutoModelForImageTextToText.from_pretrained(path).eval()
            cache[model_type] = (str(path), net, AutoTokenizer.from_pretrained(path))
        return cache[model_type]

    return get


def language_model(net: Any) -> Any:
    """The wrapper's language model as ``reference_points`` reads a causal LM: its base model and text config."""
    return SimpleNamespace(model=holder(net).language_model_base, config=net.config.text_config)


def holder(net: Any) -> Any:
    """(the module whose children are the towers and the language model, and that language model's base model):
    Llama 4's wrapper holds its towers and a whole causal LM itself, the others a base model holding the towers and
    the language model's base model."""
    if type(net).__name__ == "Llama4ForConditionalGeneration":
        return SimpleNamespace(towers=net, language_model_base=net.language_model.model)
    return SimpleNamespace(towers=net.model, language_model_base=net.model.language_model)


@pytest.mark.parametrize("model_type", sorted(FAMILY))
async def test_a_multimodal_checkpoint_serves_its_language_model_as_the_wrapper_runs_it(wrapped, model_type):
    """Every hook point of the text family's entry, hidden states, the lens and greedy tokens (alone and in a batch
    of rows of different lengths) are the wrapper's own on text; only its language model is in memory."""
    from loom_kernel import module_bytes
    from loom_kernel.memory import estimate_bytes
    from loom_kernel.resolve import resolve_model
    from loom_kernel.types import LoadOptions

    path, net, tok = wrapped(model_type)
    enc = tok(TEXT, return_tensors="pt")
    points, layers, _, final = reference_points(language_model(net), FAMILY[model_type])
    store, handles = record(points)
    norms = {"ln_final.hook_scale": final} | {
        name.replace("hook_normalized", "hook_scale"): module
        for name, (module, side, _) in points.items()
        if name.endswith("hook_normalized") and side == "out" and module is not final
    }
    norm_inputs: dict[str, torch.Tensor] = {}
    for name, norm in norms.items():
        handles.append(norm.register_forward_pre_hook(lambda m, a, name=name: norm_inputs.update({name: a[0][0]})))
    with torch.inference_mode():
        out = net(**enc, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    n = len(layers)
    async with concurrent_client(app_with()) as c:
        r = await c.post("/models/load", json={"model": path})
        assert r.status_code == 200, r.text
        # Only the language model is in memory (the vision tower's weights are never read); the estimate before the
        # load counts the checkpoint's files, vision tower included, so it is never below that.
        size = r.json()["model"]["size_bytes"]
        towers = [m for name, m in holder(net).towers.named_children() if name != "language_model"]  # vision, projector
        assert towers and size == module_bytes(net) - sum(module_bytes(m) for m in towers)
        ref, fp32 = resolve_model(path), LoadOptions(dtype="float32")
        estimate = estimate_bytes(ref, fp32, "cpu")
        assert estimate is not None and size < estimate < 1.6 * size
        # Before its files are here (a hub id), from config.json: its text_config's sizes, the language model's.
        from_config = estimate_bytes(attrs.evolve(ref, path=None), fp32, "cpu")
        assert from_config is not None and 0.7 < from_config / size < 1.3
        listing = (await c.get(f"/models/{path}/sites")).json()
        offered = sorted(listing["sites"])
        body = {"model": path, "text": TEXT, "positions": "all"}
        r = await c.post("/extract", json={**body, "hidden_state_layers": [*range(n + 1), *offered]})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
        for i in range(n + 1):
            close(got[str(i)], out.hidden_states[i][0], f"index {i}")
        assert set(points) <= set(offered), sorted(set(points) - set(offered))
        for name in points:
            close(got[name], store[name], name)
        assert {k for k in offered if k.endswith("hook_scale")} == set(norms), offered
        for name, norm in norms.items():
            x = norm_inputs[name].float()
            eps = next(float(getattr(norm, e)) for e in ("eps", "variance_epsilon") if hasattr(norm, e))
            close(got[name], (x.pow(2).mean(-1, keepdim=True) + eps).sqrt(), name)
        for i, pattern in enumerate(eager_patterns(net, enc)):  # Gemma 3: block 0 local, its window 4 keys
            at = f"blocks.{i}.attn."
            close(got[at + "hook_pattern"].transpose(1, 0, 2), pattern, at + "hook_pattern")
            scores = torch.from_numpy(got[at + "hook_attn_scores"]).double()
            close(torch.softmax(scores, -1).float().numpy(), got[at + "hook_pattern"], at + "hook_attn_scores")
            z, o = torch.from_numpy(got[at + "hook_z"]), layers[i].self_attn.o_proj.weight.detach()
            result = torch.einsum("thd,hdm->thm", z, o.T.reshape(z.shape[1], -1, o.shape[0]))
            close(got[at + "hook_result"], result, at + "hook_result")
        # The sublayers' own copies of the stream: each head's is the block's input, the MLP's the stream between.
        copies = {f"blocks.{i}.hook_{x}" for i in range(n) for x in ("q_input", "k_input", "v_input", "mlp_in")}
        copies |= {f"blocks.{i}.hook_attn_in" for i in range(n)} & set(offered)
        for name in copies:
            at = name.rpartition(".")[0] + "."
            if name.endswith("mlp_in"):
                close(got[name], got[at + "hook_resid_mid"], name)
            else:
                for head in range(got[name].shape[1]):
                    close(got[name][:, head], got[at + "hook_resid_pre"], f"{name} head {head}")
        # Left unchecked here: q and k after the rotary embedding (the self-check at load holds the attention they
        # feed to the model's own).
        inside = copies | {f"blocks.{i}.attn.hook_{x}" for i in range(n) for x in ("pattern", "attn_scores", "result")}
        rotary = {f"blocks.{i}.attn.hook_rot_{x}" for i in range(n) for x in "qk"} & set(offered)  # Llama 4: NoPE
        assert set(offered) - set(points) - set(norms) - inside == rotary
        await assert_lens_and_generation(c, path, net, tok, enc, out, [-1, f"blocks.{n - 1}.hook_resid_post"])


@pytest.mark.parametrize(
    ("model_type", "mlp_out"),
    [
        ("gemma3", "post_feedforward_layernorm"),
        ("qwen2_vl", "mlp"),
        ("qwen2_5_vl", "mlp"),
        ("qwen3_vl", "mlp"),
        ("qwen3_vl_moe", "mlp"),
    ],
)
async def test_edits_on_a_multimodal_checkpoints_language_model_are_the_same_edits_in_the_wrapper(
    wrapped, model_type, mlp_out
):
    """A head knocked out at block 0's ``hook_z`` and a vector added at block 1's ``hook_mlp_out`` (Gemma 3's local
    and global blocks; the language model of Qwen2-VL, Qwen2.5-VL and Qwen3-VL loaded as Qwen2's or Qwen3's causal
    LM) give the states, the lens and the greedy tokens of the wrapper itself (Qwen's multimodal rotary embeddings
    and text positions) under a pre-hook zeroing that head's slice of o_proj's input and a hook adding to what its
    block's MLP output is (the post-feedforward norm's output in Gemma's sandwich)."""
    path, net, tok = wrapped(model_type)
    enc = tok(TEXT, return_tensors="pt")
    lm, cfg = net.model.language_model, net.config.text_config
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    v = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0))

    def knock(module: Any, args: tuple) -> tuple:
        z = args[0].clone()
        z[..., d_head : 2 * d_head] = 0
        return (z,)

    handles = [
        lm.layers[0].self_attn.o_proj.register_forward_pre_hook(knock),
        getattr(lm.layers[1], mlp_out).register_forward_hook(lambda m, a, y: y + 2.0 * v),
    ]
    out, want = hooked_run(net, tok, enc, handles)
    with torch.inference_mode():
        plain = net(**enc, output_hidden_states=True).hidden_states[2]
    assert not torch.allclose(plain, out.hidden_states[2], atol=1e-3)  # the edits show
    edits = [
        {"site": "blocks.1.hook_mlp_out", "op": "add", "vector": v.tolist(), "scale": 2.0},
        {"site": "blocks.0.attn.hook_z", "op": "zero", "heads": [1]},
    ]
    body = {"model": path, "interventions": edits}
    async with concurrent_client(app_with()) as c:
        r = await c.post(
            "/extract",
            json={
                **body,
                "text": TEXT,
                "positions": "all",
                "hidden_state_layers": [1, 2],
                "logit_lens": {"layers": [-1], "top_k": 3},
            },
        )
        assert r.status_code == 200, r.text
        g = await c.post("/generate", json={**body, "prompt": TEXT, "max_tokens": 8, "temperature": 0})
        assert g.status_code == 200, g.text
    got = arrays(r.json(), "sequence_hidden_states")
    for i in (1, 2):
        close(got[str(i)], out.hidden_states[i][0], f"index {i}")
    top = torch.topk(torch.log_softmax(out.logits[0].double(), -1), 3)
    assert [[t["token_id"] for t in row] for row in r.json()["logit_lens"]["-1"]["top_k"]] == top.indices.tolist()
    assert g.json()["token_ids"] == want[0, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
async def test_qwen_vls_multimodal_rotary_on_text_is_the_rotary_the_served_model_applies(wrapped, model_type):
    """The wrapper's multimodal rotary embedding on text (three position sections, all the token's own position, as
    its get_rope_index makes them; Qwen3-VL's interleaved) rotates q and k as the served Qwen2 (Qwen3) model does:
    hook_rot_q and hook_rot_k are the wrapper's own ``apply_rotary_pos_emb`` of its q and k (Qwen3-VL's after its
    q_norm and k_norm) with the cos and sin its rotary embedding handed to each block's attention."""
    path, net, tok = wrapped(model_type)
    enc = tok(TEXT, return_tensors="pt")
    lm, cfg = net.model.language_model, net.config.text_config
    rotary = importlib.import_module(type(net).__module__).apply_rotary_pos_emb
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    seen: dict[str, Any] = {}
    handles = []
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        handles += [
            a.register_forward_pre_hook(
                lambda m, a, kw, i=i: seen.update({i: kw["position_embeddings"]}), with_kwargs=True
            ),
        ]
        # Qwen3-VL norms each head's q and k (q_norm, k_norm) before rotating them: the rotation's input is theirs.
        for x in "qk":
            module = getattr(a, f"{x}_norm", None) or getattr(a, f"{x}_proj")
            handles.append(
                module.register_forward_hook(lambda m, a, y, i=i, x=x: seen.update({f"{x}{i}": y.flatten(2)}))
            )
    try:
        with torch.inference_mode():
            net(**enc)
    finally:
        for handle in handles:
            handle.remove()
    n = len(lm.layers)
    names = [f"blocks.{i}.attn.hook_rot_{x}" for i in range(n) for x in "qk"]
    async with concurrent_client(app_with()) as c:
        r = await c.post(
            "/extract", json={"model": path, "text": TEXT, "positions": "all", "hidden_state_layers": names}
        )
        assert r.status_code == 200, r.text
    got = arrays(r.json(), "sequence_hidden_states")
    for i in range(n):
        q = seen[f"q{i}"].unflatten(-1, (h, -1)).transpose(1, 2)  # [1, heads, T, d_head]
        k = seen[f"k{i}"].unflatten(-1, (kv, -1)).transpose(1, 2)
        rot_q, rot_k = rotary(q, k, *seen[i])
        close(got[f"blocks.{i}.attn.hook_rot_q"], rot_q[0].transpose(0, 1), f"{i} rot_q")
        close(got[f"blocks.{i}.attn.hook_rot_k"], rot_k[0].transpose(0, 1), f"{i} rot_k")


async def test_paligemma_is_refused_before_any_weight_is_read(tmp_path):
    """PaliGemma's config.json has a vocab_size of its own beside its text_config and vision_config: the loader's
    probe refuses it as multimodal (a 422 before the memory budget and before any weight is read). Its weight file
    here is not a safetensors file at all, so a load that read it would answer that instead."""
    import transformers
    from loom_transformers.testing import train_tokenizer

    path = tmp_path / "paligemma"
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    text.update(num_key_value_heads=1, head_dim=16, vocab_size=512)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    vision.update(image_size=28, patch_size=14)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, vocab_size=512)
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    config.save_pretrained(path)
    assert "vocab_size" in config.to_diff_dict()  # what let it past the probe's multimodal rule before
    train_tokenizer("gemma").save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    async with concurrent_client(app_with()) as c:
        r = await c.post("/models/load", json={"model": str(path)})
        assert r.status_code == 422 and r.json()["field"] == "model", r.text
        detail = r.json()["detail"]
        assert "transformers: model_type 'paligemma' is a multimodal model" in detail, detail
        assert "gemma3, llama4, llava, mistral3, qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe" in detail, detail
        assert (await c.get("/health")).json()["loaded_models"] == []


async def test_a_checkpoint_named_as_the_wrappers_module_tree_loads_the_same(wrapped, tmp_path):
    """Some tools save a wrapper's weights by its module tree (``model.language_model.*``, ``lm_head.*``) rather
    than the hub's names (``language_model.model.*``, ``language_model.lm_head.*``): the same language model loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, net, tok = wrapped("mistral3")  # its head is its own weight, not the embedding's
    renamed = tmp_path / "mistral3-module-names"
    shutil.copytree(path, renamed)
    weights = load_file(renamed / "model.safetensors")
    names = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head."}
    moved = {}
    for key, tensor in weights.items():
        old = next((o for o in names if key.startswith(o)), None)
        moved[names[old] + key.removeprefix(old) if old else key] = tensor
    assert "lm_head.weight" in moved and any(k.startswith("model.language_model.") for k in moved)
    save_file(moved, renamed / "model.safetensors", metadata={"format": "pt"})
    enc = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        out = net(**enc, output_hidden_states=True)
    body = {"model": str(renamed), "text": TEXT, "positions": "all", "hidden_state_layers": [0, 2]}
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={**body, "logit_lens": {"layers": [-1], "top_k": 3}})
        assert r.status_code == 200, r.text
    got = arrays(r.json(), "sequence_hidden_states")
    for i in (0, 2):
        close(got[str(i)], out.hidden_states[i][0], f"index {i}")
    top = torch.topk(torch.log_softmax(out.logits[0].double(), -1), 3)
    assert [[t["token_id"] for t in row] for row in r.json()["logit_lens"]["-1"]["top_k"]] == top.indices.tolist()


async def test_qwen3_vl_moes_experts_load_in_either_layout_and_shapes_that_cannot_tell_are_refused(wrapped, tmp_path):
    """Qwen3-VL-MoE's hub checkpoints store each block's fused experts [experts, d_model, 2 * d_expert] and
    [experts, d_expert, d_model] (the tiny checkpoint's, which transformers' own conversion for the wrapper
    transposes); transformers 5's ``save_pretrained`` writes them as its modules hold them. A checkpoint in that
    layout serves the wrapper's own states and lens too. A config whose hidden_size is twice its
    moe_intermediate_size is refused before any weight is read: its shapes could not tell the two layouts apart."""
    import json
    import shutil

    from loom_transformers.testing import transpose_experts
    from safetensors import safe_open

    path, net, tok = wrapped("qwen3_vl_moe")
    modules = tmp_path / "qwen3-vl-moe-module-layout"
    shutil.copytree(path, modules)
    transpose_experts(modules)
    experts = net.model.language_model.layers[1].mlp.experts
    with safe_open(modules / "model.safetensors", "pt") as f:
        names = [k for k in f.keys() if ".mlp.experts." in k]  # noqa: SIM118 (safe_open is not iterable)
        shapes = {k.rpartition(".")[2]: f.get_slice(k).get_shape() for k in names}
    assert shapes == {"gate_up_proj": list(experts.gate_up_proj.shape), "down_proj": list(experts.down_proj.shape)}
    enc = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        out = net(**enc, output_hidden_states=True)
    square = tmp_path / "qwen3-vl-moe-square"
    square.mkdir()
    config = json.loads((Path(path) / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = config["text_config"]["hidden_size"] // 2
    (square / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(square)
    (square / "model.safetensors").write_bytes(b"not a safetensors file")
    body = {"model": str(modules), "text": TEXT, "positions": "all", "hidden_state_layers": [1, 2]}
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={**body, "logit_lens": {"layers": [-1], "top_k": 3}})
        assert r.status_code == 200, r.text
        r2 = await c.post("/models/load", json={"model": str(square)})
        assert r2.status_code == 422 and r2.json()["field"] == "model", r2.text
        assert "moe_intermediate_size 32 their shapes cannot tell which" in r2.json()["detail"], r2.text
    got = arrays(r.json(), "sequence_hidden_states")
    for i in (1, 2):
        close(got[str(i)], out.hidden_states[i][0], f"index {i}")
    top = torch.topk(torch.log_softmax(out.logits[0].double(), -1), 3)
    assert [[t["token_id"] for t in row] for row in r.json()["logit_lens"]["-1"]["top_k"]] == top.indices.tolist()
