"""The one place that knows each supported architecture's block: where its blocks, embeddings, attention (and how
its query, key and value come out of its projections), output projection, MLP, norms and head are; whether its
sublayers run one after the other, side by side, or with the norm after the add (BERT); and what its norms compute.

Every hook point (``sites.py``) is derived from an ``Arch``; a model whose ``model_type`` is not in ``ARCHITECTURES``
gets no hook points (a 422 naming its type) instead of points guessed from module names, and a model the table
describes is checked against it at load (``selfcheck.py``), so a transformers release that changes a block is
refused by name, never served wrong.

Paths are attribute paths: from the base model (``net.base_model``) for ``blocks``, ``embed``, ``embed_norm``,
``project_in``, ``project_out``, ``pos_embed`` and ``final_norm``; from a block for ``attn``, ``mlp`` and the norms;
from the attention module for the projections; from the MLP for its linears (from the block where there is no MLP
module: BERT, OPT).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any, Literal

import attrs

Residual = Literal["sequential", "parallel", "post_ln", "mixer"]
Norm = Literal["layer", "rms", "rms1p"]  # (x - mean) / s * w + b; x / s * w; x / s * (1 + w) (Gemma)
Fused = Literal["gpt2", "neox", "falcon", "phi3", "bigcode"]


@attrs.define(frozen=True)
class Arch:
    name: str
    blocks: str = "layers"
    embed: str = "embed_tokens"
    # A norm of the token embeddings (BLOOM's word_embeddings_layernorm): hook_embed is its output, as
    # TransformerLens's Embed has it with post_embedding_ln.
    embed_norm: str | None = None
    # Linears between the embedding width and the stream's (OPT where word_embed_proj_dim != hidden_size; the model
    # has them as None otherwise): hook_embed is project_in's output, and project_out's output is index N, which the
    # head reads.
    project_in: str | None = None
    project_out: str | None = None
    pos_embed: str | None = None  # a learned position embedding module, added to the token embeddings
    pos_offset: int = 0  # rows of the position embedding before position 0 (OPT's 2), which W_pos leaves out
    final_norm: str | None = "norm"
    norm: Norm = "rms"
    residual: Residual = "sequential"
    # A config flag that, false, makes the block post-LN (OPT's do_layer_norm_before, false in OPT-350m), or "".
    pre_norm_flag: str = ""
    # The attention and MLP modules add the residual themselves (BLOOM): hook_attn_out and hook_mlp_out are their
    # output projections' outputs, and the attention module's output is the stream between them.
    sublayers_add: bool = False
    # A config flag that makes the block parallel (attention and MLP both read the block's input), or "" for none.
    parallel_flag: str = ""
    ln1: str | None = "input_layernorm"  # the norm before attention (None: the block has none)
    ln2: str | None = "post_attention_layernorm"  # the norm before the MLP (None: none, or ln1's output is shared)
    attn: str | None = "self_attn"
    qkv: tuple[str, str, str] | None = ("q_proj", "k_proj", "v_proj")  # separate projections in ``attn``
    fused_qkv: str | None = None  # one projection holding q, k and v, split as ``fused``
    fused: Fused | None = None
    core: str = ""  # the module in ``attn`` that calls transformers' attention function ("": ``attn`` itself)
    o: str = "o_proj"  # the output projection, in ``attn``
    rotary: bool = True  # rotary position embeddings: q and k have a before (hook_q) and an after (hook_rot_q)
    # Whether block i rotates its queries and keys, where some blocks do not (NoPE: SmolLM3's no_rope_layers, EXAONE
    # 4's global layers): such a block offers no hook_rot_q / hook_rot_k. None: every block does.
    rope_in: Callable[[Any, int], bool] | None = None
    # A config attribute that, set, clamps q, k and v in place after their projections (OLMo's clip_qkv): the
    # projections' outputs, which hook_q / hook_k / hook_v would read, are then not what attention reads.
    clip_qkv: str = ""
    # DeepSeek's multi-head latent attention: q from ``q_b_proj`` (through a low-rank q_a_proj and norm) or ``q_proj``,
    # [heads, qk_nope_head_dim + qk_rope_head_dim]; k and v expanded per head by kv_b_proj from a compressed latent
    # that the cache holds, so no module outputs hook_k or hook_v per token, and the keys attention reads are rebuilt
    # from the cache at every step (an edit of hook_rot_k would not reach a later step); z [heads, v_head_dim].
    latent: bool = False
    # "" where attention runs through transformers' attention functions, where the points inside it are read; else
    # the model's own attention code, which ``attention.own_attention`` wraps to read its scores and pattern there:
    # "gpt_neo" (its module's ``_attn``), "bloom" (its module's ``forward``, ALiBi and all), "mpnet" (its
    # self-attention's ``forward``, with its relative position bias).
    own_attention: str = ""
    mlp: str | None = "mlp"
    gate: str | None = "gate_proj"  # a gated MLP's gate (hook_pre); None: not gated
    up: str | None = "up_proj"  # the linear whose output is hook_pre_linear (gated) or hook_pre (not gated)
    fused_gate_up: str | None = None  # one linear holding [gate | up]
    down: str = "down_proj"  # the MLP's output linear: its input is hook_post
    mixer: str | None = None  # a block's state-space mixer (Mamba), in place of attention and MLP
    post_attn_norm: str | None = None  # a norm on the attention's output before the add (sandwich or post-norm)
    post_mlp_norm: str | None = None
    logit_scale: str | None = None  # an attribute of the causal LM multiplying the logits (Cohere)
    # transformers' output_hidden_states for this model leaves out the embedding output (Mamba's tuple is the block
    # outputs, then the final norm's): index i < N is its entry i - 1, index 0 the embedding output.
    states_skip_embedding: bool = False
    # Why a config of this type has blocks the entry does not describe (None: it describes them): such a model is
    # served as one outside the table, its hidden-state indices only.
    refuse: Callable[[Any], str | None] | None = None
    # The entry as it describes a config's blocks where a config flag changes their modules (Falcon's
    # new_decoder_architecture: a norm of its own for each sublayer), or None.
    form: Callable[[Arch, Any], Arch] | None = None

    def parallel(self, config: Any) -> bool:
        if self.residual == "parallel":
            return True
        return bool(self.parallel_flag and getattr(config, self.parallel_flag, False))

    def norm_placement(self) -> str:
        if self.residual == "post_ln":
            return "post-LN (after each add)"
        if self.post_attn_norm and self.ln1:
            return "sandwich (before each sublayer and on its output)"
        if self.post_attn_norm:
            return "post-norm (on each sublayer's output, before the add)"
        return "pre-norm"


LLAMA = Arch("Llama")
GEMMA = attrs.evolve(
    LLAMA,
    name="Gemma 2",
    norm="rms1p",
    ln2="pre_feedforward_layernorm",
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
MOE = attrs.evolve(LLAMA, name="Mixtral", gate=None, up=None, down="")
COHERE = attrs.evolve(LLAMA, name="Cohere", norm="layer", residual="parallel", ln2=None, logit_scale="logit_scale")
OLMO2 = attrs.evolve(
    LLAMA,
    name="OLMo 2",
    ln1=None,
    ln2=None,
    post_attn_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)


def _smollm3_rope(config: Any, i: int) -> bool:
    return bool(config.no_rope_layers[i])  # 1: the block rotates q and k; 0: NoPE


def _exaone4_rope(config: Any, i: int) -> bool:
    # Exaone4Attention rotates unless the model has sliding layers and this block is a global one.
    return config.sliding_window is None or config.layer_types[i] == "sliding_attention"


def _cohere2_rope(config: Any, i: int) -> bool:
    # Cohere2Attention rotates only where it has a window: its sliding blocks; its global blocks are NoPE.
    return config.sliding_window is not None and config.layer_types[i] == "sliding_attention"


def _llama4_rope(config: Any, i: int) -> bool:
    return bool(config.no_rope_layers[i])  # 1: the block rotates q and k; 0: NoPE (with attention temperature)


def _granite(config: Any) -> str | None:
    scaled = [
        f"{name} {getattr(config, name)}"
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
        if float(getattr(config, name, 1.0)) != 1.0
    ]
    if scaled:
        return (
            f"it scales what no module outputs ({', '.join(scaled)}): the embeddings entering block 0, each "
            "sublayer's output before its add and the logits, so hook_embed, hook_attn_out, hook_mlp_out and the "
            "lens would not keep TransformerLens's meaning"
        )
    return None


def _bloom(config: Any) -> str | None:
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        return (
            "its blocks add the residual after their norms (apply_residual_connection_post_layernorm), a stream "
            "TransformerLens's points do not describe"
        )
    if getattr(config, "slow_but_exact", False) and int(getattr(config, "pretraining_tp", 1) or 1) > 1:
        return (
            "its output projections run as pretraining_tp slices (slow_but_exact), so the modules hook_z, "
            "hook_attn_out and hook_mlp_out are read at never run"
        )
    return None


def _qwen3_next(config: Any) -> str:
    return (
        "its blocks are of two kinds (layer_types): gated DeltaNet linear attention, a recurrent state with no "
        "attention pattern, queries or keys in TransformerLens's sense, and gated full attention, whose q_proj "
        "holds each head's query beside an output gate that multiplies its z (the attention points would need a "
        "layout of their own per block); its norms are (1 + w)"
    )


def _falcon(arch: Arch, config: Any) -> Arch:
    # new_decoder_architecture (Falcon-40B, 180B) makes the block parallel whatever parallel_attn says, and, where
    # num_ln_in_parallel_attn is 2 (unset means 2: FalconDecoderLayer sets it so), gives each sublayer a LayerNorm
    # of its own, ln_attn and ln_mlp, in place of input_layernorm (Falcon2-11B sets 1: one norm for both).
    if not getattr(config, "new_decoder_architecture", False):
        return arch
    own = getattr(config, "num_ln_in_parallel_attn", None) in (None, 2)
    return attrs.evolve(arch, residual="parallel", **({"ln1": "ln_attn", "ln2": "ln_mlp"} if own else {}))


GPT2 = Arch(
    "GPT-2",
    blocks="h",
    embed="wte",
    pos_embed="wpe",
    final_norm="ln_f",
    norm="layer",
    ln1="ln_1",
    ln2="ln_2",
    attn="attn",
    qkv=None,
    fused_qkv="c_attn",
    fused="gpt2",
    o="c_proj",
    rotary=False,
    gate=None,
    up="c_fc",
    down="c_proj",
)

BERT = Arch(
    "BERT",
    blocks="encoder.layer",
    embed="embeddings.word_embeddings",
    pos_embed="embeddings.position_embeddings",
    final_norm=None,
    norm="layer",
    residual="post_ln",
    ln1="attention.output.LayerNorm",
    ln2="output.LayerNorm",
    attn="attention",
    qkv=("self.query", "self.key", "self.value"),
    core="self",
    o="output.dense",
    rotary=False,
    mlp=None,
    gate=None,
    up="intermediate.dense",
    down="output.dense",
)


ARCHITECTURES: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": attrs.evolve(LLAMA, name="Mistral"),
    "qwen2": attrs.evolve(LLAMA, name="Qwen2"),
    "qwen3": attrs.evolve(LLAMA, name="Qwen3"),
    "qwen3_moe": attrs.evolve(MOE, name="Qwen3-MoE"),  # blocks listed in mlp_only_layers have a gated MLP
    "mixtral": MOE,
    "phi3": attrs.evolve(
        LLAMA,
        name="Phi-3",
        qkv=None,
        fused_qkv="qkv_proj",
        fused="phi3",
        gate=None,
        up=None,
        fused_gate_up="gate_up_proj",
    ),
    "phi": attrs.evolve(  # Phi-1, 1.5 and 2: one LayerNorm for both sublayers, partial rotary, an MLP not gated
        LLAMA,
        name="Phi",
        norm="layer",
        residual="parallel",
        final_norm="final_layernorm",
        ln2=None,
        o="dense",
        gate=None,
        up="fc1",
        down="fc2",
    ),
    "stablelm": attrs.evolve(
        LLAMA, name="StableLM", norm="layer", parallel_flag="use_parallel_residual"
    ),  # its parallel form shares input_layernorm's output
    "starcoder2": attrs.evolve(LLAMA, name="Starcoder2", norm="layer", gate=None, up="c_fc", down="c_proj"),
    "olmo2": OLMO2,
    "olmo3": attrs.evolve(OLMO2, name="OLMo 3"),  # OLMo 2's block; sliding-window layers are masks only
    # LayerNorm without weight or bias; clip_qkv clamps q, k and v after their projections.
    "olmo": attrs.evolve(LLAMA, name="OLMo", norm="layer", clip_qkv="clip_qkv"),
    "olmoe": attrs.evolve(MOE, name="OLMoE", clip_qkv="clip_qkv"),
    # Experts plus a shared expert behind a sigmoid gate; blocks listed in mlp_only_layers have a gated MLP.
    "qwen2_moe": attrs.evolve(MOE, name="Qwen2-MoE"),
    # Llama's block with multipliers; served only where they are 1 (attention_multiplier is the scores' scaling).
    "granite": attrs.evolve(LLAMA, name="Granite", refuse=_granite),
    "smollm3": attrs.evolve(LLAMA, name="SmolLM3", rope_in=_smollm3_rope),
    "exaone4": attrs.evolve(OLMO2, name="EXAONE 4", rope_in=_exaone4_rope),
    "ministral": attrs.evolve(LLAMA, name="Ministral"),
    # Experts as Mixtral's; a sink logit per head in each softmax (the pattern's rows sum to less than 1); sliding
    # windows.
    "gpt_oss": attrs.evolve(MOE, name="GPT-OSS"),
    "seed_oss": attrs.evolve(LLAMA, name="Seed-OSS"),
    "arcee": attrs.evolve(LLAMA, name="Arcee", gate=None),  # an MLP not gated (ReLU squared)
    "glm4": attrs.evolve(  # sandwich norms, [gate | up] fused
        LLAMA,
        name="GLM-4",
        post_attn_norm="post_self_attn_layernorm",
        post_mlp_norm="post_mlp_layernorm",
        gate=None,
        up=None,
        fused_gate_up="gate_up_proj",
    ),
    # DeepSeek-V2 / V3 / R1: Llama's block with multi-head latent attention (``latent``), experts plus shared experts
    # after the first first_k_dense_replace blocks, which have a gated MLP.
    "deepseek_v2": attrs.evolve(MOE, name="DeepSeek-V2", qkv=None, latent=True),
    "deepseek_v3": attrs.evolve(MOE, name="DeepSeek-V3", qkv=None, latent=True),
    # Qwen3-Next: refused (``_qwen3_next``), so served outside the table: its indices and generation only.
    "qwen3_next": attrs.evolve(MOE, name="Qwen3-Next", refuse=_qwen3_next),
    # ERNIE 4.5: Llama's block (its rotary interleaved: pairs of adjacent dims, as GPT-J's). Its MoE: experts plus
    # shared experts from moe_layer_start_index, every moe_layer_interval blocks; the others a gated MLP.
    "ernie4_5": attrs.evolve(LLAMA, name="ERNIE 4.5"),
    "ernie4_5_moe": attrs.evolve(MOE, name="ERNIE 4.5 MoE"),
    # Hunyuan (dense): Llama's block, q and k RMS-normed per head after the rotation (query_layernorm,
    # key_layernorm), so hook_rot_q / hook_rot_k are the normed q and k attention reads, as Llama 4's.
    "hunyuan_v1_dense": attrs.evolve(LLAMA, name="Hunyuan (dense)"),
    "cohere": COHERE,
    # Command R7B and Command A: Cohere's parallel block; sliding-window blocks rotate q and k, global ones are NoPE.
    "cohere2": attrs.evolve(COHERE, name="Cohere 2", rope_in=_cohere2_rope),
    # GLM-4.5: Llama's block, experts plus shared experts behind a sigmoid router, the first first_k_dense_replace
    # blocks dense; q_norm / k_norm (use_qk_norm) before partial rotary, as Qwen3's.
    "glm4_moe": attrs.evolve(MOE, name="GLM-4.5 (GLM-4-MoE)"),
    # Llama 4's language model: its MLP module is feed_forward, experts (routing weights applied to each expert's
    # input) plus a shared expert in moe_layers, a gated MLP elsewhere; NoPE blocks (no_rope_layers 0) scale their
    # queries by a per-position temperature after q_proj; chunked-attention blocks are masks only. Where use_qk_norm,
    # a rotating block's q and k are L2-normed after rotary, so hook_rot_q / hook_rot_k are the normed q and k
    # attention reads. Llama4ForCausalLM's base_model_prefix is "language_model" (its multimodal wrapper's attribute,
    # not its own), so its base_model is the causal LM itself: the paths go through its model.
    "llama4_text": attrs.evolve(
        MOE,
        name="Llama 4",
        blocks="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        mlp="feed_forward",
        rope_in=_llama4_rope,
    ),
    "gemma": attrs.evolve(LLAMA, name="Gemma", norm="rms1p"),  # pre-norm (1 + w), embeddings scaled by sqrt(d)
    "gemma2": GEMMA,
    "gemma3_text": attrs.evolve(GEMMA, name="Gemma 3"),
    "gpt2": GPT2,
    "gpt_bigcode": attrs.evolve(GPT2, name="GPT-BigCode", fused="bigcode"),  # SantaCoder, StarCoder 1
    "gpt_neo": attrs.evolve(  # TinyStories' models too; local layers see a window of keys
        GPT2,
        name="GPT-Neo",
        attn="attn.attention",
        qkv=("q_proj", "k_proj", "v_proj"),
        fused_qkv=None,
        fused=None,
        o="out_proj",
        own_attention="gpt_neo",
    ),
    "bloom": attrs.evolve(  # ALiBi, computed in its attention module's own forward; embeddings normed
        GPT2,
        name="BLOOM",
        embed="word_embeddings",
        embed_norm="word_embeddings_layernorm",
        pos_embed=None,
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        attn="self_attention",
        fused_qkv="query_key_value",
        fused="neox",  # [heads, 3, d_head], as BloomAttention._reshape splits it
        o="dense",
        up="dense_h_to_4h",
        down="dense_4h_to_h",
        sublayers_add=True,
        own_attention="bloom",
        refuse=_bloom,
    ),
    "opt": attrs.evolve(  # pre-LN, but OPT-350m is post-LN with project_in / project_out
        GPT2,
        name="OPT",
        blocks="decoder.layers",
        embed="decoder.embed_tokens",
        project_in="decoder.project_in",
        project_out="decoder.project_out",
        pos_embed="decoder.embed_positions",
        pos_offset=2,
        final_norm="decoder.final_layer_norm",  # None in the post-LN form
        pre_norm_flag="do_layer_norm_before",
        ln1="self_attn_layer_norm",
        ln2="final_layer_norm",
        attn="self_attn",
        qkv=("q_proj", "k_proj", "v_proj"),
        fused_qkv=None,
        fused=None,
        o="out_proj",
        mlp=None,  # fc1 and fc2 are the block's, which runs them on the batch flattened to [B * T, d]
        up="fc1",
        down="fc2",
    ),
    "gpt_neox": attrs.evolve(
        GPT2,
        name="GPT-NeoX",
        blocks="layers",
        embed="embed_in",
        pos_embed=None,
        final_norm="final_layer_norm",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        attn="attention",
        fused_qkv="query_key_value",
        fused="neox",
        o="dense",
        rotary=True,
        up="dense_h_to_4h",
        down="dense_4h_to_h",
        parallel_flag="use_parallel_residual",
    ),
    "gptj": attrs.evolve(
        GPT2,
        name="GPT-J",
        pos_embed=None,
        residual="parallel",
        ln2=None,
        qkv=("q_proj", "k_proj", "v_proj"),
        fused_qkv=None,
        fused=None,
        o="out_proj",
        rotary=True,
        up="fc_in",
        down="fc_out",
    ),
    "falcon": attrs.evolve(
        GPT2,
        name="Falcon",
        embed="word_embeddings",
        pos_embed=None,
        ln1="input_layernorm",
        ln2="post_attention_layernorm",  # only in its sequential form; the parallel forms share ln1 or have ln_mlp
        attn="self_attention",
        fused_qkv="query_key_value",
        fused="falcon",
        o="dense",
        rotary=True,
        up="dense_h_to_4h",
        down="dense_4h_to_h",
        parallel_flag="parallel_attn",
        form=_falcon,
    ),
    "bert": BERT,
    # RoBERTa's blocks are BERT's; its positions count from the padding index + 1 (W_pos leaves those rows out).
    "roberta": attrs.evolve(BERT, name="RoBERTa"),
    "xlm-roberta": attrs.evolve(BERT, name="XLM-RoBERTa"),
    # BERT's block with a relative position bias on the scores, which its own attention code adds (all-mpnet-base-v2).
    "mpnet": attrs.evolve(
        BERT,
        name="MPNet",
        ln1="attention.LayerNorm",
        qkv=("attn.q", "attn.k", "attn.v"),
        core="attn",
        o="attn.o",
        own_attention="mpnet",
    ),
    # BERT's block under other names, its MLP a module of its own (and no token types).
    "distilbert": attrs.evolve(
        BERT,
        name="DistilBERT",
        blocks="transformer.layer",
        ln1="sa_layer_norm",
        ln2="output_layer_norm",
        qkv=("q_lin", "k_lin", "v_lin"),
        core="",
        o="out_lin",
        mlp="ffn",
        up="lin1",
        down="lin2",
    ),
    # ModernBERT (and the embedding models built on it: gte-modernbert, nomic's modernbert-embed): an encoder, but
    # pre-norm (LayerNorm, no biases by default) with rotary embeddings, as Llama's block; Wqkv fused as
    # [q | k | v] (each [heads, d_head], as ModernBertAttention views it), Wi fused as [input | gate] with
    # act(input) * gate (hook_pre the activated half, as [gate | up] elsewhere); its embeddings normed (hook_embed is
    # that norm's output), block 0's attn_norm an Identity (no ln1 there: ``sites.norm_module``), a final norm.
    # Sliding-window (local) blocks are masks only, their rotary base another (local_rope_theta).
    "modernbert": Arch(
        "ModernBERT",
        embed="embeddings.tok_embeddings",
        embed_norm="embeddings.norm",
        final_norm="final_norm",
        norm="layer",
        ln1="attn_norm",
        ln2="mlp_norm",
        attn="attn",
        qkv=None,
        fused_qkv="Wqkv",
        fused="gpt2",
        o="Wo",
        gate=None,
        up=None,
        fused_gate_up="Wi",
        down="Wo",
    ),
    "mamba": Arch(
        "Mamba",
        embed="embeddings",
        final_norm="norm_f",
        residual="mixer",
        ln1="norm",
        ln2=None,
        attn=None,
        qkv=None,
        rotary=False,
        mlp=None,
        gate=None,
        up=None,
        down="",
        mixer="mixer",
        states_skip_embedding=True,
    ),
}

# What each kind of model that is not served says (a 422 at load, naming the model_type).
NOT_SERVED = {
    "encoder-decoder": "is an encoder-decoder model; The Loom serves decoder-only (causal) and encoder-only models",
    "no-text": "is not a text model (no tokenizer and no token embeddings); The Loom serves text models",
    # A text_config beside other towers, of a model_type not in WRAPPERS (which follows the sentence).
    "multimodal": "is a multimodal model; The Loom serves text models, and the language model alone of model_types",
}


@attrs.define(frozen=True)
class Wrapper:
    """A multimodal model_type whose checkpoints hold a vision tower beside a language model (Gemma 3 4B and up,
    Mistral Small 3.1, LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Llama 4). The Loom loads the language
    model alone, as the causal LM its ``text_config`` names (or ``family``), which the table's entry for that
    model_type describes: images are not part of its API, so the vision tower's weights are never read
    (docs/decisions.md).

    ``text`` is where the language model sits in the checkpoint: its base model at ``{text}.model.`` and head at
    ``{text}.lm_head.`` (the hub's checkpoints, and transformers' own ``save_pretrained``), or its base model at
    ``model.{text}.`` and head at ``lm_head.`` (transformers' module tree, as some tools save it)."""

    name: str
    text: str = "language_model"
    # Attributes of the text config that the wrapper's own forward does not apply, unset so that the language model
    # computes what the wrapper computes (Gemma3ForConditionalGeneration applies no final logit soft-capping, which
    # Gemma3ForCausalLM would).
    unused: tuple[str, ...] = ()
    # The model_type the language model loads as where its text_config's own type has no causal LM in transformers
    # ("": its own). Qwen2-VL's and Qwen2.5-VL's text model is Qwen2's block under multimodal rotary embeddings
    # (mrope): three position sections, each rotating its share of the frequencies; on text all three positions are
    # the token's, and the rotation is Qwen2's ordinary one, bit for bit (tests/test_multimodal.py).
    family: str = ""
    # Config attributes the language model is given where the wrapper's code fixes what the family's reads from its
    # config: Qwen3-VL-MoE's router always renormalises its top-k weights, which Qwen3-MoE's does only under
    # norm_topk_prob (false by default, and whatever a Qwen3-VL-MoE config.json says, its wrapper ignores it).
    sets: tuple[tuple[str, Any], ...] = ()
    # The checkpoint may hold each block's fused experts transposed from the family's modules: Qwen3-VL-MoE's hub
    # checkpoints (saved by transformers 4.57) store experts.gate_up_proj [experts, d_model, 2 * d_expert] and
    # experts.down_proj [experts, d_expert, d_model], which transformers' own conversion for the wrapper transposes
    # where the shapes say so (its 5.x save_pretrained writes them untransposed); the loader does the same for the
    # family's causal LM, and refuses sizes whose shapes cannot tell the two layouts apart (``ambiguous_experts``).
    experts_transposed: bool = False

    def key_mapping(self) -> dict[str, str]:
        """transformers' ``key_mapping``: the checkpoint's names of the language model's weights to the causal LM's
        (the vision tower's match none, and are left unread)."""
        at = re.escape(self.text)
        return {rf"^{at}\.model\.": "model.", rf"^model\.{at}\.": "model.", rf"^{at}\.lm_head\.": "lm_head."}


WRAPPERS: dict[str, Wrapper] = {
    "gemma3": Wrapper("Gemma 3 (Gemma3ForConditionalGeneration)", unused=("final_logit_softcapping",)),
    "mistral3": Wrapper("Mistral 3 (Mistral3ForConditionalGeneration)"),
    "llava": Wrapper("LLaVA (LlavaForConditionalGeneration)"),
    # The hub's checkpoints name the language model's weights model.* and lm_head.* already (a causal LM's names);
    # transformers' own module tree, model.language_model.*, is mapped.
    "qwen2_vl": Wrapper("Qwen2-VL (Qwen2VLForConditionalGeneration)", family="qwen2"),
    "qwen2_5_vl": Wrapper("Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)", family="qwen2"),
    # Qwen3's block under interleaved multimodal rotary sections (each frequency's position taken from time, height
    # or width in turn), which on text are all the token's position: Qwen3's rotation. Its deepstack visual features
    # are added to early blocks' outputs only where there are images.
    "qwen3_vl": Wrapper("Qwen3-VL (Qwen3VLForConditionalGeneration)", family="qwen3"),
    # Qwen3-VL-MoE (30B-A3B, 235B-A22B): Qwen3-MoE's block under Qwen3-VL's interleaved rotary sections, its router
    # always renormalising the top-k weights, its fused experts stored transposed by its hub checkpoints.
    "qwen3_vl_moe": Wrapper(
        "Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration)",
        family="qwen3_moe",
        sets=(("norm_topk_prob", True),),
        experts_transposed=True,
    ),
    # Its language model is a whole Llama4ForCausalLM, whose forward the wrapper calls as it is on text.
    "llama4": Wrapper("Llama 4 (Llama4ForConditionalGeneration)"),
}


def language_model(config: Any) -> tuple[Wrapper, Any] | None:
    """For a wrapper's config: the wrapper and the config of its language model as The Loom loads it (a copy of
    ``text_config``, tied as the wrapper ties its head); None for any other config."""
    wrapper = WRAPPERS.get(str(getattr(config, "model_type", "")))
    text = getattr(config, "text_config", None) if wrapper is not None else None
    if wrapper is None or text is None:
        return None
    text = as_family(text, wrapper.family) if wrapper.family else copy.deepcopy(text)
    for attr, value in wrapper.sets:
        setattr(text, attr, value)
    # transformers ties a model's head by its own config's flag: the wrapper's, not its text_config's.
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    for attr in wrapper.unused:
        setattr(text, attr, None)
    # A quantized checkpoint says so in the wrapper's config, which is how transformers knows to load it quantized.
    if getattr(config, "quantization_config", None) is not None:
        text.quantization_config = config.quantization_config
    return wrapper, text


def ambiguous_experts(wrapper: Wrapper, text: Any) -> str | None:
    """Why a checkpoint of ``wrapper`` with language model config ``text`` cannot be loaded right, or None: where its
    fused experts may be stored transposed and a square shape cannot tell which way they are (d_model equal to
    2 * d_expert for gate_up_proj, or to d_expert for down_proj), transformers' check of the shapes would keep them
    as they are, and a transposed checkpoint would compute wrong numbers without an error."""
    if not wrapper.experts_transposed:
        return None
    d_model, d_expert = int(text.hidden_size), int(getattr(text, "moe_intermediate_size", 0) or 0)
    if d_model not in (d_expert, 2 * d_expert):
        return None
    return (
        f"its fused experts may be stored transposed ([experts, d_model, 2 * d_expert], as its hub checkpoints are) "
        f"or not, and with hidden_size {d_model} and moe_intermediate_size {d_expert} their shapes cannot tell which"
    )


def as_family(text: Any, family: str) -> Any:
    """``text`` (a text_config) as a config of model_type ``family``, its multimodal rotary sections left out: they
    split the rotation among three positions, which on text are all the token's own."""
    from transformers import AutoConfig

    values = text.to_dict()
    multimodal = ("type", "mrope_section", "mrope_interleaved")  # Qwen3-VL interleaves its sections
    rope = {k: v for k, v in (values.pop("rope_parameters", None) or {}).items() if k not in multimodal}
    if rope.get("rope_type") == "mrope":  # how some configs say "default" with sections
        rope["rope_type"] = "default"
    # Its own type and its wrapper's architectures would make transformers build the wrapper's classes.
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        values.pop(key, None)
    return AutoConfig.for_model(family, **values, **({"rope_parameters": rope} if rope else {}))


def arch_of(config: Any) -> Arch | None:
    """The entry describing ``config``'s blocks, resolved for it (OPT's post-LN form, Falcon's
    new_decoder_architecture); None where there is none."""
    arch = ARCHITECTURES.get(str(getattr(config, "model_type", "")))
    if arch is None or refused(config):
        return None
    if arch.pre_norm_flag and not getattr(config, arch.pre_norm_flag, True):
        arch = attrs.evolve(arch, residual="post_ln")
    return arch.form(arch, config) if arch.form is not None else arch


def refused(config: Any) -> str | None:
    """Why the table's entry for ``config``'s model_type does not describe this config's blocks, or None."""
    arch = ARCHITECTURES.get(str(getattr(config, "model_type", "")))
    return arch.refuse(config) if arch is not None and arch.refuse is not None else None


def part(root: Any, path: str | None) -> Any:
    """The submodule (or attribute) at dotted ``path`` under ``root``; None when any step is missing."""
    if root is None or not path:
        return None
    for step in path.split("."):
        root = getattr(root, step, None)
        if root is None:
            return None
    return root


def recurrent(config: Any) -> bool:
    """Whether the model keeps a state instead of attending to its keys (Mamba): its decoding steps take no mask."""
    arch = arch_of(config)
    return arch is not None and arch.mixer is not None


def supported() -> list[str]:
    return sorted(ARCHITECTURES)
