"""Train a small GPT-2 on Python's own documentation: the recipe of ``pydoc-gpt2``, the causal model The Loom ships.

No pretrained causal model is reachable offline, and a randomly initialised one has no geometry worth plotting. The
stdlib ships ~460 KB of English prose in ``pydoc_data.topics`` (the text behind ``help("if")``), which is enough for
a few minutes of CPU training to move a 4-layer GPT-2 well away from its initialisation. The result is saved with
``save_pretrained`` (model and tokenizer). The shipped weights (``models/loom-model-pydoc-gpt2``) are this script's
defaults saved in float16:

    python demo/train_causal.py --out models/loom-model-pydoc-gpt2/loom_pydoc_gpt2/weights --save-dtype float16

It prints every step with the time left: about 3.5 minutes on 2 idle cores, far longer on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("demo/.cache/pydoc-gpt2")
EOS = "<|endoftext|>"
# Plain "role: content" lines, so that /v1/chat/completions serves the model too (it was not trained on chats).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]  # sorted: the same corpus order on every run


def train_tokenizer(docs: list[str], vocab_size: int) -> Any:
    """A byte-level BPE like GPT-2's (no unknown tokens, no prefix space), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_blocks(tokenizer: Any, docs: list[str], block: int) -> Any:
    """The whole corpus as one token stream (documents separated by EOS), cut into [n, block] rows."""
    import torch

    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def eval_loss(model: Any, blocks: Any, batch: int) -> float:
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            x = blocks[i : i + batch]
            total += model(input_ids=x, labels=x).loss.item() * len(x)
    model.train()
    return total / len(blocks)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    # linear warm-up then cosine decay to a tenth: the usual recipe, which matters with so few steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)

    docs = corpus()
    tokenizer = train_tokenizer(docs, args.vocab_size)
    tokenizer.model_max_length = 10**9  # the corpus is tokenized whole, then cut into blocks
    blocks = token_blocks(tokenizer, docs, args.block)
    tokenizer.model_max_length = args.block  # saved: what the model's position embeddings allow
    order = torch.randperm(len(blocks))
    n_eval = max(1, len(blocks) // 20)  # 5% held out, fixed by the seed
    eval_blocks, train_blocks = blocks[order[:n_eval]], blocks[order[n_eval:]]

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.block,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))

    start = time.perf_counter()
    loss_before = eval_loss(model, eval_blocks, args.batch)
    print(f"corpus: {len(docs)} documents, {blocks.numel()} tokens, {len(train_blocks)} training blocks", flush=True)
    print(f"held-out loss before training: {loss_before:.3f} (ln vocab = {math.log(len(tokenizer)):.3f})", flush=True)

    step, train_start = 0, time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    while step < args.steps:
        for idx in torch.randperm(len(train_blocks), generator=gen).split(args.batch):
            if step >= args.steps:
                break
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
            x = train_blocks[idx]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            elapsed = time.perf_counter() - train_start
            eta = elapsed / step * (args.steps - step)
            print(
                f"step {step}/{args.steps}  loss {loss.item():.3f}  {elapsed:.0f} s, about {eta:.0f} s left", flush=True
            )
    train_seconds = time.perf_counter() - train_start
    loss_after = eval_loss(model, eval_blocks, args.batch)
    print(f"held-out loss after {step} steps: {loss_after:.3f} ({train_seconds:.0f} s of training)", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    log = {
        "corpus": "pydoc_data.topics (Python's own documentation)",
        "corpus_tokens": int(blocks.numel()),
        "vocab_size": len(tokenizer),
        "config": {"n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads, "n_positions": args.block},
        "steps": step,
        "batch": args.batch,
        "seed": args.seed,
        "eval_loss_before": round(loss_before, 4),
        "eval_loss_after": round(loss_after, 4),
        "saved_dtype": args.save_dtype,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128, help="context length, also the model's n_positions")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32", help="dtype of the saved weights")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
