"""What the staggered row of ``python -m bench`` could reach on this machine with a scheduler that costs nothing.

    python bench/staggered.py [--steps 20] [--device cuda]

Measures, in-process on the GPT-2-small-sized model, the transformers plugin's decoder: a prefill pass of one
16-token prompt and a decoding step of 1 to 8 running rows (medians of ``--steps``). Then plays the bench's
staggered schedule (8 clients ``STAGGER_GAP_S`` apart, ``staggered_lengths()``) through a scheduler that spends
nothing beyond those passes: at each step boundary the arrived requests join (one prefill each), then every running
row steps. Prints the throughput this ideal server reaches over the same requests one at a time, and what it would
reach if a step of many rows cost what a step of one does (the bound of the arrival order alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import STAGGER_GAP_S, build, latencies, staggered_lengths


def play(lengths: list[int], prefill: float, step: Callable[[int], float]) -> float:
    """Seconds until the last of ``lengths`` finishes when they arrive STAGGER_GAP_S apart (the prefill gives each
    request its first token; each later token takes one step of all running rows)."""
    now, arrived, left = 0.0, 0, {}
    while arrived < len(lengths) or left:
        while arrived < len(lengths) and STAGGER_GAP_S * arrived <= now:
            now += prefill
            left[arrived], arrived = lengths[arrived] - 1, arrived + 1
        if not left:
            now = STAGGER_GAP_S * arrived
            continue
        now += step(len(left))
        left = {k: n - 1 for k, n in left.items() if n > 1}
    return now


@attrs.define(frozen=True)
class Bound:
    prefill: float  # seconds of one 16-token prompt's prefill
    steps: dict[int, float]  # seconds of a step of n running rows
    alone: float  # the staggered requests one at a time
    ideal: float  # ... through a scheduler that costs nothing beyond the passes
    free: float  # ... if a step of n rows cost what a step of one does


def measure(model_dir: str, repeats: int = 20, device: str = "cpu") -> Bound:
    """The decoder's passes on the model at ``model_dir`` on ``device`` (medians of ``repeats``; each pass ends
    with its tokens chosen on the CPU, so a GPU's work is done when it is timed), and the schedule played with
    them."""
    import torch

    from loom_kernel import LoadOptions
    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.resolve import resolve_model

    hooks = create_plugin_manager().hook
    model = hooks.load(
        model=resolve_model(model_dir), loader="transformers", options=LoadOptions(device=device), kernel=None
    )
    with torch.inference_mode():
        prefills = latencies(repeats, lambda: _prefill(model))
        steps = {rows: statistics.median(_steps(model, rows, repeats)) for rows in range(1, 9)}
    prefill, lengths = statistics.median(prefills), staggered_lengths()
    return Bound(
        prefill=prefill,
        steps=steps,
        alone=sum(prefill + (n - 1) * steps[1] for n in lengths),
        ideal=play(lengths, prefill, lambda n: steps[n]),
        free=play(lengths, prefill, lambda n: steps[1]),
    )


PROMPT = list(range(3, 19))  # 16 tokens


def _rows(n: int) -> list[Any]:
    from loom_kernel import Capture, RowInput

    return [RowInput(id=i, prompt=PROMPT, capture=Capture()) for i in range(n)]


def _picked(out: Any) -> dict[int, int]:
    """Each row's greedy token, read on the CPU in one copy (as the kernel's sampler does)."""
    return dict(zip(out.ids, out.logits.argmax(-1).tolist(), strict=True))


def _prefill(model: Any) -> None:
    decoder = model.decoder(False)
    _picked(decoder.prefill(_rows(1)))
    decoder.close()


def _steps(model: Any, rows: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` steps of ``rows`` running rows, from the middle of the contexts the staggered
    requests reach (48 steps in)."""
    decoder = model.decoder(False)
    feed = _picked(decoder.prefill(_rows(rows)))

    def step() -> None:
        feed.update(_picked(decoder.step(feed)))

    for _ in range(48):
        step()
    try:
        return latencies(repeats, step)
    finally:
        decoder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed passes of each kind (the median counts)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda)")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        b = measure(str(build(Path(tmp))), args.steps, args.device)
    print(f"GPT-2-small-sized, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"prefill of 16 tokens: {b.prefill * 1000:.1f} ms")
    print("step of n rows:      " + ", ".join(f"{n}: {s * 1000:.1f} ms" for n, s in b.steps.items()))
    print(f"arrival order (max_tokens): {staggered_lengths()}, {STAGGER_GAP_S} s apart")
    print(f"one at a time: {b.alone:.2f} s")
    print(f"an ideal scheduler with these steps: {b.ideal:.2f} s, {b.alone / b.ideal:.2f}x one at a time")
    print(f"... if n rows stepped as fast as one: {b.free:.2f} s, {b.alone / b.free:.2f}x")


if __name__ == "__main__":
    main()
