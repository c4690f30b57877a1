"""The generation engine A/B that chose continuous batching's mechanism, in one run on this machine.

    python bench/engines.py [--rows 8] [--tokens 32] [--repeats 3]

On the GPT-2-small-sized model of ``python -m bench``: the same prompts generated greedily, all joined at once,
by the transformers plugin's own decoder (``loom_transformers.generation.Decoder``, a left-padded KV cache that
rows join and leave) and by the continuous-batching engine transformers ships (``model.generate_batch``, a paged
cache). Prints whether the tokens agree and each engine's best tokens/s. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from loom_transformers.generation import Decoder
    from transformers import GenerationConfig

    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.resolve import resolve_model
    from loom_kernel.types import Batch, Capture, GenerationParams, LoadOptions

    with tempfile.TemporaryDirectory() as tmp:
        ref = resolve_model(str(build(Path(tmp))))
        model = create_plugin_manager().hook.load(
            model=ref, loader="transformers", options=LoadOptions("cpu"), kernel=None
        )
        texts = [f"The quick brown fox number {i} jumps over the lazy dog and runs far away" for i in range(args.rows)]
        prompts = [model.tokenizer(t)["input_ids"] for t in texts]

        def ours() -> list[list[int]]:
            decoder = Decoder(model)
            params = GenerationParams(max_tokens=args.tokens, temperature=0)
            ids = decoder.join(Batch(token_ids=tuple(map(tuple, prompts)), generation=params), Capture())
            while decoder.busy:
                decoder.step()
            return [decoder.done[i].generated_ids for i in ids]

        def theirs() -> list[list[int]]:
            config = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            out = model.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
            return [list(out[k].generated_tokens) for k in sorted(out)]

        print("same tokens:", ours() == theirs())
        engines: dict[str, Callable[[], object]] = {"loom Decoder": ours, "transformers generate_batch": theirs}
        for name, fn in engines.items():
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            rate = args.rows * args.tokens / best
            print(f"{name}: {args.rows} x {args.tokens} tokens in {best:.2f} s, {rate:.1f} tok/s")


if __name__ == "__main__":
    main()
