"""Interventions on the GPT-2-small-sized model: what an edit costs, whether edited requests still batch, and
/patch against the same runs sent as requests one after another."""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from typing import Any

import numpy as np


def bench_interventions(batched: str, model: str, quick: bool, row: Any, prompts: Any) -> list[dict[str, Any]]:
    import httpx
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = prompts(tok, 8, 16)
    rng = np.random.default_rng(0)
    edits = [
        [{"site": "blocks.6.hook_resid_post", "op": "add", "vector": rng.standard_normal(768).tolist(), "scale": 2.0}]
        for _ in texts
    ]
    repeats = 5 if quick else 15
    with httpx.Client(base_url=batched, timeout=600) as c:

        def timed(path: str, body: dict[str, Any]) -> float:
            start = time.perf_counter()
            c.post(path, json=body).raise_for_status()
            return time.perf_counter() - start

        extract = {"model": model, "text": texts[0], "hidden_state_layers": [-1], "positions": "all"}
        for _ in range(2):  # warm-up
            timed("/extract", extract)
            timed("/extract", {**extract, "interventions": edits[0]})
        plain, edited = [], []
        for _ in range(repeats):  # alternating, so that a slow spell falls on both sides
            plain.append(timed("/extract", extract))
            edited.append(timed("/extract", {**extract, "interventions": edits[0]}))

        def clients(with_edits: bool) -> float:
            bodies = [
                {
                    "model": model,
                    "prompt": t,
                    "max_tokens": 32,
                    "temperature": 0,
                    **({"interventions": e} if with_edits else {}),
                }
                for t, e in zip(texts, edits, strict=True)
            ]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                for r in pool.map(lambda b: httpx.post(f"{batched}/generate", json=b, timeout=600), bodies):
                    r.raise_for_status()
            return len(bodies) * 32 / (time.perf_counter() - start)

        same, different = [], []
        for _ in range(1 if quick else 3):
            same.append(clients(False))
            different.append(clients(True))

        sites, positions = [f"blocks.{i}.hook_resid_pre" for i in range(0, 12, 3)], 8
        # One differing word, the same token count (the tiny tokenizer's, as tests/test_patching.py uses).
        clean, corrupted = "The cat sat on the mat and looked at the", "The cap sat on the mat and looked at the"
        metric = {"type": "logprob", "token": "."}
        patch = {
            "model": model,
            "clean": clean,
            "corrupted": corrupted,
            "sites": sites,
            "positions": list(range(-positions, 0)),
            "metric": metric,
        }
        timed("/patch", patch)  # warm-up
        runs = 2 + len(sites) * positions
        one_call = statistics.median(timed("/patch", patch) for _ in range(1 if quick else 3))
        # The same runs as one request each: a one-token generation with its one edit (the clean state at a site
        # and position), sent one after another as a client without /patch would.
        vector = rng.standard_normal(768).tolist()
        single = {"model": model, "prompt": corrupted, "max_tokens": 1, "temperature": 0, "return_logits": True}
        start = time.perf_counter()
        for i in range(runs):
            edit = {"site": sites[i % len(sites)], "op": "set", "vector": [vector], "positions": [-1 - i % positions]}
            c.post("/generate", json={**single, "interventions": [edit]}).raise_for_status()
        one_by_one = time.perf_counter() - start
        # Attribution patching against exact patching of the same sweep: 4 blocks' inputs x every position.
        sweep = {**patch, "positions": "all"}
        timed("/patch", {**sweep, "method": "attribution"})  # warm-up
        exact, attribution = [], []
        for _ in range(1 if quick else 3):  # alternating
            exact.append(timed("/patch", sweep))
            attribution.append(timed("/patch", {**sweep, "method": "attribution"}))
        sweep_runs = 2 + len(sites) * len(tok(corrupted)["input_ids"])
    note = (
        f"an add of a 768-vector at block 6's output, all positions; {repeats} alternating /extract runs, medians; "
        f"8 clients x 32 greedy tokens; /patch of {len(sites)} sites x {positions} positions ({runs} runs)"
    )
    return [
        row(
            "interventions: /extract with a steering edit vs without",
            statistics.median(edited) * 1000,
            statistics.median(plain) * 1000,
            "ms",
            "<= 1.2",
            lambda r: r <= 1.2,
            note,
        ),
        row(
            "interventions: 8 clients with 8 different edits vs without edits",
            max(different),
            max(same),
            "tok/s",
            ">= 0.8",
            lambda r: r >= 0.8,
        ),
        row(
            f"interventions: /patch of {runs} runs vs the same runs one request each",
            one_call * 1000,
            one_by_one * 1000,
            "ms",
            "<= 0.5",
            lambda r: r <= 0.5,
        ),
        row(
            f"interventions: /patch method attribution vs exact ({len(sites)} sites x every position)",
            statistics.median(attribution) * 1000,
            statistics.median(exact) * 1000,
            "ms",
            "<= 0.1",
            lambda r: r <= 0.1,
            f"exact: {sweep_runs} runs; attribution: the clean pass and one forward and backward pass",
        ),
    ]
