"""Every architecture of the transformers loader's table, right at every site, against the model's own modules.

Tiny random-weight models (norms perturbed, so that a site on the wrong side of a norm shows) of each family are
built offline with ``from_config``. The reference is written here from each family's own module tree (which module's
input or output each point is, and how a fused projection splits, as the modeling code splits it), not from the
plugin's table: hidden states against ``output_hidden_states``, every offered point against forward hooks on the
named modules, the pattern against transformers' own eager ``output_attentions``, greedy tokens against
``model.generate``, the lens of the last layer against the model's own log-softmax; every TransformerLens-named
weight ``/weights`` serves against the identity it must satisfy on those points (the survey's models have every
bias nonzero, so that one left out shows), and every other name of TransformerLens's model refused saying why.
Models outside the table, an encoder-decoder, a vision model and an unknown model_type are refused by name.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_batching import arrays
from test_models import app_with, concurrent_client

# The families added with their own short edit lists in test_hook_points.py.
FAMILIES = (
    "olmo",
    "olmo3",
    "qwen2_moe",
    "olmoe",
    "smollm3",
    "exaone4",
    "ministral",
    "seed_oss",
    "arcee",
    "glm4",
    "gpt_oss",
    "cohere2",
    "glm4_moe",
    "llama4_text",
    "deepseek_v3",
    "deepseek_v2",
    "ernie4_5",
    "ernie4_5_moe",
    "hunyuan_v1_dense",
)
LLAMA_LIKE = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "stablelm",
    "starcoder2",
    "olmo2",
    "cohere",
    "phi",
    "gemma",
    "gemma2",
    "gemma3_text",
    *FAMILIES,
)
# Each sublayer's output normed before its add, nothing normed before a sublayer (OLMo 2's block).
POST_NORM = ("olmo2", "olmo3", "exaone4")
# A family's other block, built from its tiny config with these attributes and checked as an architecture of its own:
# Falcon's sequential block (parallel_attn false, as in Falcon-RW) has a post-attention norm and a stream between
# its sublayers, which the default, parallel one has not.
VARIANTS = {
    "falcon_sequential": ("falcon", {"parallel_attn": False}),
    # Falcon-RW's (without its ALiBi): sequential, biases, query_key_value as [heads, 3, d_head] (multi_query false).
    "falcon_rw": ("falcon", {"parallel_attn": False, "bias": True, "multi_query": False}),
    # Llama with attention_bias and mlp_bias: each projection's bias, the gated MLP's too.
    "llama_biased": ("llama", {"attention_bias": True, "mlp_bias": True}),
    # Falcon-40B's and 180B's block (new_decoder_architecture): query_key_value grouped as [kv, heads per kv + 2,
    # d_head], and a LayerNorm of its own before each sublayer (ln_attn, ln_mlp).
    "falcon_grouped": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    # Falcon2-11B's: the grouped projection, one LayerNorm for both sublayers (num_ln_in_parallel_attn 1).
    "falcon_grouped_one_ln": (
        "falcon",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
    ),
    "gpt_bigcode_mha": ("gpt_bigcode", {"multi_query": False}),  # its fused projection as [heads, 3, d_head]
    # OPT-350m's block: post-LN (its norms after the adds, no final norm), and project_in / project_out between the
    # embedding width and the stream's.
    "opt_post_ln": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    # Granite with its embedding, residual and logits multipliers 1, the form the table serves (its tiny model has
    # Granite 3's, which are refused): its attention_multiplier still scales the scores.
    "granite_unscaled": ("granite", {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0}),
}
SURVEY = (
    *LLAMA_LIKE,
    "llama_biased",
    "granite_unscaled",
    "gpt2",
    "gpt_bigcode",
    "gpt_bigcode_mha",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "falcon",
    "falcon_sequential",
    "falcon_rw",
    "falcon_grouped",
    "falcon_grouped_one_ln",
    "opt",
    "opt_post_ln",
    "bloom",
    "bert",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "mpnet",
    "modernbert",
    "mamba",
)
# RoBERTa's blocks are BERT's (XLM-RoBERTa's too); its positions count from its padding index + 1.
BERT_BLOCKS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet")
ENCODERS = (*BERT_BLOCKS, "modernbert")  # ModernBERT's blocks are pre-norm
POST_LN = (*BERT_BLOCKS, "opt_post_ln")  # TransformerLens's BertBlock: each norm after its add
PARALLEL = ("gpt_neox", "gptj", "cohere", "cohere2", "phi", "falcon", "falcon_grouped", "falcon_grouped_one_ln")
TEXT = "the cat sat on the mat and looked at the"


@pytest.fixture(scope="module")
def built(tiny_root: Path) -> Any:
    """This module's tiny models: norms and every bias perturbed (test_hook_points.py builds its own, norms only)."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = build(arch, tiny_root, biases=True)
        return cache[arch]

    return get


def build(arch: str, root: Path, biases: bool = False) -> str:
    """The tiny model of ``arch`` (a family, or one of ``VARIANTS``), its norms perturbed (``biases``: and every
    bias, which a fresh model has at zero: the survey's, where a weight's bias left out would otherwise not show)."""
    from loom_transformers.testing import build_tiny_model

    family, config = VARIANTS.get(arch, (arch, {}))
    name = f"{'biased' if biases else 'norms'}-{arch}"
    return str(build_tiny_model(family, root, name=name, perturb_norms=True, perturb_biases=biases, **config))


def load(path: str, arch: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModel if arch in ENCODERS else AutoModelForCausalLM
    return auto.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# -- the reference: each family's module tree ----------------------------------------------------------------------


def heads(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], n, -1)


