"""Generation with hidden states against raw transformers, in one run on this machine.

    python bench/generate.py [--tokens 64] [--repeats 3]

A GPT-2-small-sized model (12 layers, 768 wide) is built offline. The reference is transformers' own
``generate`` (greedy, no states) in-process; The Loom is measured over HTTP against a real ``loom serve`` with
the last layer, all layers, and all layers over the full sequence in safetensors. Peak memory of a 768-token
generation with last-layer capture is compared with ``generate`` without states and with
``output_hidden_states=True``, each in its own process (RSS growth, large blocks mmapped so that RSS follows live
tensors). Prints ratios; no absolute numbers are asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/generate.py` as well as `python -m bench.generate`

from bench.common import build, serve  # noqa: E402

PROMPT = "The meaning of life is a question people have asked for a very long time, and"

MEMORY_CHILD = r"""
import os, sys, threading, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
ids = tok("Hello", return_tensors="pt")
if mode in ("transformers", "plain"):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    run = lambda: model.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 output_hidden_states=mode == "transformers", return_dict_in_generate=True)
else:
    from loom_kernel import Batch, Capture, GenerationParams, LoadOptions, resolve_layers
    from loom_kernel.plugins import create_plugin_manager
    from loom_kernel.resolve import resolve_model
    pm = create_plugin_manager()
    loaded = pm.hook.load(model=resolve_model(path), loader="transformers", options=LoadOptions(), kernel=None)
    batch = Batch(texts=("Hello",), generation=GenerationParams(max_tokens=n, temperature=0))
    capture = Capture(layers=resolve_layers([-1], loaded.num_layers), positions="last")
    run = lambda: pm.hook.forward_with_states(model=loaded, batch=batch, capture=capture)
with torch.inference_mode():
    run()  # warm-up: allocator arenas and thread pools are not what is being measured
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
threading.Thread(target=sample, daemon=True).start()
with torch.inference_mode():
    result = run()
done.set()
print(max(peak[0], rss()) - before)
"""


def reference_seconds(path: Path, tokens: int, repeats: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(PROMPT, return_tensors="pt")
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.generate(**ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens)
            times.append(time.perf_counter() - start)
    return times[1:]  # the first run warms up


def loom_seconds(base: str, body: dict, repeats: int) -> list[float]:
    import httpx

    times = []
    with httpx.Client(timeout=600) as c:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            r = c.post(f"{base}/generate", json=body)
            r.raise_for_status()
            times.append(time.perf_counter() - start)
    return times[1:]


BATCH_PROMPTS = [
    "The quick brown fox",
    "Hidden states are the activations",
    "Researchers study how representations change from the first layer",
    "A model reads a prompt",
    "Embeddings place sentences with similar meaning close together",
    "Hello world! How are you",
    "Numbers like 1, 2, 3",
    "Interpretability and alignment research need access",
]


def batch_vs_sequential(base: str, common: dict, repeats: int) -> tuple[float, float, bool]:
    """Seconds for the 8 prompts as one /generate/batch and as 8 /generate calls, and whether tokens agree."""
    import httpx

    body = {k: v for k, v in common.items() if k != "prompt"}
    batch_t, seq_t, same = [], [], True
    with httpx.Client(timeout=600) as c:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            r = c.post(f"{base}/generate/batch", json={**body, "prompts": BATCH_PROMPTS})
            r.raise_for_status()
            batch_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            alone = [c.post(f"{base}/generate", json={**body, "prompt": p}).json() for p in BATCH_PROMPTS]
            seq_t.append(time.perf_counter() - start)
            same = same and [x["token_ids"] for x in r.json()["results"]] == [x["token_ids"] for x in alone]
    return statistics.median(batch_t[1:]), statistics.median(seq_t[1:]), same


def peak_bytes(path: Path, mode: str, tokens: int) -> int:
    # Large blocks straight from mmap and returned on free: RSS then follows live tensors, not allocator arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(path), mode, str(tokens)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    # Long enough that the states transformers keeps (13 layers x tokens x 768 floats) stand out of allocator noise.
    parser.add_argument("--memory-tokens", type=int, default=768)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp))
        ref = statistics.median(reference_seconds(path, args.tokens, args.repeats))
        common = {"model": str(path), "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0}
        cases = {
            "last layer": {"return_hidden_states": True, "hidden_state_layers": [-1]},
            "all layers": {"return_hidden_states": True, "hidden_state_layers": "all"},
            "all layers, full sequence, safetensors": {
                "hidden_state_layers": "all",
                "return_full_sequence": True,
                "hidden_state_format": "safetensors",
            },
        }
        rows = [("transformers generate (reference, in-process)", ref, 1.0)]
        with serve([str(path)]) as base:
            for name, extra in cases.items():
                t = statistics.median(loom_seconds(base, {**common, **extra}, args.repeats))
                rows.append((f"The Loom /generate over HTTP, {name}", t, t / ref))
            last = {**common, **cases["last layer"]}
            batched, sequential, same = batch_vs_sequential(base, last, args.repeats)
        mem_plain = peak_bytes(path, "plain", args.memory_tokens)
        mem_ref = peak_bytes(path, "transformers", args.memory_tokens)
        mem_loom = peak_bytes(path, "loom", args.memory_tokens)
    print(f"\n{args.tokens} new tokens, median of {args.repeats}, GPT-2-small-sized (12 x 768), CPU")
    print(f"{'case':58} {'seconds':>9} {'ratio':>7}")
    for name, t, ratio in rows:
        print(f"{name:58} {t:9.3f} {ratio:7.2f}")
    print(f"\npeak memory growth during a {args.memory_tokens}-token generation")
    print(f"  transformers generate, no states (baseline):      {mem_plain / 2**20:8.1f} MiB")
    print(f"  transformers generate(output_hidden_states=True): {mem_ref / 2**20:8.1f} MiB")
    print(f"  The Loom, last layer captured:                    {mem_loom / 2**20:8.1f} MiB")
    print(f"  ratio The Loom / baseline:                        {mem_loom / max(mem_plain, 1):8.2f}")
    print(f"  ratio The Loom / output_hidden_states:            {mem_loom / max(mem_ref, 1):8.2f}")
    print(f"\n{len(BATCH_PROMPTS)} prompts of 4-10 tokens, last layer: one /generate/batch against one /generate each")
    print(f"  /generate/batch: {batched:.3f} s, sequential: {sequential:.3f} s, speed-up {sequential / batched:.2f}x")
    print(f"  same tokens as one by one: {same}")
    summary = {
        "ratios": {n: round(r, 3) for n, _, r in rows},
        "memory_ratio": mem_loom / max(mem_ref, 1),
        "memory_vs_baseline": mem_loom / max(mem_plain, 1),
        "batch_speedup": sequential / batched,
        "batch_same_tokens": same,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
