"""A real `loom serve` process: preload, and /health staying responsive while a long generation runs."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from loom_transformers.testing import build_tiny_model
from serverutil import loom_server, until, wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slow_llama(tiny_root: Path) -> Path:
    """Wide enough that 1500 greedy tokens take seconds on 2 CPU cores (and this seed never emits EOS)."""
    return build_tiny_model(
        "llama",
        tiny_root,
        name="slow-llama",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        max_position_embeddings=4096,
    )


@pytest.mark.slow
def test_health_answers_between_decoding_steps_while_a_long_generation_runs(slow_llama: Path, tmp_path: Path) -> None:
    """/health is measured in the generation's own decoding steps, not in seconds: each probe answers while the
    generation is in flight and before it has advanced a tenth of its 600 tokens. The generation is a stream that
    its client leaves once enough probes are measured, so the test does not wait for all 600."""
    model = slow_llama
    with loom_server(["--preload", str(model)], tmp_path) as (base, log, proc):
        wait_for(r"loaded .*slow-llama", log, proc, timeout=120)
        models = httpx.get(f"{base}/models", timeout=10).json()["loaded_models"]
        assert [m["state"] for m in models] == ["ready"]

        def row() -> dict:
            return httpx.get(f"{base}/models", timeout=60).json()["loaded_models"][0]

        enough = threading.Event()
        tokens: list[str] = []

        def generate() -> None:
            body = {"model": str(model), "prompt": "Hello", "max_tokens": 600, "return_hidden_states": True}
            with httpx.stream("POST", f"{base}/generate/stream", json=body, timeout=300) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        tokens.append(line)
                    if enough.is_set() or line == "event: done":
                        return

        worker = threading.Thread(target=generate)
        worker.start()
        spans = []  # decoding steps the generation took while one /health probe was answered
        while worker.is_alive() and len(spans) < 5:
            before = row()
            r = httpx.get(f"{base}/health", timeout=60)
            after = row()
            assert r.status_code == 200
            if before["in_flight"] and after["in_flight"] and after["decode_steps"] > before["decode_steps"]:
                spans.append(after["decode_steps"] - before["decode_steps"])
        enough.set()
        worker.join(timeout=300)
        assert "event: done" not in tokens, "the generation ended before five probes were measured"
        assert len(spans) == 5 and max(spans) < 60, spans
        until(lambda: row()["in_flight"] == 0, "the left stream's generation stopped")
    assert "Traceback" not in log.read_text()


def hf_cache_layout(cache: Path, repo_id: str, source: Path) -> None:
    """The Hugging Face hub cache's own layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


@pytest.mark.slow
def test_a_hub_id_in_the_local_cache_probes_loads_and_unloads(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    hf_cache_layout(cache, "tiny-org/tiny-gpt2", tiny_models["gpt2"])
    with loom_server([], tmp_path, HF_HUB_CACHE=str(cache)) as (base, _, _):
        probe = httpx.get(f"{base}/loaders/probe/tiny-org/tiny-gpt2", timeout=30).json()
        assert probe["source"] == "hf-cache" and probe["selected"] == "transformers", probe
        r = httpx.post(f"{base}/extract", json={"model": "tiny-org/tiny-gpt2", "text": "from the cache"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["metadata"]["num_layers"] == 3
        assert httpx.delete(f"{base}/models/tiny-org/tiny-gpt2", timeout=30).status_code == 200
        missing = httpx.get(f"{base}/loaders/probe/tiny-org/not-there", timeout=30)
        assert missing.status_code == 404 and missing.json()["field"] == "model"


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_the_worker(slow_llama: Path, tmp_path: Path) -> None:
    model = slow_llama
    with loom_server(["--preload", str(model)], tmp_path) as (base, log, proc):
        wait_for(r"loaded .*slow-llama", log, proc, timeout=120)
        body = {"model": str(model), "prompt": "Hello", "max_tokens": 3000}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{base}/generate/stream", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: token"
        # The connection is closed after the first token. The worker must come free with the generation stopped,
        # not finished: by the model's own count of decoding steps, far fewer than the 3000 it asked for.
        rows = until(
            lambda: (r := httpx.get(f"{base}/models", timeout=10).json()["loaded_models"])[0]["in_flight"] == 0 and r,
            "the worker came free",
            every=0.05,
        )
        assert rows[0]["decode_steps"] < 1000, rows[0]
        r = httpx.post(f"{base}/generate", json={**body, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["token_count"] == 3


def test_two_models_loading_at_once_on_a_fresh_server(tiny_models, tmp_path):
    """A fresh process imports the model libraries on its first loads: two models loading at once (a preload and a
    request for another model) must not race inside transformers' lazy imports ("module 'transformers' has no
    attribute 'AutoConfig'")."""
    import concurrent.futures

    import httpx
    from serverutil import loom_server

    with loom_server(["--preload", "minilm"], tmp_path) as (base, log, _):
        bodies = [
            ("/generate", {"model": str(tiny_models["gpt2"]), "prompt": "Hello", "max_tokens": 2}),
            ("/extract", {"model": str(tiny_models["llama"]), "text": "Hello"}),
            ("/embed", {"model": "minilm", "text": "Hello"}),
        ]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda pb: httpx.post(f"{base}{pb[0]}", json=pb[1], timeout=120), bodies))
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        assert "has no attribute" not in log.read_text()
