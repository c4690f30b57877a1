"""``RemoteModel`` (TransformerLens's HookedTransformer over HTTP) against a real `loom serve`, and against what
a TransformerLens user would compute in-process: transformers' modules with torch hooks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from loom_client import InvalidField, RemoteModel, act_name, ops
from serverutil import loom_server
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def gpt2(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteModel]:
    path = str(tiny_models["gpt2"])
    with loom_server(["--preload", path], tmp_path_factory.mktemp("remote-home")) as (base, _, _):
        model = RemoteModel(base, path)
        yield model
        model.client.close()


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path]) -> tuple:
    path = str(tiny_models["gpt2"])
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_cfg_names_and_short_forms(gpt2: RemoteModel) -> None:
    assert (gpt2.cfg.n_layers, gpt2.cfg.d_model, gpt2.cfg.n_heads, gpt2.cfg.d_head) == (3, 64, 4, 16)
    assert gpt2.cfg.d_mlp == 256 and "blocks.2.attn.hook_pattern" in gpt2.hook_points
    assert act_name("z", 1) == "blocks.1.attn.hook_z" and act_name("embed") == "hook_embed"
    assert act_name("normalized", 0, "ln2") == "blocks.0.ln2.hook_normalized"
    assert act_name("scale") == "ln_final.hook_scale" and act_name("pattern", 2) == "blocks.2.attn.hook_pattern"
    assert act_name("q_input", 1) == "blocks.1.hook_q_input" and act_name("mlp_in", 0) == "blocks.0.hook_mlp_in"
    assert {act_name(name, 2) for name in ("attn_in", "k_input", "v_input")} <= set(gpt2.hook_points)


def test_run_with_cache_is_transformers_own(gpt2: RemoteModel, reference: tuple) -> None:
    net, tok = reference
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    kept: dict[str, torch.Tensor] = {}
    block = net.transformer.h[1]
    hooks = [
        block.register_forward_pre_hook(lambda m, a: kept.update(pre=a[0])),
        block.attn.c_proj.register_forward_pre_hook(lambda m, a: kept.update(z=a[0])),
        block.mlp.c_proj.register_forward_pre_hook(lambda m, a: kept.update(post=a[0])),
    ]
    net.set_attn_implementation("eager")  # transformers' own attention weights
    with torch.inference_mode():
        out = net(ids, output_attentions=True)
    net.set_attn_implementation("sdpa")
    for h in hooks:
        h.remove()
    names = ["blocks.1.hook_resid_pre", act_name("z", 1), act_name("post", 1), act_name("pattern", 1)]
    logits, cache = gpt2.run_with_cache(TEXT, names_filter=names)
    assert np.array_equal(gpt2.to_tokens(TEXT), ids.numpy())
    assert logits.shape == (1, ids.shape[1], net.config.vocab_size)
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(cache["resid_pre", 1], kept["pre"].numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["z", 1], kept["z"].view(1, ids.shape[1], 4, 16).numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["post", 1], kept["post"].numpy(), atol=1e-5)
    # TransformerLens's pattern: [batch, head, query, key]
    np.testing.assert_allclose(cache["pattern", 1], out.attentions[1].numpy(), atol=1e-5)
    _, every = gpt2.run_with_cache(TEXT, names_filter=lambda name: name.endswith("hook_attn_out"))
    assert sorted(every) == [f"blocks.{i}.hook_attn_out" for i in range(3)]


def test_run_with_hooks_applies_edits_as_torch_hooks_would(gpt2: RemoteModel, reference: tuple) -> None:
    net, tok = reference
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    neuron = np.zeros(256, dtype=np.float32)
    neuron[7] = 1.0

    def knock(m, a):  # head 2's z at block 0 set to zero, neuron 7 of block 2 scaled out
        z = a[0].clone().view(1, ids.shape[1], 4, 16)
        z[:, :, 2] = 0
        return (z.view(1, ids.shape[1], 64),)

    def neuron_out(m, a):
        x = a[0].clone()
        x[..., 7] = 0
        return (x,)

    hooks = [
        net.transformer.h[0].attn.c_proj.register_forward_pre_hook(knock),
        net.transformer.h[2].mlp.c_proj.register_forward_pre_hook(neuron_out),
    ]
    with torch.inference_mode():
        want = net(ids).logits.numpy()
    for h in hooks:
        h.remove()
    edits = [(act_name("z", 0), ops.zero(heads=[2])), ("blocks.2.mlp.hook_post", ops.ablate(neuron))]
    np.testing.assert_allclose(gpt2.run_with_hooks(TEXT, fwd_hooks=edits), want, atol=1e-4)
    with gpt2.hooks(edits):  # TransformerLens's `with model.hooks(...)`
        np.testing.assert_allclose(gpt2(TEXT), want, atol=1e-4)
    assert not np.allclose(gpt2(TEXT), want, atol=1e-3)  # the context ended
    filtered = [(lambda name: name.endswith("attn.hook_pattern"), ops.zero(heads=[0, 1, 2, 3]))]
    _, cache = gpt2.run_with_cache(TEXT, names_filter=["blocks.0.attn.hook_z"], fwd_hooks=filtered)
    assert not cache["z", 0].any()  # every head of every block knocked out


def test_generate_and_refusals(gpt2: RemoteModel, reference: tuple) -> None:
    net, tok = reference
    enc = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        want = net.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gpt2.generate(TEXT, max_new_tokens=6) == TEXT + tok.decode(want[0, enc["input_ids"].shape[1] :])
    with pytest.raises(InvalidField) as err:
        gpt2.run_with_hooks(TEXT, fwd_hooks=[("blocks.0.attn.hook_pattern", ops.add(np.ones(4)))])
    assert err.value.problem["field"] == "interventions[0].op"
    with pytest.raises(TypeError):
        gpt2.run_with_cache([[1, 2, 3]])


def test_weights_and_logit_attribution(gpt2: RemoteModel, reference: tuple) -> None:
    net, tok = reference
    np.testing.assert_array_equal(gpt2.W_U, net.lm_head.weight.detach().T.numpy())
    np.testing.assert_array_equal(
        gpt2.weight("blocks.1.attn.W_O"), net.transformer.h[1].attn.c_proj.weight.detach().view(4, 16, 64).numpy()
    )
    answer = gpt2.logit_attribution(TEXT, {"tokens": [" the", "."]}, components="heads")
    with torch.inference_mode():
        logits = net(tok(TEXT, return_tensors="pt")["input_ids"]).logits[0, -1]
    good, bad = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" the", "."))
    assert abs(answer["sum"] - float(logits[good] - logits[bad])) < 1e-4


def test_cache_takes_transformerlens_keys_negative_layers_and_compact_names(
    gpt2: RemoteModel, reference: tuple
) -> None:
    """TransformerLens's ActivationCache counts a negative layer from the last block (``cache["resid_post", -1]``
    is block N-1's output, before the final norm) and reads a string key through get_act_name (``"pattern2"``,
    ``"embed"``); get_act_name's own documented examples name the same points."""
    net, tok = reference
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    kept: dict[str, torch.Tensor] = {}
    hook = net.transformer.h[-1].register_forward_hook(
        lambda m, a, out: kept.update(last=out if isinstance(out, torch.Tensor) else out[0])
    )
    net.set_attn_implementation("eager")
    with torch.inference_mode():
        out = net(ids, output_attentions=True)
        embed = net.transformer.wte(ids)
    net.set_attn_implementation("sdpa")
    hook.remove()
    names = ["blocks.2.hook_resid_post", "blocks.2.attn.hook_pattern", "hook_embed", "blocks.1.attn.hook_k"]
    _, cache = gpt2.run_with_cache(TEXT, names_filter=names)
    np.testing.assert_allclose(cache["resid_post", -1], kept["last"].numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["pattern", -1], out.attentions[-1].numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["pattern2"], out.attentions[2].numpy(), atol=1e-5)
    np.testing.assert_allclose(cache["embed"], embed.numpy(), atol=1e-6)
    np.testing.assert_array_equal(cache["key1"], cache["k", 1])
    assert act_name("k6") == "blocks.6.attn.hook_k" and act_name("pre5") == "blocks.5.mlp.hook_pre"
    assert act_name("scale4ln1") == "blocks.4.ln1.hook_scale" and act_name("k", 6, "a") == "blocks.6.attn.hook_k"
    assert act_name("attn_logits", 1) == "blocks.1.attn.hook_attn_scores" and act_name("mlp_post", 0) == act_name(
        "post", 0
    )


def test_return_type_loss_is_transformers_own_language_model_loss(gpt2: RemoteModel, reference: tuple) -> None:
    """TransformerLens's return_type "loss" is the mean next-token cross-entropy, what transformers computes for
    ``labels=input_ids``; "both" is (logits, loss); an unknown return type is refused, not answered with None."""
    net, tok = reference
    texts = [TEXT, "The lazy dog jumps over the quick brown fox"]
    ids = tok(texts, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == len(tok(texts[0])["input_ids"])  # one token count: a batch
    with torch.inference_mode():
        want = [float(net(row[None], labels=row[None]).loss) for row in ids]
    assert gpt2(TEXT, return_type="loss") == pytest.approx(want[0], abs=1e-5)
    assert gpt2.run_with_hooks(texts, return_type="loss") == pytest.approx(sum(want) / 2, abs=1e-5)
    logits, loss = gpt2.run_with_cache(TEXT, names_filter=[], return_type="both")[0]
    assert logits.shape == (1, ids.shape[1], net.config.vocab_size) and loss == pytest.approx(want[0], abs=1e-5)
    assert gpt2.run_with_hooks(TEXT, return_type=None) is None
    with pytest.raises(ValueError):
        gpt2(TEXT, return_type="logprobs")
