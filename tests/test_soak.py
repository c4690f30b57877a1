"""A soak on loopback: a real `loom serve`, many client threads, a few hundred mixed requests.

Every answer must be the answer to its own request (batching must not cross rows): each /extract, greedy
/generate, /generate/stream and /embed is compared with the same request run alone before the soak. No 5xx, and
the server's resident memory after the soak stays within 10% of what it was after a warm-up round.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from serverutil import HANG_S, loom_server

pytestmark = pytest.mark.slow

THREADS = 12
REQUESTS = 240
PROMPTS = [
    f"The {w} of the tiny model number {i}" for i, w in enumerate(["cat", "river", "clock", "song", "hill", "door"])
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stream_tokens(c: httpx.Client, body: dict) -> list[int]:
    tokens, done = [], None
    with c.stream("POST", "/generate/stream", json=body) as r:
        assert r.status_code == 200, r.read()
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "token":
                tokens.append(json.loads(line[5:])["token_id"])
            elif line.startswith("data:") and event == "done":
                done = json.loads(line[5:])
            elif line.startswith("data:") and event == "error":
                raise AssertionError(line)
    assert done is not None
    return tokens


def test_soak_mixed_concurrent_requests(tiny_models, tmp_path):
    causal, encoder, spare = (str(tiny_models[k]) for k in ("llama", "bert", "gpt2"))
    gen = {"model": causal, "max_tokens": 6, "temperature": 0.0}

    def call(c: httpx.Client, kind: str, i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        if kind == "extract":
            r = c.post("/extract", json={"model": causal, "text": prompt, "hidden_state_layers": [0, -1]})
            assert r.status_code == 200, r.text
            body = r.json()
            return body["token_ids"], json.dumps(body["hidden_states"], sort_keys=True)
        if kind == "generate":
            r = c.post("/generate", json={**gen, "prompt": prompt})
            assert r.status_code == 200, r.text
            return r.json()["text"]
        if kind == "stream":
            return stream_tokens(c, {**gen, "prompt": prompt})
        if kind == "embed":
            r = c.post("/embed", json={"model": encoder, "text": prompt})
            assert r.status_code == 200, r.text
            return r.json()["embedding"]
        if kind == "load":
            r = c.post("/models/load", json={"model": spare})
            assert r.status_code < 500 and r.status_code in (200, 409), r.text
            return None
        if kind == "unload":
            r = c.delete(f"/models/{spare}")
            assert r.status_code < 500 and r.status_code in (200, 404, 409), r.text
            return None
        raise AssertionError(kind)

    kinds = ["extract", "generate", "stream", "embed"]
    with loom_server([], tmp_path) as (base, _log, proc), httpx.Client(base_url=base, timeout=HANG_S) as c:
        alone = {(k, i): call(c, k, i) for k in kinds for i in range(len(PROMPTS))}

        rng = random.Random(7)
        plan = [(rng.choice([*kinds, *kinds, "load", "unload"]), rng.randrange(len(PROMPTS))) for _ in range(REQUESTS)]

        def run(batch):
            with ThreadPoolExecutor(THREADS) as pool, httpx.Client(base_url=base, timeout=HANG_S) as shared:
                return list(pool.map(lambda ki: (ki, call(shared, *ki)), batch))

        run(plan[:48])  # warm-up round: every kind, load and unload included
        warm = rss_kib(proc.pid)
        results = run(plan)
        after = rss_kib(proc.pid)

    for (kind, i), got in results:
        if kind in ("load", "unload"):
            continue
        want = alone[(kind, i)]
        if kind == "embed":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"embed {i}")
        elif kind == "extract":
            assert got[0] == want[0], f"extract {i}: token ids crossed"
            assert got[1] == want[1] or _close(got[1], want[1]), f"extract {i}: states differ"
        else:
            assert got == want, f"{kind} {i}: {got!r} != {want!r}"
    assert after <= warm * 1.10, f"RSS grew from {warm} KiB after warm-up to {after} KiB after the soak"


def _close(a: str, b: str) -> bool:
    x, y = json.loads(a), json.loads(b)
    return all(
        np.allclose(np.asarray(x[k]["data"], dtype=float), np.asarray(y[k]["data"], dtype=float), atol=1e-4) for k in x
    )
