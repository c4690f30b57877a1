"""The running batch's KV cache with room to grow against transformers' concatenating one, in-process.

    python bench/cache.py [--rows 8] [--tokens 256] [--repeats 5] [--device cuda]

``--rows`` greedy generations of ``--tokens`` tokens each run as one batch of the transformers plugin's decoder on the
GPT-2-small-sized model, once with its ``RoomyLayer`` cache and once with transformers' ``DynamicLayer`` (which
copies the whole cache to append each step's column), alternating, the best of ``--repeats`` counting; one row, then
all of them. Prints tokens/s and the ratio, and checks that both give the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import best_of, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="generations in the batch")
    parser.add_argument("--tokens", type=int, default=256, help="tokens each generates")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (the best counts)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda)")
    args = parser.parse_args()

    import loom_transformers.cache as cache
    import torch

    from loom_kernel import Batch, Capture, GenerationParams, LoadOptions, generate_whole
    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.resolve import resolve_model

    roomy = cache.roomy
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp))
        hooks = create_plugin_manager().hook
        model = hooks.load(
            model=resolve_model(str(path)), loader="transformers", options=LoadOptions(device=args.device), kernel=None
        )
    print(f"GPT-2-small-sized, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'rows':<5} | {'roomy':>13} | {'concatenating':>13} | ratio")
    params = GenerationParams(max_tokens=args.tokens, temperature=0)
    for rows in sorted({1, args.rows}):
        batch = Batch(texts=tuple(f"Sample {i} of the text the model reads" for i in range(rows)), generation=params)
        tokens: dict[bool, list[list[int]]] = {}

        def run(room: bool, batch: Batch = batch, tokens: dict[bool, list[list[int]]] = tokens) -> None:
            cache.roomy = roomy if room else lambda c: c
            tokens[room] = [row.generated_ids for row in generate_whole(model, batch, Capture()).rows]

        run(True), run(False)  # warm-up
        with_room, without = [], []
        for _ in range(args.repeats):
            with_room.append(best_of(1, lambda: run(True)))
            without.append(best_of(1, lambda: run(False)))
        cache.roomy = roomy
        fast, slow = rows * args.tokens / min(with_room), rows * args.tokens / min(without)
        same = "same tokens" if tokens[True] == tokens[False] else "TOKENS DIFFER"
        print(f"{rows:<5} | {fast:7.1f} tok/s | {slow:7.1f} tok/s | {fast / slow:.2f} ({same})")


if __name__ == "__main__":
    main()