def grouped(t: torch.Tensor, kv: int, h: int) -> torch.Tensor:
    """Falcon's grouped query_key_value output [.., kv, heads per kv + 2, d_head]: each group's query heads, then its
    key and its value (``FalconAttention.forward`` with new_decoder_architecture)."""
    return t.reshape(*t.shape[:-1], kv, h // kv + 2, -1)


def reference_points(net: Any, arch: str) -> tuple[dict[str, tuple[Any, str, Any]], Any, Any, Any]:
    """(points, blocks, embedding modules, final norm): each point as (module, "in" | "out", per-token view)."""
    cfg = net.config
    arch = VARIANTS.get(arch, (arch, {}))[0]
    h = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    kv = int(getattr(cfg, "num_key_value_heads", None) or h)
    same = None  # the tensor as the hook sees it
    points: dict[str, tuple[Any, str, Any]] = {}
    if arch in (*LLAMA_LIKE, "granite"):
        base = net.model
        final = base.final_layernorm if arch == "phi" else base.norm
        layers, embeds = base.layers, (base.embed_tokens, None)
    elif arch in ("gpt2", "gpt_bigcode", "gpt_bigcode_mha", "gpt_neo", "gptj"):
        base, final = net.transformer, net.transformer.ln_f
        layers, embeds = base.h, (base.wte, None if arch == "gptj" else base.wpe)
    elif arch == "gpt_neox":
        base, final = net.gpt_neox, net.gpt_neox.final_layer_norm
        layers, embeds = base.layers, (base.embed_in, None)
    elif arch == "falcon":
        base, final = net.transformer, net.transformer.ln_f
        layers, embeds = base.h, (base.word_embeddings, None)
    elif arch == "opt":  # the stream gets project_in's output where there is one; post-LN: no final norm
        base = net.model.decoder
        final = base.final_layer_norm
        layers, embeds = base.layers, (base.project_in or base.embed_tokens, base.embed_positions)
    elif arch == "bloom":  # hook_embed after its embedding LayerNorm, as TransformerLens's Embed (post_embedding_ln)
        base, final = net.transformer, net.transformer.ln_f
        layers, embeds = base.h, (base.word_embeddings_layernorm, None)
    elif arch == "modernbert":  # hook_embed after its embedding LayerNorm; a final norm
        base, final = net, net.final_norm
        layers, embeds = net.layers, (net.embeddings.norm, None)
    elif arch == "distilbert":
        base, final = net, None
        layers, embeds = net.transformer.layer, (net.embeddings.word_embeddings, net.embeddings.position_embeddings)
    elif arch in ENCODERS:
        base, final = net, None
        layers, embeds = net.encoder.layer, (net.embeddings.word_embeddings, net.embeddings.position_embeddings)
    else:  # mamba
        base, final = net.backbone, net.backbone.norm_f
        layers, embeds = base.layers, (base.embeddings, None)
    points["hook_embed"] = (embeds[0], "out", same)
    if embeds[1] is not None:
        points["hook_pos_embed"] = (embeds[1], "out", same)
    if final is not None:
        points["ln_final.hook_normalized"] = (final, "out", same)
    for i, layer in enumerate(layers):
        at = f"blocks.{i}."
        p = {"hook_resid_pre": (layer, "in", same), "hook_resid_post": (layer, "out", same)}
        if arch == "mamba":
            p["ln1.hook_normalized"] = (layer.norm, "out", same)
        elif arch in (*LLAMA_LIKE, "granite"):
            a = layer.self_attn
            m = layer.feed_forward if arch == "llama4_text" else layer.mlp  # Llama 4's MLP under its own name
            if arch == "phi3":  # [q | k | v], as Phi3Attention slices qkv_proj's output
                d_q, d_kv = h * a.head_dim, kv * a.head_dim
                p["attn.hook_q"] = (a.qkv_proj, "out", lambda t, d_q=d_q: heads(t[..., :d_q], h))
                p["attn.hook_k"] = (
                    a.qkv_proj,
                    "out",
                    lambda t, d_q=d_q, d_kv=d_kv: heads(t[..., d_q : d_q + d_kv], kv),
                )
                p["attn.hook_v"] = (a.qkv_proj, "out", lambda t, d_q=d_q, d_kv=d_kv: heads(t[..., d_q + d_kv :], kv))
            elif arch in ("deepseek_v3", "deepseek_v2"):  # latent attention: q per head, [no rotary | rotary]
                q_proj = a.q_b_proj if cfg.q_lora_rank is not None else a.q_proj
                p["attn.hook_q"] = (q_proj, "out", lambda t: heads(t, h))
            elif getattr(cfg, "clip_qkv", None) is None:  # OLMo's clip_qkv clamps them after: not offered
                p["attn.hook_q"] = (a.q_proj, "out", lambda t: heads(t, h))
                p["attn.hook_k"] = (a.k_proj, "out", lambda t: heads(t, kv))
                p["attn.hook_v"] = (a.v_proj, "out", lambda t: heads(t, kv))
            o = a.dense if arch == "phi" else a.o_proj
            p["attn.hook_z"] = (o, "in", lambda t: heads(t, h))
            sandwich = arch in ("gemma2", "gemma3_text", *POST_NORM)
            if arch == "glm4":  # its sandwich norms under other names; post_attention_layernorm is the MLP's input's
                p["hook_attn_out"] = (layer.post_self_attn_layernorm, "out", same)
                p["hook_mlp_out"] = (layer.post_mlp_layernorm, "out", same)
            else:
                p["hook_attn_out"] = (layer.post_attention_layernorm if sandwich else a, "out", same)
                p["hook_mlp_out"] = (layer.post_feedforward_layernorm if sandwich else m, "out", same)
            if arch not in POST_NORM:
                p["ln1.hook_normalized"] = (layer.input_layernorm, "out", same)
            if arch in ("gemma2", "gemma3_text"):
                p["ln2.hook_normalized"] = (layer.pre_feedforward_layernorm, "out", same)
                p["hook_resid_mid"] = (layer.pre_feedforward_layernorm, "in", same)
            elif arch in POST_NORM:
                p["hook_resid_mid"] = (m, "in", same)
            elif arch in ("cohere", "cohere2", "phi"):  # parallel: one norm for both sublayers
                p["ln2.hook_normalized"] = (layer.input_layernorm, "out", same)
            else:
                p["ln2.hook_normalized"] = (layer.post_attention_layernorm, "out", same)
                p["hook_resid_mid"] = (layer.post_attention_layernorm, "in", same)
            if arch in ("phi3", "glm4"):  # [gate | up], as each one's MLP chunks gate_up_proj's output
                p["mlp.hook_pre"] = (m.gate_up_proj, "out", lambda t: t.chunk(2, -1)[0])
                p["mlp.hook_pre_linear"] = (m.gate_up_proj, "out", lambda t: t.chunk(2, -1)[1])
                p["mlp.hook_post"] = (m.down_proj, "in", same)
            elif arch == "arcee":  # not gated: down_proj(relu(up_proj(x)) ** 2)
                p["mlp.hook_pre"] = (m.up_proj, "out", same)
                p["mlp.hook_post"] = (m.down_proj, "in", same)
            elif arch == "starcoder2":
                p["mlp.hook_pre"] = (m.c_fc, "out", same)
                p["mlp.hook_post"] = (m.c_proj, "in", same)
            elif arch == "phi":
                p["mlp.hook_pre"] = (m.fc1, "out", same)
                p["mlp.hook_post"] = (m.fc2, "in", same)
            elif hasattr(m, "gate_proj"):  # dense (Qwen3-MoE's block 1 too); a sparse MoE block has none
                p["mlp.hook_pre"] = (m.gate_proj, "out", same)
                p["mlp.hook_pre_linear"] = (m.up_proj, "out", same)
                p["mlp.hook_post"] = (m.down_proj, "in", same)
        elif arch == "gpt2":
            a, m, d = layer.attn, layer.mlp, cfg.n_embd
            for j, name in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
                p[name] = (a.c_attn, "out", lambda t, j=j, d=d: heads(t.split(d, -1)[j], h))
            p["attn.hook_z"] = (a.c_proj, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a, "out", same), (m, "out", same)
            p["hook_resid_mid"] = (layer.ln_2, "in", same)
            p["ln1.hook_normalized"], p["ln2.hook_normalized"] = (layer.ln_1, "out", same), (layer.ln_2, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.c_fc, "out", same), (m.c_proj, "in", same)
        elif arch.startswith("gpt_bigcode"):
            a, m, d = layer.attn, layer.mlp, cfg.n_embd
            if cfg.multi_query:  # [q | k | v], one key-value head
                sizes, counts = (d, d // h, d // h), (h, 1, 1)
                parts = tuple(lambda t, j=j, s=sizes, c=counts: heads(t.split(s, -1)[j], c[j]) for j in range(3))
            else:  # [heads, 3, d_head], as GPTBigCodeAttention views it
                parts = tuple(lambda t, j=j: heads(t, h).chunk(3, -1)[j] for j in range(3))
            for name, view in zip(("attn.hook_q", "attn.hook_k", "attn.hook_v"), parts, strict=True):
                p[name] = (a.c_attn, "out", view)
            p["attn.hook_z"] = (a.c_proj, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a, "out", same), (m, "out", same)
            p["hook_resid_mid"] = (layer.ln_2, "in", same)
            p["ln1.hook_normalized"], p["ln2.hook_normalized"] = (layer.ln_1, "out", same), (layer.ln_2, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.c_fc, "out", same), (m.c_proj, "in", same)
        elif arch == "gpt_neo":
            a, m = layer.attn.attention, layer.mlp
            p["attn.hook_q"] = (a.q_proj, "out", lambda t: heads(t, h))
            p["attn.hook_k"] = (a.k_proj, "out", lambda t: heads(t, h))
            p["attn.hook_v"] = (a.v_proj, "out", lambda t: heads(t, h))
            p["attn.hook_z"] = (a.out_proj, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (layer.attn, "out", same), (m, "out", same)
            p["hook_resid_mid"] = (layer.ln_2, "in", same)
            p["ln1.hook_normalized"], p["ln2.hook_normalized"] = (layer.ln_1, "out", same), (layer.ln_2, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.c_fc, "out", same), (m.c_proj, "in", same)
        elif arch == "gpt_neox":
            a, m = layer.attention, layer.mlp
            for j, name in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
                p[name] = (a.query_key_value, "out", lambda t, j=j: t.reshape(*t.shape[:-1], h, -1).chunk(3, -1)[j])
            p["attn.hook_z"] = (a.dense, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a, "out", same), (m, "out", same)
            p["ln1.hook_normalized"] = (layer.input_layernorm, "out", same)
            p["ln2.hook_normalized"] = (layer.post_attention_layernorm, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.dense_h_to_4h, "out", same), (m.dense_4h_to_h, "in", same)
        elif arch == "gptj":
            a, m = layer.attn, layer.mlp
            p["attn.hook_q"] = (a.q_proj, "out", lambda t: heads(t, h))
            p["attn.hook_k"] = (a.k_proj, "out", lambda t: heads(t, h))
            p["attn.hook_v"] = (a.v_proj, "out", lambda t: heads(t, h))
            p["attn.hook_z"] = (a.out_proj, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a, "out", same), (m, "out", same)
            p["ln1.hook_normalized"] = p["ln2.hook_normalized"] = (layer.ln_1, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.fc_in, "out", same), (m.fc_out, "in", same)
        elif arch == "falcon":
            a, m = layer.self_attention, layer.mlp
            if cfg.new_decoder_architecture:  # [kv, heads per kv + 2, d_head], as FalconAttention.forward groups it
                g = cfg.num_kv_heads
                p["attn.hook_q"] = (
                    a.query_key_value,
                    "out",
                    lambda t, g=g: grouped(t, g, h)[..., :-2, :].flatten(-3, -2),
                )
                p["attn.hook_k"] = (a.query_key_value, "out", lambda t, g=g: grouped(t, g, h)[..., -2, :])
                p["attn.hook_v"] = (a.query_key_value, "out", lambda t, g=g: grouped(t, g, h)[..., -1, :])
            elif not cfg.multi_query:  # [heads, 3, d_head], as FalconAttention._split_heads views it
                for j, name in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
                    p[name] = (a.query_key_value, "out", lambda t, j=j: t.reshape(*t.shape[:-1], h, 3, -1)[..., j, :])
            else:  # multi-query: [heads + 2, d_head], the last two k and v
                p["attn.hook_q"] = (a.query_key_value, "out", lambda t: heads(t, h + 2)[..., :h, :])
                p["attn.hook_k"] = (a.query_key_value, "out", lambda t: heads(t, h + 2)[..., h : h + 1, :])
                p["attn.hook_v"] = (a.query_key_value, "out", lambda t: heads(t, h + 2)[..., h + 1 :, :])
            p["attn.hook_z"] = (a.dense, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a, "out", same), (m, "out", same)
            if hasattr(layer, "ln_attn"):  # new_decoder_architecture's two norms, as FalconDecoderLayer has them
                p["ln1.hook_normalized"] = (layer.ln_attn, "out", same)
                p["ln2.hook_normalized"] = (layer.ln_mlp, "out", same)
            else:
                p["ln1.hook_normalized"] = p["ln2.hook_normalized"] = (layer.input_layernorm, "out", same)
            if not cfg.parallel_attn:  # sequential: the MLP reads post_attention_layernorm of resid_pre + attn_out
                p["ln2.hook_normalized"] = (layer.post_attention_layernorm, "out", same)
                p["hook_resid_mid"] = (layer.post_attention_layernorm, "in", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.dense_h_to_4h, "out", same), (m.dense_4h_to_h, "in", same)
        elif arch == "opt":  # its MLP side sees the batch flattened to [B * T, d]
            a = layer.self_attn
            p["attn.hook_q"] = (a.q_proj, "out", lambda t: heads(t, h))
            p["attn.hook_k"] = (a.k_proj, "out", lambda t: heads(t, h))
            p["attn.hook_v"] = (a.v_proj, "out", lambda t: heads(t, h))
            p["attn.hook_z"] = (a.out_proj, "in", lambda t: heads(t, h))
            p["mlp.hook_pre"], p["mlp.hook_post"] = (layer.fc1, "out", same), (layer.fc2, "in", same)
            p["hook_mlp_out"] = (layer.fc2, "out", same)
            p["ln1.hook_normalized"] = (layer.self_attn_layer_norm, "out", same)
            p["ln2.hook_normalized"] = (layer.final_layer_norm, "out", same)
            if cfg.do_layer_norm_before:
                p["hook_attn_out"] = (a, "out", same)
                p["hook_resid_mid"] = (layer.final_layer_norm, "in", same)
            else:  # post-LN (OPT-350m), as TransformerLens's BertBlock: each sum is its LayerNorm's input
                p["hook_attn_out"] = (a.out_proj, "out", same)
                p["hook_resid_mid"] = (layer.self_attn_layer_norm, "in", same)
                p["hook_resid_post"] = (layer.final_layer_norm, "in", same)
        elif arch == "bloom":  # its attention and MLP modules add the residual themselves
            a, m = layer.self_attention, layer.mlp
            for j, name in enumerate(("attn.hook_q", "attn.hook_k", "attn.hook_v")):  # as BloomAttention._reshape
                p[name] = (a.query_key_value, "out", lambda t, j=j: t.reshape(*t.shape[:-1], h, 3, -1)[..., j, :])
            p["attn.hook_z"] = (a.dense, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a.dense, "out", same), (m.dense_4h_to_h, "out", same)
            p["hook_resid_mid"] = (a, "out", same)  # the stream its norm reads and its MLP adds to
            p["ln1.hook_normalized"] = (layer.input_layernorm, "out", same)
            p["ln2.hook_normalized"] = (layer.post_attention_layernorm, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.dense_h_to_4h, "out", same), (m.dense_4h_to_h, "in", same)
        elif arch == "modernbert":  # pre-norm; block 0's attn_norm an Identity (no ln1 there)
            a, m = layer.attn, layer.mlp
            for j, name in enumerate(
                ("attn.hook_q", "attn.hook_k", "attn.hook_v")
            ):  # as ModernBertAttention views Wqkv
                p[name] = (a.Wqkv, "out", lambda t, j=j: t.reshape(*t.shape[:-1], 3, h, -1)[..., j, :, :])
            p["attn.hook_z"] = (a.Wo, "in", lambda t: heads(t, h))
            p["hook_attn_out"], p["hook_mlp_out"] = (a, "out", same), (m, "out", same)
            if i > 0:
                p["ln1.hook_normalized"] = (layer.attn_norm, "out", same)
            p["ln2.hook_normalized"] = (layer.mlp_norm, "out", same)
            p["hook_resid_mid"] = (layer.mlp_norm, "in", same)
            # Wi's output is [input | gate], ModernBertMLP's act(input) * gate.
            p["mlp.hook_pre"] = (m.Wi, "out", lambda t: t.chunk(2, -1)[0])
            p["mlp.hook_pre_linear"] = (m.Wi, "out", lambda t: t.chunk(2, -1)[1])
            p["mlp.hook_post"] = (m.Wo, "in", same)
        elif arch == "distilbert":  # BERT's post-LN block under its own names
            a, m = layer.attention, layer.ffn
            p["attn.hook_q"] = (a.q_lin, "out", lambda t: heads(t, h))
            p["attn.hook_k"] = (a.k_lin, "out", lambda t: heads(t, h))
            p["attn.hook_v"] = (a.v_lin, "out", lambda t: heads(t, h))
            p["attn.hook_z"] = (a.out_lin, "in", lambda t: heads(t, h))
            p["hook_attn_out"] = (a, "out", same)
            p["hook_resid_mid"] = (layer.sa_layer_norm, "in", same)
            p["ln1.hook_normalized"] = (layer.sa_layer_norm, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (m.lin1, "out", same), (m.lin2, "in", same)
            p["hook_mlp_out"] = (m, "out", same)
            p["ln2.hook_normalized"] = (layer.output_layer_norm, "out", same)
            p["hook_resid_post"] = (layer.output_layer_norm, "in", same)
        elif arch == "mpnet":  # BERT's post-LN block, its projections in attention.attn
            a, core = layer.attention, layer.attention.attn
            p["attn.hook_q"] = (core.q, "out", lambda t: heads(t, h))
            p["attn.hook_k"] = (core.k, "out", lambda t: heads(t, h))
            p["attn.hook_v"] = (core.v, "out", lambda t: heads(t, h))
            p["attn.hook_z"] = (core.o, "in", lambda t: heads(t, h))
            p["hook_attn_out"] = (core.o, "out", same)
            p["hook_resid_mid"] = (a.LayerNorm, "in", same)
            p["ln1.hook_normalized"] = (a.LayerNorm, "out", same)
            p["mlp.hook_pre"] = (layer.intermediate.dense, "out", same)
            p["mlp.hook_post"] = (layer.output.dense, "in", same)
            p["hook_mlp_out"] = (layer.output.dense, "out", same)
            p["ln2.hook_normalized"] = (layer.output.LayerNorm, "out", same)
            p["hook_resid_post"] = (layer.output.LayerNorm, "in", same)
        else:  # bert, roberta: post-LN, TransformerLens's BertBlock
            a = layer.attention
            p["attn.hook_q"] = (a.self.query, "out", lambda t: heads(t, h))
            p["attn.hook_k"] = (a.self.key, "out", lambda t: heads(t, h))
            p["attn.hook_v"] = (a.self.value, "out", lambda t: heads(t, h))
            p["attn.hook_z"] = (a.output.dense, "in", lambda t: heads(t, h))
            p["hook_attn_out"] = (a.output.dense, "out", same)
            p["hook_resid_mid"] = (a.output.LayerNorm, "in", same)
            p["ln1.hook_normalized"] = (a.output.LayerNorm, "out", same)
            p["mlp.hook_pre"], p["mlp.hook_post"] = (
                (layer.intermediate.dense, "out", same),
                (layer.output.dense, "in", same),
            )
            p["hook_mlp_out"] = (layer.output.dense, "out", same)
            p["ln2.hook_normalized"] = (layer.output.LayerNorm, "out", same)
            # TransformerLens's BertBlock: resid_post = ln1's output + mlp_out, before ln2 (the block's output, the
            # next block's resid_pre, is ln2's).
            p["hook_resid_post"] = (layer.output.LayerNorm, "in", same)
        for name, point in p.items():
            points[at + name] = point
    return points, layers, embeds, final


def not_offered(net: Any, arch: str) -> dict[str, str]:
    """The points a block does not compute, each with a word of why: q, k and v where OLMo's attention clamps them
    after their projections (``clip_qkv``), the rotary points of a block that rotates nothing (SmolLM3's
    ``no_rope_layers`` 0; EXAONE 4's global layers, where it has sliding ones, as ``Exaone4Attention`` decides)."""
    cfg = net.config
    out: dict[str, str] = {}
    for i in range(cfg.num_hidden_layers):
        at = f"blocks.{i}.attn."
        if arch in ("olmo", "olmoe") and cfg.clip_qkv is not None:
            out |= {at + name: "clamps" for name in ("hook_q", "hook_k", "hook_v")}
        nope = (
            (arch in ("smollm3", "llama4_text") and not cfg.no_rope_layers[i])
            or (arch == "exaone4" and cfg.sliding_window is not None and cfg.layer_types[i] != "sliding_attention")
            # Cohere2Attention rotates only in its sliding-window blocks.
            or (arch == "cohere2" and (cfg.sliding_window is None or cfg.layer_types[i] != "sliding_attention"))
        )
        if nope:
            out |= {at + name: "NoPE" for name in ("hook_rot_q", "hook_rot_k")}
        if arch == "modernbert" and i == 0:  # its attn_norm is an Identity
            out |= {f"blocks.0.ln1.hook_{x}": "has no norm before attention" for x in ("normalized", "scale")}
        if arch in ("deepseek_v3", "deepseek_v2"):  # no module outputs a head's key or value; the cache holds latents
            out |= {at + "hook_k": "latent attention", at + "hook_v": "latent attention", at + "hook_rot_k": "rebuilt"}
    return out


def record(points: dict[str, tuple[Any, str, Any]]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, (module, side, view) in points.items():

        def keep(t: Any, name: str = name, view: Any = view) -> None:
            t = t.detach().reshape(-1, t.shape[-1]).clone()  # the one row [T, D] (OPT's MLP side: [T, D] already)
            store[name] = view(t) if view is not None else t

        if side == "in":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, kw, keep=keep: keep(a[0] if a else kw["hidden_states"]), with_kwargs=True
                )
            )
        else:
            handles.append(
                module.register_forward_hook(lambda m, a, o, keep=keep: keep(o[0] if isinstance(o, tuple) else o))
            )
    return store, handles


def with_sinks(scores: torch.Tensor, layer: Any) -> torch.Tensor:
    """The softmax of a block's scores [T, heads, keys], and, where its attention has sinks (GPT-OSS's eager
    attention: one logit per head appended to each row, its column dropped after the softmax), theirs too."""
    sinks = getattr(getattr(layer, "self_attn", None), "sinks", None)
    if sinks is None:
        return torch.softmax(scores, -1)
    column = sinks.detach().double().reshape(1, -1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]


def eps_of(norm: Any) -> float:
    """A norm's epsilon: its attribute, or OLMo's LayerNorm's, which holds none (its forward calls F.layer_norm with
    eps=1e-5)."""
    if type(norm).__name__ == "OlmoLayerNorm":
        return 1e-5
    return next(float(getattr(norm, e)) for e in ("eps", "variance_epsilon") if hasattr(norm, e))


def eager_patterns(net: Any, enc: Any) -> list[torch.Tensor]:
    """transformers' own attention weights per block, [heads, T, T], under its eager attention."""
    current = net.config._attn_implementation
    net.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = net(**enc, output_attentions=True)
    finally:
        net.set_attn_implementation(current)
    return [a[0] for a in out.attentions]


def close(got: np.ndarray, want: Any, name: str, atol: float = 2e-5) -> None:
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=atol * scale, rtol=0, err_msg=name)


def hooked_run(net: Any, tok: Any, enc: Any, handles: list[Any]) -> tuple[Any, torch.Tensor]:
    """The model's own outputs (hidden states) and greedy tokens (8) with ``handles``' hooks on, removed after."""
    try:
        with torch.inference_mode():
            out = net(**enc, output_hidden_states=True)
            return out, net.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", SURVEY)
async def test_every_site_of_every_architecture_is_the_models_own(built, arch):
    path = built(arch)
    net, tok = load(path, arch)
    enc = tok(TEXT, return_tensors="pt")
    points, layers, _, final = reference_points(net, arch)
    store, handles = record(points)
    # Every norm's input, by the name of its scale: the final norm, and each block's norms (the modules whose
    # output the reference names ln1/ln2.hook_normalized).
    norms = {"ln_final.hook_scale": final} if final is not None else {}
    norms |= {
        name.replace("hook_normalized", "hook_scale"): module
        for name, (module, side, _) in points.items()
        if name.endswith("hook_normalized") and side == "out" and module is not final
    }
    norm_inputs: dict[str, torch.Tensor] = {}
    for name, norm in norms.items():
        handles.append(
            norm.register_forward_pre_hook(
                lambda m, a, name=name: norm_inputs.update({name: a[0].reshape(-1, a[0].shape[-1])})
            )
        )
    with torch.inference_mode():
        out = net(**enc, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    n = len(layers)
    states = [s[0] for s in out.hidden_states]
    if arch == "mamba":  # its output_hidden_states has no embedding entry: block outputs, then norm_f's
        states = [store["hook_embed"], *states[: n - 1], states[n]]
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        listing = (await c.get(f"/models/{path}/sites")).json()
        offered = sorted(listing["sites"])
        body = {"model": path, "text": TEXT, "positions": "all"}
        r = await c.post("/extract", json={**body, "hidden_state_layers": [*range(n + 1), *offered]})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
        # Hidden states: every index against output_hidden_states.
        for i in range(n + 1):
            close(got[str(i)], states[i], f"index {i}")
        # Every point the reference names is offered, and equals the module's own input or output.
        assert set(points) <= set(offered), sorted(set(points) - set(offered))
        for name in points:
            close(got[name], store[name], name)
        for name, why in not_offered(net, arch).items():
            assert why in listing["unavailable"][name], (name, listing["unavailable"].get(name))
        # The points computed from others: each head's result through its share of W_O, and the final scale.
        for i in range(n):
            at = f"blocks.{i}."
            if at + "attn.hook_result" in offered:
                o = points[at + "attn.hook_z"][0]
                z = torch.from_numpy(got[at + "attn.hook_z"])
                w = o.weight.detach()
                w_o = (
                    w.reshape(z.shape[1], -1, w.shape[1])
                    if type(o).__name__ == "Conv1D"
                    else w.T.reshape(z.shape[1], -1, w.shape[0])
                )
                close(got[at + "attn.hook_result"], torch.einsum("thd,hdm->thm", z, w_o), at + "attn.hook_result")
        assert {k for k in offered if k.endswith("hook_scale")} == set(norms), sorted(offered)
        for name, norm in norms.items():
            x = norm_inputs[name].float()
            centred = x - x.mean(-1, keepdim=True) if "layernorm" in type(norm).__name__.lower() else x
            close(got[name], (centred.pow(2).mean(-1, keepdim=True) + eps_of(norm)).sqrt(), name)
        # Inside attention: the pattern is transformers' own eager attention weights, the scores its logits.
        if arch != "mamba":  # GPT-Neo's from its own ``_attn``, the others' from transformers' attention function
            for i, pattern in enumerate(eager_patterns(net, enc)):
                at = f"blocks.{i}.attn."
                close(got[at + "hook_pattern"].transpose(1, 0, 2), pattern, at + "hook_pattern")
                scores = torch.from_numpy(got[at + "hook_attn_scores"]).double()
                if arch not in ENCODERS:  # causal: later keys masked with the most negative float, 0 in the pattern
                    later = torch.ones(scores.shape[0], scores.shape[2], dtype=torch.bool).triu(1)
                    assert bool((scores.transpose(0, 1)[:, later] == torch.finfo(torch.float32).min).all())
                    assert float(torch.from_numpy(got[at + "hook_pattern"]).transpose(0, 1)[:, later].abs().max()) == 0
                close(with_sinks(scores, layers[i]).float().numpy(), got[at + "hook_pattern"], at + "hook_attn_scores")
                if arch == "gpt_neo":  # unscaled q.k where a key is seen (local layers: within the window)
                    q, k = (torch.from_numpy(got[f"blocks.{i}.attn.hook_{x}"]).double() for x in "qk")
                    seen = scores != torch.finfo(torch.float32).min
                    assert bool(seen.diagonal(dim1=0, dim2=2).all())
                    close(scores[seen].numpy(), torch.einsum("thd,shd->ths", q, k)[seen].numpy(), at + "q.k")
                elif VARIANTS.get(arch, (arch, {}))[0] in ("opt", "bloom"):
                    # q.k / sqrt(d_head) where a key is seen (OPT scales its query before the attention function),
                    # and BLOOM's ALiBi bias as its model builds it: the slope times the key's position.
                    q, k = (torch.from_numpy(got[f"blocks.{i}.attn.hook_{x}"]).double() for x in "qk")
                    want_scores = torch.einsum("thd,shd->ths", q, k) / q.shape[-1] ** 0.5
                    if arch == "bloom":
                        modeling = importlib.import_module(type(net).__module__)
                        alibi = modeling.build_alibi_tensor(enc["attention_mask"], q.shape[1], torch.float32)
                        want_scores = want_scores + alibi.transpose(0, 1).double()
                    seen = scores != torch.finfo(torch.float32).min
                    close(scores[seen].numpy(), want_scores[seen].numpy(), at + "scaled q.k")
        # The sublayers' own copies of the stream they read (TransformerLens's hook_attn_in, hook_q/k/v_input, one
        # per head, and hook_mlp_in): the block's input, and what the MLP's side reads.
        for i in range(n):
            at = f"blocks.{i}."
            for name in ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"):
                if at + name in offered:
                    copies = got[at + name]
                    for head in range(copies.shape[1]):
                        close(copies[:, head], got[at + "hook_resid_pre"], f"{at}{name} head {head}")
            if arch in POST_LN:
                reads = "ln1.hook_normalized"
            else:
                reads = "hook_resid_pre" if arch in PARALLEL else "hook_resid_mid"
            if at + "hook_mlp_in" in offered:
                close(got[at + "hook_mlp_in"], got[at + reads], at + "hook_mlp_in")
            else:  # no MLP, or one norm read by both sublayers
                assert arch == "mamba" or arch in PARALLEL, (arch, listing["unavailable"][at + "hook_mlp_in"])
        # What the blocks add: resid_pre + attn_out (+ mlp_out) is the next stream.
        for i in range(n):
            at = f"blocks.{i}."
            pre, post = got[at + "hook_resid_pre"], got[at + "hook_resid_post"]
            if arch in POST_LN:  # each sum is the input of the LayerNorm after it
                close(pre + got[at + "hook_attn_out"], got[at + "hook_resid_mid"], at + "mid")
                close(got[at + "ln1.hook_normalized"] + got[at + "hook_mlp_out"], post, at + "sum")
                continue
            if arch == "mamba":
                continue
            attn, mlp = got[at + "hook_attn_out"], got[at + "hook_mlp_out"]
            if arch in PARALLEL:
                close(pre + attn + mlp, post, at + "sum")
                assert "parallel" in listing["unavailable"][at + "hook_resid_mid"]
                refused = await c.post("/extract", json={**body, "hidden_state_layers": [at + "hook_resid_mid"]})
                assert refused.status_code == 422 and "parallel" in refused.json()["detail"]
            else:
                close(pre + attn, got[at + "hook_resid_mid"], at + "mid")
                close(got[at + "hook_resid_mid"] + mlp, post, at + "sum")
        await assert_weights_satisfy_their_identities(c, path, arch, net, enc, out, got, offered, norms, norm_inputs)
        if arch in ENCODERS:
            return
        # The last block's output through the final norm (OPT-350m: through project_out) and head, as index -1 is
        # through the head.
        last = f"blocks.{n - 1}.{'ln2.hook_normalized' if arch in POST_LN else 'hook_resid_post'}"
        await assert_lens_and_generation(c, path, net, tok, enc, out, [-1, last])


# TransformerLens's names of weights (the others /weights lists are the model's own parameter names).
TL_WEIGHT = re.compile(
    r"W_E|W_pos|W_U|b_U|(embed\.ln|ln_final)\.[wb]|blocks\.\d+\.(ln[12]\.[wb]|attn\._?[Wb]_[QKVO]|mlp\.[Wb]_(in|gate|out))"
)


def output_norms(layer: Any, arch: str) -> tuple[Any, Any]:
    """The norms a block applies to its attention's and its MLP's output before the add (sandwich and post-norm
    blocks: TransformerLens's hook_attn_out and hook_mlp_out are after them), or Nones."""
    if arch == "glm4":
        return layer.post_self_attn_layernorm, layer.post_mlp_layernorm
    if arch in ("gemma2", "gemma3_text", *POST_NORM):
        return layer.post_attention_layernorm, layer.post_feedforward_layernorm
    return None, None


def transformer_lens_weights(net: Any, arch: str, points: dict[str, Any]) -> set[str]:
    """The names TransformerLens's model of the family has, each of which /weights serves or refuses saying why:
    W_E, W_pos, ln_final.w, W_U and b_U (with an LM head); each block's ln1.w and ln2.w, attention's W_Q, W_K, W_V,
    W_O and their biases, the MLP's W_in, W_out and their biases (W_gate, b_gate where it is gated); Mamba's
    block norms."""
    n = net.config.num_hidden_layers
    out = {"W_E", "W_pos", "ln_final.w"} | ({"W_U", "b_U"} if arch not in ENCODERS else set())
    for i in range(n):
        at = f"blocks.{i}."
        out.add(at + "ln1.w")
        if arch == "mamba":
            continue
        out |= {f"{at}{name}" for name in ("ln2.w", "mlp.W_in", "mlp.b_in", "mlp.W_out", "mlp.b_out")}
        out |= {f"{at}attn.{w}_{x}" for w in "Wb" for x in "QKVO"}
        if at + "mlp.hook_pre_linear" in points:
            out |= {at + "mlp.W_gate", at + "mlp.b_gate"}
    return out


def weight_refusals(net: Any, arch: str, points: dict[str, Any]) -> dict[str, str]:
    """The TransformerLens names a family's model has no exact weight for, each with a word of why: W_pos without
    learned positions; OPT-350m's W_E and W_U (project_in / project_out between the widths); OLMo's W_Q, W_K, W_V
    (clip_qkv clamps their outputs), and its norms' weights (a LayerNorm without parameters); DeepSeek's W_K and W_V
    (latent attention) and V3's W_Q (q_b_proj reads a latent); the MLP weights of a block of experts; ln1 and ln2
    where nothing norms a sublayer's input (post-norm, ModernBERT's block 0); ln_final without a final norm; a bias
    the module lacks."""
    cfg = net.config
    family = VARIANTS.get(arch, (arch, {}))[0]
    out: dict[str, str] = {}
    if "hook_pos_embed" not in points:
        out["W_pos"] = "no learned position embedding"
    if arch == "opt_post_ln":
        out |= {"W_E": "project_in", "W_U": "project_in", "b_U": "project_in"}
    if "ln_final.hook_normalized" not in points and arch != "opt_post_ln":
        out["ln_final.w"] = "no final norm"
    for name, why in not_offered(net, arch).items():  # the points' reasons are the weights'
        at, _, point = name.rpartition(".")
        letter = {"hook_q": "Q", "hook_k": "K", "hook_v": "V"}.get(point)
        if letter:
            out[f"{at}.W_{letter}"] = why
        if name.endswith("ln1.hook_normalized"):
            out[name.replace("hook_normalized", "w")] = why
    for i in range(cfg.num_hidden_layers if arch != "mamba" else 0):
        at = f"blocks.{i}."
        if family == "olmo":
            out[at + "ln1.w"] = out[at + "ln2.w"] = "has no weight"
        if family == "deepseek_v3":
            out[at + "attn.W_Q"] = out[at + "attn.b_Q"] = "low-rank latent"
        if at + "mlp.hook_pre" not in points:
            out[at + "mlp.W_in"] = out[at + "mlp.W_out"] = "mixture of experts"
        if arch in POST_NORM:
            out[at + "ln1.w"] = out[at + "ln2.w"] = "normalizes each sublayer's output"
        modules = {f"attn.b_{x}": points.get(f"{at}attn.hook_{x.lower()}") for x in "QKV"}
        modules |= {"mlp.b_out": points.get(at + "mlp.hook_post")}
        modules |= {
            "mlp.b_in": points.get(
                at + ("mlp.hook_pre_linear" if at + "mlp.hook_pre_linear" in points else "mlp.hook_pre")
            )
        }
        for name, point in modules.items():
            module = point[0] if point is not None else None
            if module is not None and getattr(module, "bias", None) is None and "Conv1D" not in type(module).__name__:
                out.setdefault(at + name, "has no bias")
    return out


async def assert_weights_satisfy_their_identities(
    c: Any,
    path: str,
    arch: str,
    net: Any,
    enc: Any,
    out: Any,
    got: dict[str, np.ndarray],
    offered: list[str],
    norms: dict[str, Any],
    norm_inputs: dict[str, torch.Tensor],
) -> None:
    """Every TransformerLens-named weight /weights offers, in TransformerLens's layout, computes what the model
    computes from the served (module-checked) points: W_E[tokens] is hook_embed (through BLOOM's and ModernBERT's
    embedding norm, embed.ln); W_pos[t] hook_pos_embed; each norm's w and b give its hook_normalized from its input
    and hook_scale; hook_q/k/v[h] = (what attention reads) @ W_Q/K/V[h] + b (W_K, W_V repeated per query head,
    _W_K, _W_V per key-value head); sum_h hook_z[h] @ W_O[h] + b_O is hook_attn_out (through a post-attention
    norm); (what the MLP reads) @ W_in + b_in is hook_pre (gated: hook_pre_linear, and W_gate's hook_pre);
    hook_post @ W_out + b_out is hook_mlp_out; ln_final.hook_normalized @ W_U + b_U the model's own logits (Gemma 2's
    soft-capping applied). One listing and one request of every such name."""
    from loom_client import decode

    listing = (await c.get(f"/models/{path}/weights")).json()
    names = sorted(n for n in listing["weights"] if TL_WEIGHT.fullmatch(n))
    # Every name of TransformerLens's model is served or refused saying why, the family's refusals with theirs.
    refused = listing["unavailable"]
    assert not set(refused) & set(names), sorted(set(refused) & set(names))
    points = reference_points(net, arch)[0]
    missing = transformer_lens_weights(net, arch, points) - set(names) - set(refused)
    assert not missing, sorted(missing)
    for name, why in weight_refusals(net, arch, points).items():
        assert why in refused.get(name, ""), (name, refused.get(name), sorted(names))
    if refused:  # asked for, a refused name is a 422 saying why
        first = sorted(refused)[0]
        r = await c.get(f"/models/{path}/weights", params={"names": first})
        assert r.status_code == 422 and refused[first] in r.json()["detail"], r.text
    if not names:
        return
    r = await c.get(f"/models/{path}/weights", params={"names": ",".join(names), "format": "base64"})
    assert r.status_code == 200, r.text
    w = {k: torch.from_numpy(v.copy()).double() for k, v in decode.arrays(r.json())["weights"].items()}
    g = {k: torch.from_numpy(got[k]).double() for k in offered if k in got}
    checked: set[str] = set()

    def check(have: torch.Tensor, want: torch.Tensor, *used: str) -> None:
        close(have.numpy(), want.numpy(), " ".join(used))
        checked.update(used)

    def plus(y: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[str, ...]]:
        return (y + w[name], (name,)) if name in w else (y, ())

    tokens = enc["input_ids"][0]
    if "W_E" in w:
        e, used = w["W_E"][tokens], ("W_E",)
        if "embed.ln.w" in w:  # BLOOM's and ModernBERT's embedding norm: hook_embed is its output
            eps = reference_points(net, arch)[2][0].eps
            e = torch.nn.functional.layer_norm(e, e.shape[-1:], eps=eps) * w["embed.ln.w"]
            e, more = plus(e, "embed.ln.b")
            used += ("embed.ln.w", *more)
        check(g["hook_embed"], e, *used)
    if "W_pos" in w:
        check(g["hook_pos_embed"], w["W_pos"][: len(tokens)], "W_pos")
    for name, norm in norms.items():  # each norm's w and b: its output from its input and its scale
        prefix = name.removesuffix(".hook_scale")
        if f"{prefix}.w" not in w:
            continue
        x = norm_inputs[name].double()
        centred = x - x.mean(-1, keepdim=True) if "layernorm" in type(norm).__name__.lower() else x
        y, more = plus(centred / g[name] * w[f"{prefix}.w"], f"{prefix}.b")
        check(g[f"{prefix}.hook_normalized"], y, f"{prefix}.w", *more)
    layers = reference_points(net, arch)[1]
    for i in range(net.config.num_hidden_layers if arch != "mamba" else 0):
        at = f"blocks.{i}."
        ln1 = at + "ln1.hook_normalized"
        reads = g[at + "hook_resid_pre"] if arch in POST_LN or ln1 not in g else g[ln1]  # what attention reads
        for x in "QKV":
            for own in ("", "_"):  # W_K per query head (key-value heads repeated), _W_K per key-value head
                name = f"{at}attn.{own}W_{x}"
                if name not in w:
                    continue
                y, more = plus(torch.einsum("td,hde->the", reads, w[name]), f"{at}attn.{own}b_{x}")
                have = g[f"{at}attn.hook_{x.lower()}"]
                have = have.repeat_interleave(y.shape[1] // have.shape[1], 1)
                check(have, y, name, *more)
        post_attn, post_mlp = output_norms(layers[i], arch)

        def through(norm: Any, y: torch.Tensor) -> torch.Tensor:
            if norm is None:
                return y
            with torch.inference_mode():
                return norm(y.float()).double()

        if at + "attn.W_O" in w:
            y = torch.einsum("thd,hdm->tm", g[at + "attn.hook_z"], w[at + "attn.W_O"])
            y, more = plus(y, at + "attn.b_O")
            check(g[at + "hook_attn_out"], through(post_attn, y), at + "attn.W_O", *more)
        if arch in POST_LN:  # what the MLP reads
            mlp_reads = g.get(ln1)
        else:
            mlp_reads = g.get(at + ("hook_resid_mid" if arch in POST_NORM else "ln2.hook_normalized"))
        gated = at + "mlp.W_gate" in w
        for name, point in (("W_in", "hook_pre_linear" if gated else "hook_pre"), ("W_gate", "hook_pre")):
            if f"{at}mlp.{name}" in w:
                y = mlp_reads @ w[f"{at}mlp.{name}"]
                y, more = plus(y, f"{at}mlp.b_{name[2:]}")
                check(g[f"{at}mlp.{point}"], y, f"{at}mlp.{name}", *more)
        if at + "mlp.W_out" in w:
            y, more = plus(g[at + "mlp.hook_post"] @ w[at + "mlp.W_out"], at + "mlp.b_out")
            check(g[at + "hook_mlp_out"], through(post_mlp, y), at + "mlp.W_out", *more)
    if "W_U" in w:
        y, more = plus(g["ln_final.hook_normalized"] @ w["W_U"], "b_U")
        cap = getattr(net.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2's final soft-capping, not linear: W_U gives the logits before it
            y = torch.tanh(y / cap) * cap
        check(torch.from_numpy(out.logits[0].double().numpy()), y, "W_U", *more)
    assert set(names) == checked, sorted(set(names) - checked)


async def assert_lens_and_generation(c: Any, path: str, net: Any, tok: Any, enc: Any, out: Any, layers: list) -> None:
    """The lens of each of ``layers`` is the model's own next-token distribution at every position (``out``, its
    pass over ``TEXT``); its greedy tokens are transformers' own, alone and left-padded in one batch with a shorter
    row."""
    own = torch.log_softmax(out.logits[0].double(), -1)
    top = torch.topk(own, 5)
    body = {"model": path, "text": TEXT, "positions": "all", "logit_lens": {"layers": layers, "top_k": 5}}
    r = await c.post("/extract", json=body)
    assert r.status_code == 200, r.text
    for key in map(str, layers):
        entry = r.json()["logit_lens"][key]
        assert [[t["token_id"] for t in row] for row in entry["top_k"]] == top.indices.tolist(), key
        got_lp = [[t["logprob"] for t in row] for row in entry["top_k"]]
        np.testing.assert_allclose(got_lp, top.values.numpy(), atol=1e-5, err_msg=key)
    await assert_greedy(c, path, net, tok, enc)


async def assert_greedy(c: Any, path: str, net: Any, tok: Any, enc: Any) -> None:
    """The served greedy tokens of ``TEXT`` are transformers' ``generate``'s, alone and left-padded in one running
    batch with a shorter row (which gets what it gets alone)."""
    with torch.inference_mode():
        want = net.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    ask = {"model": path, "max_tokens": 8, "temperature": 0}
    g = await c.post("/generate", json={**ask, "prompt": TEXT})
    assert g.status_code == 200, g.text
    assert g.json()["token_ids"] == want[0, enc["input_ids"].shape[1] :].tolist()
    short = (await c.post("/generate", json={**ask, "prompt": "hello"})).json()["token_ids"]
    batch = (await c.post("/generate/batch", json={**ask, "prompts": [TEXT, "hello"]})).json()["results"]
    assert [row["token_ids"] for row in batch] == [g.json()["token_ids"], short]


async def test_an_edit_at_berts_resid_post_is_an_edit_of_its_second_layernorms_input(built):
    """TransformerLens's BertBlock: hook_resid_post is ln2's input, and the block's output (index i + 1, the next
    block's resid_pre) is ln2's output; an edit there equals the same edit done by a pre-hook on the LayerNorm."""
    path = built("bert")
    net, tok = load(path, "bert")
    enc = tok(TEXT, return_tensors="pt")
    n = net.config.num_hidden_layers
    v = torch.randn(net.config.hidden_size, generator=torch.Generator().manual_seed(0))
    handle = net.encoder.layer[0].output.LayerNorm.register_forward_pre_hook(lambda m, a: (a[0] + 2.0 * v,))
    with torch.inference_mode():
        want = net(**enc, output_hidden_states=True).hidden_states
    handle.remove()
    edit = {"site": "blocks.0.hook_resid_post", "op": "add", "vector": v.tolist(), "scale": 2.0}
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "text": TEXT, "positions": "all", "interventions": [edit]}
        r = await c.post("/extract", json={**body, "hidden_state_layers": [1, n, "blocks.0.ln2.hook_normalized"]})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
    close(got["1"], want[1][0], "index 1")
    close(got["blocks.0.ln2.hook_normalized"], want[1][0], "ln2.hook_normalized")
    close(got[str(n)], want[n][0], f"index {n}")


async def test_berts_ln1_scale_is_read_after_an_edit_of_resid_mid_at_the_same_layernorm(built):
    """Post-LN (TransformerLens's BertBlock): ``hook_resid_mid`` and ``ln1.hook_scale`` are both the first LayerNorm's
    input, in that order, so the scale is that of the edited stream, and an edit of the scale rescales the norm's
    output: the same as a pre-hook adding to the LayerNorm's input and a hook dividing its output's (y - b) by 2."""
    path = built("bert")
    net, tok = load(path, "bert")
    enc = tok(TEXT, return_tensors="pt")
    n = net.config.num_hidden_layers
    norm = net.encoder.layer[0].attention.output.LayerNorm
    v = torch.randn(net.config.hidden_size, generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    def add(module: Any, args: tuple) -> tuple:
        x = args[0] + v
        seen["scale"] = 2 * ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        return (x,)

    handles = [
        norm.register_forward_pre_hook(add),
        norm.register_forward_hook(lambda m, a, y: (y - norm.bias) / 2 + norm.bias),
    ]
    with torch.inference_mode():
        want = net(**enc, output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    edits = [  # listed scale first: points apply in forward order, whatever the list's
        {"site": "blocks.0.ln1.hook_scale", "op": "scale", "scale": 2.0},
        {"site": "blocks.0.hook_resid_mid", "op": "add", "vector": v.tolist()},
    ]
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "text": TEXT, "positions": "all", "interventions": edits}
        r = await c.post("/extract", json={**body, "hidden_state_layers": [1, n, "blocks.0.ln1.hook_scale"]})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
    close(got["blocks.0.ln1.hook_scale"], seen["scale"][0], "ln1.hook_scale")
    close(got["1"], want[1][0], "index 1")
    close(got[str(n)], want[n][0], f"index {n}")


@pytest.mark.parametrize(("ln", "reader"), [("ln1", "attn"), ("ln2", "mlp")])
async def test_a_scale_edit_in_a_block_with_one_norm_for_both_sublayers_reaches_one_of_them(built, ln, reader):
    """GPT-J's ``ln_1`` feeds attention and MLP; TransformerLens's conversion gives it a copy as ``ln2``, so ``ln1``'s
    scale is attention's and ``ln2``'s the MLP's: an edit of one rescales that sublayer's input only, the same as a
    pre-hook on that sublayer alone mapping the norm's output y to (y - b) / 2 + b."""
    path = built("gptj")
    net, tok = load(path, "gptj")
    enc = tok(TEXT, return_tensors="pt")
    n = net.config.num_hidden_layers
    block = net.transformer.h[1]
    norm = block.ln_1

    def halve(module: Any, args: tuple, kwargs: dict) -> tuple:
        if args:
            return ((args[0] - norm.bias) / 2 + norm.bias, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": (kwargs["hidden_states"] - norm.bias) / 2 + norm.bias}

    handle = getattr(block, reader).register_forward_pre_hook(halve, with_kwargs=True)
    with torch.inference_mode():
        want = net(**enc, output_hidden_states=True).hidden_states
    handle.remove()
    edit = {"site": f"blocks.1.{ln}.hook_scale", "op": "scale", "scale": 2.0}
    names = ["blocks.1.ln1.hook_scale", "blocks.1.ln2.hook_scale"]
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "text": TEXT, "positions": "all", "hidden_state_layers": [2, n, *names]}
        plain = arrays((await c.post("/extract", json=body)).json(), "sequence_hidden_states")
        r = await c.post("/extract", json={**body, "interventions": [edit]})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
    close(plain["blocks.1.ln1.hook_scale"], plain["blocks.1.ln2.hook_scale"], "one norm, one scale")
    close(got[f"blocks.1.{ln}.hook_scale"], 2 * plain[f"blocks.1.{ln}.hook_scale"], "the edited scale")
    close(got["2"], want[2][0], "index 2")
    close(got[str(n)], want[n][0], f"index {n}")


async def test_opt_350ms_index_n_is_project_outs_output_of_the_embedding_width(built):
    """OPT-350m's stream is hidden_size wide and project_out maps it to the embedding width before the head: index N
    is that output, as output_hidden_states has it (checked in the survey), listed with its own width, and an edit
    there takes a vector of that width; no W_E or W_U maps it exactly, and W_pos starts at position 0."""
    from loom_client import decode

    path = built("opt_post_ln")
    net, tok = load(path, "opt_post_ln")
    n, d, width = net.config.num_hidden_layers, net.config.hidden_size, net.config.word_embed_proj_dim
    assert width != d
    enc = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        want = net(**enc, output_hidden_states=True).hidden_states[n][0]
    v = torch.randn(width, generator=torch.Generator().manual_seed(0))
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        listing = (await c.get(f"/models/{path}/sites")).json()
        assert listing["hidden_state_indices"] == {"from": 0, "to": n, "shape": [d], "last_shape": [width]}
        body = {"model": path, "text": TEXT, "positions": "all", "hidden_state_layers": [n]}
        edit = {"site": -1, "op": "add", "vector": v.tolist()}
        r = await c.post("/extract", json={**body, "interventions": [edit]})
        assert r.status_code == 200, r.text
        close(arrays(r.json(), "sequence_hidden_states")[str(n)], want + v, f"index {n} edited")
        r = await c.post("/extract", json={**body, "interventions": [{**edit, "vector": [0.0] * d}]})
        assert r.status_code == 422 and r.json()["field"] == "interventions[0].vector", r.text
        weights = (await c.get(f"/models/{path}/weights")).json()["weights"]
        assert "W_E" not in weights and "W_U" not in weights
        assert weights["W_pos"]["shape"] == [net.config.max_position_embeddings, d]
        r = await c.get(f"/models/{path}/weights", params={"names": "W_pos", "format": "list"})
        got = decode.arrays(r.json())["weights"]["W_pos"]
    np.testing.assert_array_equal(got, net.model.decoder.embed_positions.weight[2:].detach().numpy())


async def test_robertas_w_pos_row_t_is_what_its_position_embedding_gives_position_t(built):
    """RoBERTa counts positions from its padding index + 1: W_pos (TransformerLens's layout, position t in row t)
    leaves those rows out, so W_pos[t] is what the model's own position embedding gives its token t."""
    from loom_client import decode

    path = built("roberta")
    net, tok = load(path, "roberta")
    enc = tok(TEXT, return_tensors="pt")
    seen: list[torch.Tensor] = []
    handle = net.embeddings.position_embeddings.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.inference_mode():
        net(**enc)
    handle.remove()
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        r = await c.get(f"/models/{path}/weights", params={"names": "W_pos", "format": "list"})
        assert r.status_code == 200, r.text
        w_pos = decode.arrays(r.json())["weights"]["W_pos"]
    padding = net.config.pad_token_id
    assert w_pos.shape == (net.config.max_position_embeddings - padding - 1, net.config.hidden_size)
    np.testing.assert_array_equal(w_pos[: len(seen[0])], seen[0].numpy())


async def test_mpnets_pattern_edit_inside_its_own_attention_is_the_same_edit_in_process(built):
    """MPNet computes attention in its own code (a relative position bias on the scores): knocking out a head's
    pattern there is, in the model itself, zeroing that head's slice of its output projection's input."""
    path = built("mpnet")
    net, tok = load(path, "mpnet")
    enc = tok(TEXT, return_tensors="pt")
    d_head = net.config.hidden_size // net.config.num_attention_heads

    def zero_head_2(module: Any, args: Any) -> Any:
        z = args[0].clone()
        z[..., 2 * d_head : 3 * d_head] = 0
        return (z,)

    handle = net.encoder.layer[1].attention.attn.o.register_forward_pre_hook(zero_head_2)
    with torch.inference_mode():
        want = net(**enc).last_hidden_state[0]
    handle.remove()
    knock = {"site": "blocks.1.attn.hook_pattern", "op": "zero", "heads": [2]}
    body = {"model": path, "text": TEXT, "hidden_state_layers": [-1], "positions": "all"}
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={**body, "interventions": [knock]})
        assert r.status_code == 200, r.text
        plain = await c.post("/extract", json=body)
    close(arrays(r.json(), "sequence_hidden_states")["-1"], want, "knocked")
    assert not np.allclose(arrays(plain.json(), "sequence_hidden_states")["-1"], want.numpy(), atol=1e-3)


async def test_modernberts_embeddings_in_a_batch_are_each_texts_alone_through_either_loader(built, tmp_path):
    """ModernBERT's local blocks see a window of keys, which its model builds into the mask from the padding mask.
    /embed/batch through the transformers loader (mean pooling of index N, one right-padded pass) gives each text
    what transformers' own model gives it alone; through the sentence-transformers loader (a tiny pipeline on it,
    Transformer -> Pooling(mean), as nomic's modernbert-embed) what ``SentenceTransformer.encode`` gives: first a
    batch of texts shorter than the window, then one of texts longer. Packing texts into one row with a 4-D mask
    would replace the mask the model builds, window and all: the first batch would pass packing's check (packed
    and padded agree within the window) and the second be embedded as if it had none. The pipeline's hidden-state
    indices are the model's ``output_hidden_states``. Texts no longer than the window still pack."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer  # 5.x and 6.x alike

    path = built("modernbert")
    net, tok = load(path, "modernbert")
    window = net.config.sliding_window  # keys at most this far from the query, either side
    short = ["the fox", "the", "fox", "dog", "hello", "world", "lazy", "the"]
    long = [TEXT, "Hidden states are the activations a transformer computes at every layer.", "hello"]
    lengths = [len(ids) for ids in tok(short + long)["input_ids"]]
    assert max(lengths[: len(short)]) <= window + 1 < min(lengths[len(short) : -1]), lengths
    root = tmp_path / "modernbert-st"
    SentenceTransformer(modules=[Transformer(path), Pooling(64, pooling_mode="mean")], device="cpu").save(str(root))
    st = SentenceTransformer(str(root), device="cpu")

    def alone(text: str) -> np.ndarray:
        with torch.inference_mode():
            return net(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()

    app = app_with()
    async with concurrent_client(app) as c:
        body = {"model": path, "loader": "transformers", "texts": long}
        r = await c.post("/embed/batch", json=body)
        assert r.status_code == 200 and r.json()["pooling"] == "mean", r.text
        for text, got in zip(long, r.json()["embeddings"], strict=True):
            close(np.asarray(got, dtype=np.float32), alone(text), text)
        for texts in (short, long):
            r = await c.post("/embed/batch", json={"model": str(root), "texts": texts})
            assert r.status_code == 200 and r.json()["pooling"] == "model", r.text
            close(np.asarray(r.json()["embeddings"], dtype=np.float32), st.encode(texts), f"{texts[0]!r}...")
            # Texts within the window pack (packed and padded passes agreed); longer ones ran padded.
            assert app.state.manager.find(str(root)).loaded.extra["packing"] is True
        # The pipeline's hidden-state indices are the model's output_hidden_states too (N: its final norm's output).
        n = net.config.num_hidden_layers
        body = {"model": str(root), "text": TEXT, "positions": "all", "hidden_state_layers": list(range(n + 1))}
        r = await c.post("/extract", json=body)
        assert r.status_code == 200, r.text
    with torch.inference_mode():
        want = net(**tok(TEXT, return_tensors="pt"), output_hidden_states=True).hidden_states
    got = arrays(r.json(), "sequence_hidden_states")
    for i in range(n + 1):
        close(got[str(i)], want[i][0], f"index {i} through sentence-transformers")


async def test_blooms_weights_by_transformerlens_names_are_its_conversions(built):
    """TransformerLens's BLOOM conversion, written here: W_E before the embedding norm (``embed.ln``), q, k and v
    per head out of query_key_value as [d, heads, 3, d_head], W_O from dense."""
    from loom_client import decode

    path = built("bloom")
    net, _ = load(path, "bloom")
    d, h = net.config.hidden_size, net.config.n_head
    block, base = net.transformer.h[1], net.transformer
    w = block.self_attention.query_key_value.weight.detach().T.reshape(d, h, 3, d // h)
    b = block.self_attention.query_key_value.bias.detach().reshape(h, 3, d // h)
    want = {
        "W_E": base.word_embeddings.weight,
        "embed.ln.w": base.word_embeddings_layernorm.weight,
        "embed.ln.b": base.word_embeddings_layernorm.bias,
        "ln_final.w": base.ln_f.weight,
        "blocks.1.attn.W_Q": w[..., 0, :].permute(1, 0, 2),
        "blocks.1.attn.W_K": w[..., 1, :].permute(1, 0, 2),
        "blocks.1.attn.W_V": w[..., 2, :].permute(1, 0, 2),
        "blocks.1.attn.b_Q": b[:, 0],
        "blocks.1.attn.b_V": b[:, 2],
        "blocks.1.attn.W_O": block.self_attention.dense.weight.T.reshape(h, d // h, d),
        "blocks.1.mlp.W_in": block.mlp.dense_h_to_4h.weight.T,
    }
    async with concurrent_client(app_with()) as c:
        await c.post("/models/load", json={"model": path})
        r = await c.get(f"/models/{path}/weights", params={"names": ",".join(want), "format": "list"})
        assert r.status_code == 200, r.text
        got = decode.arrays(r.json())["weights"]
    for name, tensor in want.items():
        np.testing.assert_array_equal(got[name], tensor.detach().numpy(), err_msg=name)


async def test_grouped_falcons_weights_by_transformerlens_names_are_its_grouped_projection(built):
    """Falcon-40B's query_key_value as FalconAttention splits its output, [d, kv, heads per kv + 2, d_head]: W_Q each
    group's query heads in order, _W_K and _W_V each group's key and value, W_K and W_V them repeated for the group's
    query heads (TransformerLens's grouped-query convention); ln1 and ln2 its ln_attn and ln_mlp."""
    from loom_client import decode

    path = built("falcon_grouped")
    net, _ = load(path, "falcon_grouped")
    h, kv = net.config.num_attention_heads, net.config.num_kv_heads
    block = net.transformer.h[1]
    w = grouped(block.self_attention.query_key_value.weight.detach().T, kv, h)  # [d, kv, per + 2, d_head]
    want = {
        "blocks.1.attn.W_Q": w[..., :-2, :].flatten(1, 2).permute(1, 0, 2),
        "blocks.1.attn._W_K": w[..., -2, :].permute(1, 0, 2),
        "blocks.1.attn.W_K": w[..., -2, :].permute(1, 0, 2).repeat_interleave(h // kv, 0),
        "blocks.1.attn._W_V": w[..., -1, :].permute(1, 0, 2),
        "blocks.1.ln1.w": block.ln_attn.weight,
        "blocks.1.ln2.b": block.ln_mlp.bias,
    }
    async with concurrent_client(app_with()) as c:
        await c.post("/models/load", json={"model": path})
        r = await c.get(f"/models/{path}/weights", params={"names": ",".join(want), "format": "list"})
        assert r.status_code == 200, r.text
        got = decode.arrays(r.json())["weights"]
    for name, tensor in want.items():
        np.testing.assert_array_equal(got[name], tensor.detach().numpy(), err_msg=name)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
async def test_deepseeks_weights_by_transformerlens_names_are_those_that_read_the_stream(built, arch):
    """Latent attention: V2-Lite's q_proj reads the stream, so W_Q is it per head [heads, d, qk_nope + qk_rope];
    V3's q_b_proj reads a low-rank latent, not the stream, so no W_Q is offered (nor W_K / W_V: no weight maps the
    stream to a head's key or value); W_O is o_proj per head of v_head_dim."""
    from loom_client import decode

    path = built(arch)
    net, _ = load(path, arch)
    cfg = net.config
    h, qk, d = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.hidden_size
    attn = net.model.layers[1].self_attn
    want = {"blocks.1.attn.W_O": attn.o_proj.weight.T.reshape(h, cfg.v_head_dim, d)}
    if cfg.q_lora_rank is None:
        want["blocks.1.attn.W_Q"] = attn.q_proj.weight.T.reshape(d, h, qk).permute(1, 0, 2)
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        listed = (await c.get(f"/models/{path}/weights")).json()["weights"]
        r = await c.get(f"/models/{path}/weights", params={"names": ",".join(want), "format": "list"})
        assert r.status_code == 200, r.text
        got = decode.arrays(r.json())["weights"]
    assert ("blocks.1.attn.W_Q" in listed) == (cfg.q_lora_rank is None), sorted(listed)
    assert not {"blocks.1.attn.W_K", "blocks.1.attn.W_V", "blocks.1.attn._W_K"} & set(listed)
    for name, tensor in want.items():
        np.testing.assert_array_equal(got[name], tensor.detach().numpy(), err_msg=name)


async def test_mamba_is_served_with_its_residual_points_only(built):
    """Mamba's blocks are a norm and a state-space mixer: the residual stream, the mixer's input and the final norm
    are its points (checked above); attention and MLP points are refused saying why."""
    path = built("mamba")
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        listing = (await c.get(f"/models/{path}/sites")).json()
        assert {"hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_normalized", "ln_final.hook_scale"} <= set(
            listing["sites"]
        )
        for name in ("blocks.0.hook_attn_out", "blocks.1.attn.hook_z", "blocks.2.mlp.hook_post"):
            assert "state-space mixer" in listing["unavailable"][name]
        edit = {"site": "ln_final.hook_normalized", "op": "zero"}
        r = await c.post(
            "/extract", json={"model": path, "text": TEXT, "hidden_state_layers": [-1], "interventions": [edit]}
        )
        assert r.status_code == 200 and not arrays(r.json(), "hidden_states")["-1"].any()  # index N is after norm_f


async def test_a_model_whose_sites_do_not_add_up_is_refused_naming_the_site(built, monkeypatch):
    """The self-check at load: a table entry that takes OLMo 2's attention output before its post-norm (what a
    transformers release moving a norm would do to a right entry) is a 422 naming the site, not a served model."""
    import attrs
    from loom_transformers import architectures

    path = built("olmo2")
    wrong = attrs.evolve(architectures.ARCHITECTURES["olmo2"], post_attn_norm=None)
    monkeypatch.setitem(architectures.ARCHITECTURES, "olmo2", wrong)
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={"model": path, "text": TEXT})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["field"] == "model" and body["site"] == "blocks.0.hook_attn_out", body
        assert "self-check" in body["detail"] and "the stream the MLP's side reads" in body["detail"]


async def test_a_model_whose_attention_the_loom_computes_otherwise_is_refused_at_load(built, monkeypatch):
    """The self-check at load compares The Loom's eager attention, which every pass reading a point inside attention
    runs under, with the model's own: an attention function that drops GPT-OSS's sinks (what a model passing its
    attention something new would meet) is a 422 naming the attention, not a served model."""
    from loom_transformers.attention import LOOM, loom_attention, register
    from transformers import AttentionInterface

    def without_sinks(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("s_aux", None)
        return loom_attention(*args, **kwargs)

    register()
    monkeypatch.setitem(AttentionInterface._global_mapping, LOOM, without_sinks)
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={"model": built("gpt_oss"), "text": TEXT})
        assert r.status_code == 422, r.text
        assert r.json()["site"] == "attention" and "the model's own attention" in r.json()["detail"], r.json()


def save_config(root: Path, name: str, config: dict[str, Any]) -> str:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


async def test_an_architecture_outside_the_table_serves_its_indices_and_refuses_hook_points(tmp_path):
    """CodeGen is a transformers model the table does not describe: its hidden-state indices (checked against
    output_hidden_states at load) and generation are served, its hook points refused naming its model_type."""
    import transformers
    from loom_transformers.architectures import ARCHITECTURES
    from loom_transformers.testing import train_tokenizer

    assert "codegen" not in ARCHITECTURES
    path = tmp_path / "codegen"
    tok = train_tokenizer("gpt2")
    cfg = transformers.CodeGenConfig(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
    torch.manual_seed(0)
    net = transformers.CodeGenForCausalLM(cfg).eval()
    net.save_pretrained(path)
    tok.save_pretrained(path)
    enc = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        want = net(**enc, output_hidden_states=True).hidden_states
    async with concurrent_client(app_with()) as c:
        body = {"model": str(path), "text": TEXT, "positions": "all"}
        r = await c.post("/extract", json={**body, "hidden_state_layers": [0, 1, 2]})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
        for i in range(3):
            close(got[str(i)], want[i][0], f"index {i}")
        r = await c.post("/extract", json={**body, "hidden_state_layers": ["blocks.0.hook_attn_out"]})
        assert r.status_code == 422 and "no layout for model_type 'codegen'" in r.json()["detail"], r.text
        r = await c.post("/extract", json={**body, "logit_lens": {"layers": [1]}})
        assert r.status_code == 422 and r.json()["field"] == "logit_lens", r.text
        g = await c.post("/generate", json={"model": str(path), "prompt": TEXT, "max_tokens": 4, "temperature": 0})
        with torch.inference_mode():
            ref = net.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert g.json()["token_ids"] == ref[0, enc["input_ids"].shape[1] :].tolist()


async def assert_served_outside_the_table(path: str, arch: str, refused: list[str], why: str) -> None:
    """A model served by its indices alone: each index is ``output_hidden_states``', each of ``refused`` a 422 whose
    detail says ``why``, and its greedy tokens ``generate``'s, alone and in a left-padded batch."""
    net, tok = load(path, arch)
    n = net.config.num_hidden_layers
    enc = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        want = net(**enc, output_hidden_states=True).hidden_states
    async with concurrent_client(app_with()) as c:
        body = {"model": path, "text": TEXT, "positions": "all"}
        r = await c.post("/extract", json={**body, "hidden_state_layers": list(range(n + 1))})
        assert r.status_code == 200, r.text
        got = arrays(r.json(), "sequence_hidden_states")
        for i in range(n + 1):
            close(got[str(i)], want[i][0], f"index {i}")
        for name in refused:
            r = await c.post("/extract", json={**body, "hidden_state_layers": [name]})
            assert r.status_code == 422 and why in r.json()["detail"], r.text
        await assert_greedy(c, path, net, tok, enc)


async def test_a_model_whose_blocks_sit_below_its_base_model_is_served_outside_the_table(built, monkeypatch):
    """Outside the table (OPT with its entry taken out), a head model that calls the module holding the blocks
    directly (OPT's calls ``model.decoder``, not the base model) has index N read on that module: the model loads,
    its indices are ``output_hidden_states`` and its greedy tokens ``model.generate``'s, alone and in a batch of rows
    of different lengths."""
    from loom_transformers import architectures

    monkeypatch.delitem(architectures.ARCHITECTURES, "opt")
    await assert_served_outside_the_table(
        built("opt"), "opt", ["blocks.0.hook_attn_out"], "no layout for model_type 'opt'"
    )


async def test_a_bloom_adding_the_residual_after_its_norms_is_served_outside_the_table(tiny_root):
    """BLOOM's apply_residual_connection_post_layernorm (false in its checkpoints) makes the stream a norm's output,
    which TransformerLens's points do not describe: such a model serves its indices (the self-check at load holds
    them to output_hidden_states), and each hook point is refused saying why."""
    from loom_transformers.testing import build_tiny_model

    flag = "apply_residual_connection_post_layernorm"
    path = str(build_tiny_model("bloom", tiny_root, name="bloom-post-ln-residual", **{flag: True}))
    await assert_served_outside_the_table(
        path, "bloom", ["hook_embed", "blocks.1.hook_resid_mid", "blocks.0.attn.hook_pattern"], flag
    )


async def test_a_granite_with_its_multipliers_is_served_outside_the_table(built):
    """Granite 3 multiplies its embeddings before block 0, each sublayer's output before its add and divides its
    logits, none of it a module's output: hook_embed, hook_attn_out, hook_mlp_out and the lens would not be what
    TransformerLens's names say, so such a model serves its indices (held to output_hidden_states) and generation,
    and each hook point is refused naming the multipliers."""
    path = built("granite")
    net, _ = load(path, "granite")
    assert net.config.residual_multiplier != 1 and net.config.embedding_multiplier != 1
    refused = ["hook_embed", "blocks.0.hook_attn_out", "blocks.1.mlp.hook_post"]
    await assert_served_outside_the_table(path, "granite", refused, "residual_multiplier")


async def test_qwen3_next_is_served_outside_the_table_saying_why(tiny_root):
    """Qwen3-Next's blocks alternate gated DeltaNet linear attention (a recurrent state: no pattern, queries or keys
    as TransformerLens means them) and gated full attention (q_proj holds each head's query and an output gate on its
    z): its indices are output_hidden_states, its greedy tokens ``generate``'s alone and in a left-padded batch, and
    every hook point and the lens are refused naming the linear attention."""
    from loom_transformers.testing import build_tiny_model

    extra = {
        "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"],
        "head_dim": 16,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    }
    path = str(build_tiny_model("qwen3_next", tiny_root, name="qwen3-next", **extra))
    net, _ = load(path, "qwen3_next")
    assert [type(layer).__name__ for layer in net.model.layers] == ["Qwen3NextDecoderLayer"] * 2
    assert hasattr(net.model.layers[0], "linear_attn") and hasattr(net.model.layers[1], "self_attn")
    refused = ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_q", "blocks.1.hook_resid_mid"]
    await assert_served_outside_the_table(path, "qwen3_next", refused, "linear attention")
    async with concurrent_client(app_with()) as c:
        r = await c.post("/extract", json={"model": path, "text": TEXT, "logit_lens": {"layers": [1]}})
        assert r.status_code == 422 and r.json()["field"] == "logit_lens", r.text


async def test_models_outside_the_table_are_refused_by_name(built, tmp_path):
    import transformers
    from loom_transformers.testing import train_tokenizer

    t5 = tmp_path / "t5"
    cfg = transformers.T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(t5)
    train_tokenizer("gpt2").save_pretrained(t5)
    vit = tmp_path / "vit"
    transformers.ViTModel(
        transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(vit)
    unknown = save_config(tmp_path, "unknown", {"model_type": "loom-never", "architectures": ["NeverForCausalLM"]})
    async with concurrent_client(app_with()) as c:
        for path, words in ((t5, "encoder-decoder"), (vit, "not a text model"), (unknown, "loom-never")):
            r = await c.post("/extract", json={"model": str(path), "text": TEXT})
            assert r.status_code == 422, (path, r.text)
            assert r.json()["field"] == "model" and words in r.json()["detail"], r.json()
        assert (await c.get("/health")).status_code == 200
