"""The third-party plugin template (demo/loom-plugin-example), installed for real with pip and served.

The package is installed by pip, non-editable, from a copy (so its build leaves nothing in the checkout) into a
directory of the test's own that only the servers started here have on their path: the suite's environment never
has it, so no other test (nor one running beside it in another worker) sees the plugin, and nothing is left behind. The
template's own tests run against that install in a pytest of their own. The reference states come from running the toy
network by hand on the saved weights, not from the plugin's code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from serverutil import HANG_S, REPO, loom_server

DEMO = REPO / "demo" / "loom-plugin-example"
DIST = "loom-plugin-example"
TEXT = "Toy models, ça va?"  # a multi-byte character: the byte tokenizer gives it two ids
BOS = 256


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def hand_states(model_dir: Path, ids: list[int], add: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[T, H] per index 0..N: the embedding output, each block's output, and (index N) the final norm's output;
    ``add``: a vector added to block 0's output, as a forward hook on it would (index 1 then holds the sum)."""
    w = torch.load(model_dir / "weights.pt", weights_only=True)
    n = len({key.split(".")[1] for key in w if key.startswith("blocks.")})

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    t = torch.tensor(ids)
    x = w["embed.weight"][t] + w["positions.weight"][: len(ids)]
    states = [x]
    for i in range(n):
        b = f"blocks.{i}"
        h = norm(x, f"{b}.norm")
        prefix_mean = h.cumsum(0) / torch.arange(1, len(ids) + 1, dtype=h.dtype).unsqueeze(1)
        x = x + linear(prefix_mean, f"{b}.mix") + linear(F.gelu(linear(h, f"{b}.up")), f"{b}.down")
        if i == 0 and add is not None:
            x = x + add
        states.append(x)
    states[n] = norm(x, "norm")  # index N is what the model returns, after the final norm (as in transformers)
    return states


def hand_greedy(model_dir: Path, ids: list[int], steps: int, add: torch.Tensor | None = None) -> list[int]:
    """The causal toy's greedy tokens, by hand: its LM head on the final norm's output, one token at a time."""
    w = torch.load(model_dir / "weights.pt", weights_only=True)
    ids = list(ids)
    for _ in range(steps):
        last = hand_states(model_dir, ids, add)[-1][-1]
        ids.append(int((last @ w["head.weight"].T + w["head.bias"]).argmax()))
    return ids


def close(got: list, want: torch.Tensor) -> None:
    got_t = torch.tensor(got, dtype=torch.float32)
    assert got_t.shape == want.shape, (got_t.shape, want.shape)
    assert float((got_t - want).abs().max()) < 1e-6


