"""Packed against padded rows in the sentence-transformers loader, in-process: what a merged batch costs the model.

    python bench/packing.py [--groups 32] [--size 16] [--repeats 3]

Texts go to the plugin's ``forward_with_states`` in groups of ``--size`` in arrival order (what the server merges
from that many clients), once packed and once padded (the model's packing switched off), alternating, the best of
``--repeats`` counting; for short texts (6-14 words) and mixed ones (4-60 words). Prints texts/s and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import best_of, corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=32, help="merged batches per run")
    parser.add_argument("--size", type=int, default=16, help="texts per merged batch")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (the best counts)")
    args = parser.parse_args()

    import torch

    from loom_kernel import Batch, Capture, LoadOptions
    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.resolve import resolve_model

    hooks = create_plugin_manager().hook
    model = hooks.load(
        model=resolve_model("minilm"), loader="sentence_transformers", options=LoadOptions(), kernel=None
    )
    print(f"all-MiniLM-L6-v2, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'texts':<12} | {'packed':>13} | {'padded':>13} | ratio")
    for words in ((6, 14), (4, 60)):
        texts = corpus(args.groups * args.size, seed=1, words=words)
        groups = [tuple(texts[i : i + args.size]) for i in range(0, len(texts), args.size)]

        def run(packing: bool, groups: list[tuple[str, ...]] = groups) -> None:
            model.extra["packing"] = packing
            for group in groups:
                hooks.forward_with_states(model=model, batch=Batch(texts=group), capture=Capture())

        run(True), run(False)  # warm-up
        packed, padded = [], []
        for _ in range(args.repeats):
            packed.append(best_of(1, lambda: run(True)))
            padded.append(best_of(1, lambda: run(False)))
        fast, slow = len(texts) / min(packed), len(texts) / min(padded)
        label = f"{words[0]}-{words[1]} words"
        print(f"{label:<12} | {fast:7.1f} texts/s | {slow:7.1f} texts/s | {fast / slow:.2f}")


if __name__ == "__main__":
    main()
