"""Tiny models built offline, for The Loom's tests and for third-party plugins' tests (a transformers dependency,
so it lives with the transformers plugin).

``build_tiny_model("llama", root)`` trains a small tokenizer in-process, builds a randomly initialised model with
``from_config`` under a fixed seed, and saves both with ``save_pretrained``: a directory any loader can load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "bert")
CAUSAL_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
# Built on request only (not by the shared fixtures): GPT-NeoX's parallel residual, Gemma 2's post-sublayer norms, and
# every other architecture of the transformers plugin's table (``architectures.py``).
MORE_ARCHITECTURES = (
    "gpt_neox",
    "gpt_neo",
    "gpt_bigcode",
    "gemma",
    "gemma2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "stablelm",
    "starcoder2",
    "gemma3_text",
    "olmo2",
    "gptj",
    "cohere",
    "phi",
    "falcon",
    "mamba",
    "opt",
    "bloom",
    "roberta",
    "xlm-roberta",
    "distilbert",
    "mpnet",
    "olmo",
    "olmo3",
    "qwen2_moe",
    "olmoe",
    "granite",
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
    "qwen3_next",
    "modernbert",
)
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert")
# BERT's block and config under other names: each one's config class and what it sets besides the sizes.
BERT_LIKE = {
    "bert": ("BertConfig", {}),
    "roberta": ("RobertaConfig", {"type_vocab_size": 1}),
    "xlm-roberta": ("XLMRobertaConfig", {"type_vocab_size": 1}),
    "mpnet": ("MPNetConfig", {"relative_attention_num_buckets": 32}),
}
# A decoder config of each of these families, with the sizes of the tiny models (a few layers, a 64-wide stream, 4
# heads of which 2 key-value heads where the family has grouped-query attention).
GQA_FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "qwen3": "Qwen3Config",
    "qwen3_moe": "Qwen3MoeConfig",
    "mixtral": "MixtralConfig",
    "phi3": "Phi3Config",
    "stablelm": "StableLmConfig",
    "starcoder2": "Starcoder2Config",
    "gemma3_text": "Gemma3TextConfig",
    "olmo2": "Olmo2Config",
    "cohere": "CohereConfig",
    "phi": "PhiConfig",
    "olmo": "OlmoConfig",
    "olmo3": "Olmo3Config",
    "qwen2_moe": "Qwen2MoeConfig",
    "olmoe": "OlmoeConfig",
    "granite": "GraniteConfig",
    "smollm3": "SmolLM3Config",
    "exaone4": "Exaone4Config",
    "ministral": "MinistralConfig",
    "seed_oss": "SeedOssConfig",
    "arcee": "ArceeConfig",
    "glm4": "Glm4Config",
    "gpt_oss": "GptOssConfig",
    "cohere2": "Cohere2Config",
    "glm4_moe": "Glm4MoeConfig",
    "llama4_text": "Llama4TextConfig",
    "deepseek_v3": "DeepseekV3Config",
    "deepseek_v2": "DeepseekV2Config",
    "ernie4_5": "Ernie4_5Config",
    "ernie4_5_moe": "Ernie4_5_MoeConfig",
    "hunyuan_v1_dense": "HunYuanDenseV1Config",
    "qwen3_next": "Qwen3NextConfig",  # refused by the table: built by its test with its own sizes
}
# What each of these families sets besides the sizes: the feature that makes it a family of its own, where a tiny
# model's test input (about 10 tokens) shows it.
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# DeepSeek-V2/V3's multi-head latent attention, tiny: block 0 dense, block 1 routed experts and a shared one.
MLA = {
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
}
FAMILY_EXTRAS: dict[str, dict[str, Any]] = {
    "olmo": {"clip_qkv": 0.1},  # below the tiny model's largest q, k and v, so that the clamp clips
    "olmo3": {"sliding_window": 4, "layer_types": SLIDING},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],  # block 1 dense
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    # Granite 3's multipliers (granite-3.0-2b's embedding, residual and logits ones; its attention_multiplier is its
    # head's 1 / d_head, here the tiny model's).
    "granite": {
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "logits_scaling": 8.0,
        "attention_multiplier": 0.0625,
    },
    "smollm3": {"no_rope_layers": [1, 0, 1]},  # block 1 NoPE
    "exaone4": {"sliding_window": 4, "layer_types": SLIDING},  # block 1 global: NoPE
    "ministral": {"sliding_window": 4, "layer_types": SLIDING},
    "seed_oss": {"attention_out_bias": True},
    "arcee": {},
    "glm4": {},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4, "layer_types": SLIDING},
    # The newer families are 2 blocks: each one's two kinds of block, no more.
    # Block 0 sliding (rotary), block 1 global (NoPE), as Command R7B alternates them.
    "cohere2": {
        "num_hidden_layers": 2,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "logit_scale": 0.0625,
    },
    # Block 0 dense (first_k_dense_replace), block 1 experts plus a shared expert; q_norm / k_norm on.
    "glm4_moe": {
        "num_hidden_layers": 2,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "use_qk_norm": True,
    },
    # Block 0 rotary with L2-normed q and k and a gated MLP; block 1 NoPE (temperature-tuned queries) with experts
    # and a shared expert; attention in chunks of 4 tokens, shorter than the tests' texts.
    "llama4_text": {
        "num_hidden_layers": 2,
        "no_rope_layers": [1, 0],
        "interleave_moe_layer_step": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 128,
        "attention_chunk_size": 4,
        "floor_scale": 2,
        "attn_scale": 0.5,
    },
    # Multi-head latent attention: q through a rank-24 latent (V3; V2-Lite's q_proj reads the stream), k and v
    # expanded per head from a rank-16 latent, 8 + 8 query/key dims (no rotary, rotary) and 12 value dims a head;
    # block 0 dense, block 1 experts plus a shared expert. Every head has its own key and value (its configs' own
    # num_key_value_heads, which eager attention's repeat reads).
    # V3's YaRN rotary, whose mscale_all_dim also scales the scores (its attention's scaling is not 1/sqrt(d_head)).
    "deepseek_v3": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        **MLA,
        "q_lora_rank": 24,
        "n_group": 1,
        "topk_group": 1,
    },
    "deepseek_v2": {**MLA, "q_lora_rank": None},
    "ernie4_5": {"num_hidden_layers": 2},
    # Block 0 dense, block 1 experts plus a shared expert.
    "ernie4_5_moe": {
        "num_hidden_layers": 2,
        "moe_num_experts": 4,
        "moe_k": 2,
        "moe_intermediate_size": 32,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
    },
    "hunyuan_v1_dense": {"num_hidden_layers": 2, "head_dim": 16},  # its default, None, it cannot compute with
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hidden states are the activations a transformer computes at every layer.",
    "The meaning of life is a question people have asked for a very long time.",
    "Hello world! How are you today? I am fine, thank you for asking.",
    "Researchers study how representations change from the first layer to the last.",
    "A model reads a prompt, one token at a time, and writes the next token.",
    "Embeddings place sentences with similar meaning close together in a vector space.",
    "Interpretability and alignment research need access to the internals of models.",
    "Numbers like 1, 2, 3, 42 and 1000 appear in text as well as words.",
    "The Loom exposes what production inference servers hide.",
]

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(arch: str) -> Any:
    """A PreTrainedTokenizerFast with the special-token behaviour of the real family."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch in ("bert", "distilbert", "modernbert"):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            # DistilBERT and ModernBERT take no token types, as their own tokenizers give none.
            **({"model_input_names": ["input_ids", "attention_mask"]} if arch != "bert" else {}),
        )
    # RoBERTa's order, whose position ids count from the pad id + 1.
    roberta = arch in ("roberta", "xlm-roberta", "mpnet")  # MPNet's padding index is 1 too
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if roberta else ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if arch in ("llama", "mistral") else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if arch in ("llama", "mistral"):  # these families prepend BOS; GPT-2 and Qwen2 add nothing
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    elif roberta:
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=False)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if arch == "llama":
        fast.chat_template = LLAMA_CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, tokenizer: Any, **overrides: Any) -> Any:
    import transformers

    common = {"vocab_size": len(tokenizer)}
    if arch in BERT_LIKE:
        name, extra = BERT_LIKE[arch]
        cfg = getattr(transformers, name)(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512 if arch == "bert" else 514,  # the others count from the padding index + 1
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **extra,
            **common,
        )
    elif arch == "distilbert":
        cfg = transformers.DistilBertConfig(
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=128,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
    elif arch == "modernbert":
        # Block 0 global, 1 and 2 local (every third block global, as its default), the local window 4 tokens each
        # side (local_attention 8), shorter than the tests' texts; ids from the tiny WordPiece ([CLS] ... [SEP]).
        cfg = transformers.ModernBertConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            local_attention=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            **common,
        )
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=512,
            use_parallel_residual=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **common,
        )
    elif arch in ("gptj", "falcon", "mamba", "opt", "gpt_neo", "gpt_bigcode", "bloom"):
        sizes = {
            "gptj": {"n_embd": 64, "n_layer": 3, "n_head": 4, "rotary_dim": 8, "n_positions": 512},
            "gpt_bigcode": {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 512, "multi_query": True},
            # A local layer's window shorter than the tests' texts, so that it shows.
            "gpt_neo": {
                "hidden_size": 64,
                "num_layers": 3,
                "num_heads": 4,
                "attention_types": [[["global", "local"], 1], [["global"], 1]],
                "window_size": 4,
                "max_position_embeddings": 512,
            },
            "falcon": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
            "bloom": {"hidden_size": 64, "n_layer": 3, "n_head": 4},
            "mamba": {"hidden_size": 64, "num_hidden_layers": 3, "state_size": 8, "expand": 2},
            "opt": {
                "hidden_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "ffn_dim": 128,
                "word_embed_proj_dim": 64,
                "max_position_embeddings": 512,
            },
        }[arch]
        cls = {
            "gptj": transformers.GPTJConfig,
            "gpt_neo": transformers.GPTNeoConfig,
            "gpt_bigcode": transformers.GPTBigCodeConfig,
            "falcon": transformers.FalconConfig,
            "bloom": transformers.BloomConfig,
            "mamba": transformers.MambaConfig,
            "opt": transformers.OPTConfig,
        }
        cfg = cls[arch](
            **sizes,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **common,
        )
    else:
        extra: dict[str, Any] = dict(FAMILY_EXTRAS.get(arch, {}))
        if arch in ("qwen3_moe", "mixtral"):
            extra = {"num_experts_per_tok": 2, "num_local_experts" if arch == "mixtral" else "num_experts": 4}
            if arch == "qwen3_moe":  # block 1 dense, as mlp_only_layers makes it
                extra.update(moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1])
        if arch == "phi3":
            extra["original_max_position_embeddings"] = 512
        if arch == "cohere":
            extra["logit_scale"] = 0.0625
        cfg = getattr(transformers, GQA_FAMILIES[arch])(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=extra.pop("num_hidden_layers", 3),
            num_attention_heads=4,
            num_key_value_heads=extra.pop("num_key_value_heads", 2),
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **extra,
            **common,
        )
    if arch in (
        "gemma",
        "gemma2",
        "gemma3_text",
        "qwen3",
        "qwen3_moe",
        "seed_oss",
        "glm4",
        "ministral",
        "gpt_oss",
        "glm4_moe",
        "llama4_text",
    ):
        # A default of 128 or 256 would make a tiny model's attention far wider than its stream; Ministral's default,
        # None, is one its attention cannot compute with.
        cfg.head_dim = 16
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(
    arch: str,
    root: Path,
    name: str | None = None,
    perturb_norms: bool = False,
    perturb_biases: bool = False,
    **overrides: Any,
) -> Path:
    """Build (once) and save a tiny ``arch`` model under ``root/name``; ``overrides`` set config attributes.

    ``perturb_norms``: every norm's weight (and bias) moved off its initial ones and zeros, so that a site taken on
    the wrong side of a norm shows (a freshly initialised norm is the identity); ``perturb_biases``: every other
    bias moved off its initial zeros too, so that a bias left out of a computation shows."""
    import torch
    import transformers

    if arch not in ARCHITECTURES + MORE_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHITECTURES + MORE_ARCHITECTURES}")
    out = Path(root) / (name or f"tiny-{arch}")
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    tokenizer = train_tokenizer(arch)
    config = tiny_config(arch, tokenizer, **overrides)
    torch.manual_seed(0)
    auto = transformers.AutoModel if arch in ENCODERS else transformers.AutoModelForCausalLM
    model = auto.from_config(config).eval()
    if perturb_norms or perturb_biases:
        perturb(model, biases=perturb_biases)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturb(model: Any, biases: bool = False) -> None:
    """Every norm's weight and bias moved by seeded noise (0.3 and 0.2 standard deviations); ``biases``: every
    other module's bias too (0.2)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            norm = "norm" in type(module).__name__.lower()
            if not (norm or biases):
                continue
            for attr, std in (("weight", 0.3), ("bias", 0.2)) if norm else (("bias", 0.2),):
                p = getattr(module, attr, None)
                if isinstance(p, torch.nn.Parameter):
                    p.add_(std * torch.randn(p.shape, generator=gen).to(p.dtype))


QWEN_VL_TEXT = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
QWEN3_VL_TEXT = {
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
    }
}
# Multimodal checkpoints whose language model The Loom serves alone (``architectures.WRAPPERS``): each one's config
# class, the tiny family of its language model, its vision tower's config class, and what its config sets besides.
WRAPPED = {
    # Gemma 3's 4B and larger: a local (sliding-window) block and a global one, the window shorter than the tests'
    # texts, and a final soft-capping in the text config, which Gemma3ForConditionalGeneration does not apply.
    "gemma3": (
        "Gemma3Config",
        "gemma3_text",
        "SiglipVisionConfig",
        {"mm_tokens_per_image": 4},
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4, "final_logit_softcapping": 2.0},
    ),
    "mistral3": ("Mistral3Config", "mistral", "PixtralVisionConfig", {"tie_word_embeddings": False}, {}),
    "llava": ("LlavaConfig", "llama", "CLIPVisionConfig", {"tie_word_embeddings": False}, {}),
    # Qwen2's block under multimodal rotary embeddings: three sections of the 8 frequencies of a 16-wide head.
    "qwen2_vl": ("Qwen2VLConfig", "qwen2", "Qwen2VLVisionConfig", {"tie_word_embeddings": False}, QWEN_VL_TEXT),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "qwen2", "Qwen2_5_VLVisionConfig", {"tie_word_embeddings": True}, QWEN_VL_TEXT),
    # Qwen3's block under interleaved multimodal rotary sections of the 8 frequencies of a 16-wide head.
    "qwen3_vl": ("Qwen3VLConfig", "qwen3", "Qwen3VLVisionConfig", {"tie_word_embeddings": False}, QWEN3_VL_TEXT),
    # Qwen3-MoE's block under the same sections: block 0 dense (mlp_only_layers), block 1 four experts 24 wide, so
    # that no expert weight is square (a 2 * 24 x 64 gate_up_proj shows which way it is stored). Its config keeps
    # the tiny Qwen3-MoE's norm_topk_prob false, which the wrapper's router ignores: it always renormalises.
    "qwen3_vl_moe": (
        "Qwen3VLMoeConfig",
        "qwen3_moe",
        "Qwen3VLMoeVisionConfig",
        {"tie_word_embeddings": False},
        {**QWEN3_VL_TEXT, "mlp_only_layers": [0], "moe_intermediate_size": 24},
    ),
    # Llama 4 Scout / Maverick: its language model is a whole Llama4ForCausalLM under the wrapper.
    "llama4": ("Llama4Config", "llama4_text", "Llama4VisionConfig", {"tie_word_embeddings": False}, {}),
}
# Each vision tower's tiny sizes under its own config's names (a 2-block tower 32 wide, 14-pixel patches); Qwen's
# project to the language model's width (``WIDTH``, filled in with it).
VISION: dict[str, dict[str, Any]] = {
    "PixtralVisionConfig": {"head_dim": 8},
    # Its pixel-shuffle projector's widths (a 2 x 2 grid of patches shuffled into one token of 4 x 32).
    "Llama4VisionConfig": {
        "vision_output_dim": 32,
        "projector_input_dim": 32,
        "projector_output_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "Qwen2VLVisionConfig": {"depth": 2, "embed_dim": 32, "hidden_size": "WIDTH", "mlp_ratio": 2, "num_heads": 4},
    "Qwen3VLVisionConfig": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": "WIDTH",
        "deepstack_visual_indexes": [0],
        "num_position_embeddings": 16,
    },
    "Qwen2_5_VLVisionConfig": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": "WIDTH",
        "fullatt_block_indexes": [1],
    },
}

VISION["Qwen3VLMoeVisionConfig"] = VISION["Qwen3VLVisionConfig"]  # Qwen3-VL-MoE's tower is Qwen3-VL's


def build_tiny_wrapper(model_type: str, root: Path, name: str | None = None) -> Path:
    """Build (once) and save a tiny multimodal checkpoint of ``model_type`` (one of ``WRAPPED``): a 2-block language
    model of the tiny family's sizes under a 2-block vision tower 32 wide (28-pixel images, 14-pixel patches), its
    norms perturbed, saved by ``save_pretrained`` as the hub's checkpoints are (``language_model.model.*``; Qwen's
    ``model.*``), Qwen3-VL-MoE's fused experts then transposed to its hub checkpoints' layout, which transformers
    5's ``save_pretrained`` does not write (``HUB_TRANSPOSED_EXPERTS``)."""
    import torch
    import transformers

    config_name, family, vision_name, extra, text_extra = WRAPPED[model_type]
    out = Path(root) / (name or f"tiny-{model_type}")
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    tokenizer = train_tokenizer(family)
    text = tiny_config(family, tokenizer).to_dict()
    text.pop("layer_types", None)  # sized for the tiny family's 3 blocks
    # The family's model_type would stay on the wrapper's text config object (not in its config.json), where
    # transformers' save_pretrained looks up weight conversions by it: Qwen3-MoE's per-expert ones for Qwen3-VL-MoE.
    text.pop("model_type", None)
    text.update(num_hidden_layers=2, **text_extra)
    vision: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    vision.update(num_attention_heads=4, image_size=28, patch_size=14)
    if vision_name.startswith("Qwen"):  # other names; 4-pixel patches, as 14 makes its 3-D patch embedding the bulk
        vision = {"patch_size": 4}
    vision.update({k: text["hidden_size"] if v == "WIDTH" else v for k, v in VISION.get(vision_name, {}).items()})
    vocab = len(tokenizer)  # image tokens past the text vocabulary, as no text tokenizes to them
    tokens = {"image_token_index": vocab + 1}
    if model_type == "gemma3":
        tokens.update(boi_token_index=vocab + 2, eoi_token_index=vocab + 3)
    if model_type.startswith("qwen"):
        tokens = {"image_token_id": vocab + 1, "video_token_id": vocab + 2}
        tokens.update(vision_start_token_id=vocab + 3, vision_end_token_id=vocab + 4)
    config = getattr(transformers, config_name)(
        text_config=text, vision_config=getattr(transformers, vision_name)(**vision).to_dict(), **tokens, **extra
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    perturb(model)
    model.save_pretrained(out)
    if model_type in HUB_TRANSPOSED_EXPERTS:
        transpose_experts(out)
    tokenizer.save_pretrained(out)
    return out


# Wrappers whose hub checkpoints store each block's fused experts transposed from transformers 5's modules, which
# its save_pretrained writes as the modules hold them: Qwen3-VL-MoE's ([experts, d_model, 2 * d_expert] and
# [experts, d_expert, d_model], the layout transformers' own conversion mapping for it reads).
HUB_TRANSPOSED_EXPERTS = ("qwen3_vl_moe",)


def transpose_experts(out: Path) -> None:
    """Every fused expert weight (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) of the checkpoint in
    ``out`` transposed in place (its last two dimensions): from the layout of transformers 5's modules to the hub's,
    or back."""
    from safetensors.torch import load_file, save_file

    for file in out.glob("*.safetensors"):
        weights = load_file(file)
        fused = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
        moved = {k: t.transpose(1, 2).contiguous() if k.endswith(fused) else t for k, t in weights.items()}
        save_file(moved, file, metadata={"format": "pt"})