def check_the_causal_toy(base: str, model: Path) -> None:
    """The causal toy declares its parts and nothing else: through the server it generates its own greedy tokens,
    streams them, samples ``n``, takes an ``add`` at index 1 as a forward hook on its first block would, and its
    lens of the last layer is its own next-token choice."""
    prompt = [BOS, *b"Hi"]
    ask = {"model": str(model), "prompt": "Hi", "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{base}/generate", json=ask, timeout=HANG_S)
    assert r.status_code == 200, r.text
    assert [*prompt, *r.json()["token_ids"]] == hand_greedy(model, prompt, 8)
    with httpx.stream("POST", f"{base}/generate/stream", json=ask, timeout=HANG_S) as events:
        streamed = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: ")]
    assert [e["token_id"] for e in streamed[:-1]] == r.json()["token_ids"] and "token_count" in streamed[-1]
    sampled = {**ask, "temperature": 1.0, "seed": 5}
    both = httpx.post(f"{base}/generate", json={**sampled, "n": 2}, timeout=HANG_S).json()["choices"]
    for i, choice in enumerate(both):
        alone = httpx.post(f"{base}/generate", json={**sampled, "seed": 5 + i}, timeout=HANG_S).json()
        assert choice["token_ids"] == alone["token_ids"]
    vector = torch.linspace(-1, 1, 16)
    edit = [{"site": 1, "op": "add", "vector": vector.tolist()}]
    edited = httpx.post(f"{base}/generate", json={**ask, "interventions": edit}, timeout=HANG_S).json()
    assert [*prompt, *edited["token_ids"]] == hand_greedy(model, prompt, 8, add=vector)
    assert edited["token_ids"] != r.json()["token_ids"]
    lens = {"model": str(model), "text": "Hi", "positions": "all", "logit_lens": {"layers": [-1], "top_k": 1}}
    out = httpx.post(f"{base}/extract", json=lens, timeout=HANG_S).json()
    tops = [entry[0]["token_id"] for entry in out["logit_lens"]["-1"]["top_k"]]
    assert tops[-1] == hand_greedy(model, prompt, 1)[-1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where pip installed the template (once for this file's tests); its sources and its tests, copied, beside it
    in ``src``."""
    root = tmp_path_factory.mktemp("example")
    src, site = root / "src", root / "site"
    shutil.copytree(DEMO, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    done = pip("install", "--no-deps", "--quiet", "--target", str(site), str(src))
    assert done.returncode == 0, done.stderr
    return site


@pytest.mark.slow
def test_the_templates_own_tests_pass_against_the_installed_package(site: Path) -> None:
    """The template's own tests (demo/loom-plugin-example/tests, what a plugin's author runs after installing it)
    are outside the suite's testpaths, as they need the package installed, which the suite's environment never has:
    they run here in a fresh pytest that has the package only where pip put it (its entry point included). Run
    from the copy's parent, so that ``loom_example`` is the installed one, not the source directory beside the
    tests. Outside the suite they had broken unnoticed once."""
    tests = site.parent / "src" / "tests"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_output=True,
        text=True,
        cwd=site.parent,
        timeout=HANG_S,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_example_plugin_installed_served_and_absent_without_it(site: Path, tmp_path: Path) -> None:
    model = tmp_path / "toy-model"
    installed = {"PYTHONPATH": str(site)}
    # A fresh interpreter imports the package from where pip put it, as a user of the template would.
    causal = tmp_path / "causal-toy"
    make = "import sys, loom_example; loom_example.make_toy_model(sys.argv[1], seed=7)"
    make += "; loom_example.make_toy_model(sys.argv[2], seed=8, causal=True)"
    made = subprocess.run(
        [sys.executable, "-c", make, model, causal],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=HANG_S,
        env={**os.environ, **installed},
    )
    assert made.returncode == 0, made.stderr
    (tmp_path / "on").mkdir()
    with loom_server([], tmp_path / "on", **installed) as (base, _, _):
        loaders = httpx.get(f"{base}/loaders", timeout=10).json()["loaders"]
        assert {"name": "example", "package": DIST, "version": "0.1.0"} in loaders
        plugins = {row["name"]: row for row in httpx.get(f"{base}/plugins", timeout=10).json()["plugins"]}
        assert plugins["example"]["pooling_strategies"] == ["first_last_mean"]

        report = httpx.get(f"{base}/loaders/probe/{model}", timeout=10).json()  # "//tmp/...": absolute path
        assert report["selected"] == "example"
        assert report["ranking"][0]["loader"] == "example" and report["ranking"][0]["score"] == 1.0
        assert all(r["score"] < 1.0 for r in report["ranking"][1:])

        ids = [BOS, *TEXT.encode("utf-8")]
        want = hand_states(model, ids)
        n = len(want) - 1
        body = {"model": str(model), "text": TEXT, "hidden_state_layers": "all", "positions": "all"}
        r = httpx.post(f"{base}/extract", json=body, timeout=HANG_S)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["metadata"]["loader"] == "example" and out["token_ids"] == ids
        assert out["tokens"][:3] == ["<bos>", "T", "o"]
        assert sorted(out["sequence_hidden_states"], key=int) == [str(k) for k in range(-n, 0)]
        for k in range(-n, 0):
            close(out["sequence_hidden_states"][str(k)]["data"], want[n + 1 + k])
            close(out["hidden_states"][str(k)]["data"], want[n + 1 + k][-1:])

        # Index 0 (the embedding output) and explicit positions, sliced by the kernel from the plugin's rows.
        body = {"model": str(model), "text": TEXT, "hidden_state_layers": [0, 2], "positions": [0, -1]}
        out = httpx.post(f"{base}/extract", json=body, timeout=HANG_S).json()
        for k in (0, 2):
            close(out["sequence_hidden_states"][str(k)]["data"], want[k][[0, -1]])

        r = httpx.post(f"{base}/embed", json={"model": str(model), "text": TEXT, "pooling": "first_last_mean"})
        assert r.status_code == 200, r.text
        assert r.json()["pooling"] == "first_last_mean"
        close(r.json()["embedding"], (want[n][0] + want[n][-1]) / 2)

        r = httpx.post(f"{base}/embed", json={"model": str(model), "text": TEXT, "pooling": "no_such_pooling"})
        assert r.status_code == 422 and "first_last_mean" in r.json()["allowed"]

        # The kernel's runner says when it cut a text to the context, and an id past the toy's byte vocabulary
        # (which neither its config nor its tokenizer states) is the client's 4xx naming the row, not a 500.
        r = httpx.post(f"{base}/embed", json={"model": str(model), "text": "x" * 300}, timeout=HANG_S)
        assert r.status_code == 200 and r.json()["truncated"] and r.json()["token_count"] == 256, r.text
        r = httpx.post(f"{base}/v1/embeddings", json={"model": str(model), "input": [[1, 2], [5, 300]]})
        assert r.status_code == 400 and r.json()["row"] == 1, r.text
        check_the_causal_toy(base, causal)

    (tmp_path / "off").mkdir()
    with loom_server([], tmp_path / "off") as (base, _, _):
        loaders = httpx.get(f"{base}/loaders", timeout=10).json()["loaders"]
        assert "example" not in [row["name"] for row in loaders]
        report = httpx.get(f"{base}/loaders/probe/{model}", timeout=10).json()
        assert "example" not in [row["loader"] for row in report["ranking"]]
        assert report["selected"] != "example"
        r = httpx.post(f"{base}/embed", json={"model": str(model), "text": TEXT, "pooling": "first_last_mean"})
        assert r.status_code == 422, r.text
