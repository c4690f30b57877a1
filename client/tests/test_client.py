"""The client against a real `loom serve` over TCP and a Unix socket: every wire format decodes to the same arrays,
and those arrays equal transformers' own output_hidden_states; streaming, batches, embeddings, errors, every
endpoint."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from loom_client import AsyncLoomClient, Forbidden, InvalidField, LoomClient, LoomConnectionError, LoomError, NotFound
from serverutil import loom_server, wait_for
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

TEXT = "Hidden states are the activations a transformer computes."
FORMATS = ["list", "base64", "safetensors"]


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One server on both transports, the tiny Llama and BERT preloaded: {"tcp": url, "unix": url, ...}."""
    home = tmp_path_factory.mktemp("client-home")
    with tempfile.TemporaryDirectory(prefix="loom-") as short:  # socket paths must stay under ~100 bytes
        sock = Path(short) / "loom.sock"
        llama, bert = str(tiny_models["llama"]), str(tiny_models["bert"])
        args = ["--transport", "both", "--unix-socket", str(sock), "--preload", llama, "--preload", bert]
        with loom_server(args, home) as (base, log, proc):
            wait_for(r"listening on unix:", log, proc)
            yield {"tcp": base, "unix": f"unix://{sock}", "llama": llama, "bert": bert}


@pytest.fixture(params=["tcp", "unix"])
def client(request: pytest.FixtureRequest, server: dict[str, str]) -> Iterator[LoomClient]:
    with LoomClient(server[request.param]) as c:
        yield c


@pytest.fixture(scope="module")
def reference(server: dict[str, str]) -> tuple:
    """transformers' own hidden states of TEXT under the tiny Llama (the tokenizer's ids, as the server uses)."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(server["llama"], dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(server["llama"])(TEXT)["input_ids"]
    with torch.inference_mode():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return model, ids, [s[0].numpy() for s in states]


def test_extract_every_format_decodes_to_transformers_states(client: LoomClient, server, reference) -> None:
    _, ids, states = reference
    layers = [0, 1, -1]
    results = {
        fmt: client.extract(server["llama"], TEXT, hidden_state_layers=layers, positions="all", hidden_state_format=fmt)
        for fmt in FORMATS
    }
    for fmt, r in results.items():
        assert r["token_ids"] == ids, fmt
        for k in layers:
            seq = r["sequence_hidden_states"][str(k)]
            assert isinstance(seq, np.ndarray) and seq.dtype == np.float32 and seq.shape == states[k].shape
            np.testing.assert_allclose(seq, states[k], rtol=0, atol=1e-5 * np.abs(states[k]).max())
            np.testing.assert_array_equal(r["hidden_states"][str(k)], seq[-1:])
        assert r["metadata"]["num_layers"] == len(states) - 1
    for k in layers:  # the formats carry the same float32 bits, not merely close ones
        base = results["base64"]["sequence_hidden_states"][str(k)]
        np.testing.assert_array_equal(results["list"]["sequence_hidden_states"][str(k)], base)
        np.testing.assert_array_equal(results["safetensors"]["sequence_hidden_states"][str(k)], base)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_wire_dtypes_decode_alike(client: LoomClient, server, reference, dtype: str) -> None:
    _, _, states = reference
    got = {
        fmt: client.extract(
            server["llama"],
            TEXT,
            hidden_state_layers=[-1],
            positions="all",
            hidden_state_format=fmt,
            hidden_state_dtype=dtype,
        )["sequence_hidden_states"]["-1"]
        for fmt in FORMATS
    }
    want = torch.from_numpy(states[-1]).to(getattr(torch, dtype)).float().numpy()  # torch's own rounding
    for fmt, arr in got.items():
        # numpy has no bfloat16: it arrives as the exactly equal float32
        assert arr.dtype == (np.float16 if dtype == "float16" else np.float32), fmt
        np.testing.assert_allclose(arr.astype(np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    np.testing.assert_array_equal(got["list"], got["base64"])
    np.testing.assert_array_equal(got["safetensors"], got["base64"])


def test_every_format_gives_arrays_like_the_list_formats(client: LoomClient, server) -> None:
    """numpy's own array from the JSON lists is the reference: the same dtype, native byte order, shape and
    contents, and writable like it, so that in-place arithmetic works whatever format carried the numbers."""
    got = {
        fmt: [
            client.extract(server["llama"], TEXT, hidden_state_layers=[0], positions="all", hidden_state_format=fmt)[
                "sequence_hidden_states"
            ]["0"],
            client.weights(server["llama"], ["W_U"], format=fmt)["weights"]["W_U"],
        ]
        for fmt in FORMATS
    }
    centred = [want - want.mean(0) for want in got["list"]]
    for fmt in FORMATS:
        for arr, want, ref in zip(got[fmt], got["list"], centred, strict=True):
            assert (arr.dtype, arr.dtype.isnative, arr.shape) == (want.dtype, True, want.shape), fmt
            assert arr.flags.writeable and arr.flags.c_contiguous, fmt
            arr -= arr.mean(0)  # in place, as a notebook centres states
            np.testing.assert_array_equal(arr, ref)


def test_generate_states_attention_and_logits_in_every_format(client: LoomClient, server) -> None:
    fields = {
        "max_tokens": 4,
        "return_hidden_states": True,
        "hidden_state_layers": [1, -1],
        "positions": "all",
        "return_attention": True,
        "return_logits": True,
    }
    results = {
        fmt: client.generate(server["llama"], "Hello world", hidden_state_format=fmt, **fields) for fmt in FORMATS
    }
    base = results["base64"]
    n = base["token_count"]  # the tiny model may stop at its EOS before max_tokens
    assert n >= 1 and base["logits"].shape[0] == n
    t = base["prompt_tokens"] + n
    assert base["sequence_hidden_states"]["-1"].shape == (t, 64)
    assert base["attentions"]["1"].shape[1:] == (t, t)
    for fmt in ("list", "safetensors"):
        r = results[fmt]
        assert r["text"] == base["text"] and r["token_ids"] == base["token_ids"], fmt
        np.testing.assert_array_equal(r["logits"], base["logits"])
        for group in ("hidden_states", "sequence_hidden_states", "attentions"):
            for key, arr in base[group].items():
                np.testing.assert_array_equal(r[group][key], arr, err_msg=f"{fmt} {group} {key}")


def test_stream_yields_tokens_with_their_states(client: LoomClient, server) -> None:
    whole = client.generate(
        server["llama"],
        "Once upon a time",
        max_tokens=5,
        return_hidden_states=True,
        hidden_state_layers=[0, -1],
        positions="generated",
    )
    events = list(
        client.stream(
            server["llama"],
            "Once upon a time",
            max_tokens=5,
            stream_hidden_states=True,
            hidden_state_layers=[0, -1],
            positions="generated",
            logprobs=True,
        )
    )
    tokens, done = events[:-1], events[-1]
    assert [e["event"] for e in tokens] == ["token"] * 5 and done["event"] == "done"
    assert [e["token_id"] for e in tokens] == whole["token_ids"]
    assert "".join(e["text"] for e in tokens) == whole["text"] == done["text"]
    for key in ("0", "-1"):
        rows = np.concatenate([e["hidden_states"][key] for e in tokens])
        np.testing.assert_allclose(rows, whole["sequence_hidden_states"][key], atol=1e-5)
        np.testing.assert_array_equal(done["sequence_hidden_states"][key], whole["sequence_hidden_states"][key])
    assert all(isinstance(e["logprob"]["logprob"], float) for e in tokens)


def test_async_client_over_both_transports(server, reference) -> None:
    _, ids, states = reference

    async def run(url: str) -> tuple:
        async with AsyncLoomClient(url) as c:
            r, health = await asyncio.gather(
                c.extract(server["llama"], TEXT, hidden_state_layers=[-1], positions="all"), c.health()
            )
            events = [e async for e in c.stream(server["llama"], "Hi", max_tokens=3, stream_hidden_states=True)]
            with pytest.raises(InvalidField):
                await c.extract(server["llama"], TEXT, hidden_state_layers=[99])
            return r, health, events

    for url in (server["tcp"], server["unix"]):
        r, health, events = asyncio.run(run(url))
        assert r["token_ids"] == ids and health["status"] == "ok"
        np.testing.assert_allclose(r["sequence_hidden_states"]["-1"], states[-1], atol=1e-5)
        assert [e["event"] for e in events] == ["token"] * 3 + ["done"]
        assert events[0]["hidden_states"]["-1"].shape == (1, 64)


def test_batch_results_and_per_prompt_errors(client: LoomClient, server) -> None:
    prompts = ["Hello world", "The meaning of life is"]
    r = client.generate_batch(
        server["llama"], prompts, max_tokens=3, return_hidden_states=True, hidden_state_format="safetensors"
    )  # safetensors is a whole-body format: a batch asks for base64 instead
    for i, prompt in enumerate(prompts):
        alone = client.generate(server["llama"], prompt, max_tokens=3, return_hidden_states=True)
        assert r["results"][i]["token_ids"] == alone["token_ids"]
        np.testing.assert_allclose(r["results"][i]["hidden_states"]["-1"], alone["hidden_states"]["-1"], atol=1e-5)


def test_embeddings_decode_alike(client: LoomClient, server) -> None:
    texts = ["first text", "a second, longer text"]
    one = client.embed(server["bert"], texts[0])["embedding"]
    batch = client.embed_batch(server["bert"], texts)["embeddings"]
    floats = client.embeddings(server["bert"], texts, encoding_format="float")["data"]
    b64 = client.embeddings(server["bert"], texts, encoding_format="base64")["data"]
    assert isinstance(one, np.ndarray) and batch.shape == (2, one.shape[0])
    np.testing.assert_allclose(batch[0], one, atol=1e-6)
    for i in range(2):
        np.testing.assert_array_equal(floats[i]["embedding"], b64[i]["embedding"])
        np.testing.assert_allclose(floats[i]["embedding"], batch[i], atol=1e-6)
    tokens = client.embed_batch(server["bert"], texts, pooling="none")
    assert [e.shape for e in tokens["embeddings"]] == [tuple(s) for s in tokens["shapes"]]


def test_errors_are_typed_with_problem_details(client: LoomClient, server) -> None:
    with pytest.raises(InvalidField) as bad:
        client.extract(server["llama"], TEXT, hidden_state_format="xml")
    assert bad.value.status == 422 and bad.value.field == "hidden_state_format"
    assert bad.value.allowed == ["list", "base64", "safetensors"] and bad.value.request_id
    with pytest.raises(NotFound) as missing:
        client.extract("/no/such/model", TEXT)
    assert missing.value.status == 404 and missing.value.problem["instance"] == "/extract"
    with pytest.raises(InvalidField):  # checked before the stream starts: raised when iteration begins
        list(client.stream(server["llama"], "Hi", max_tokens=-1))
    # A failure once OpenAI's stream has begun comes as a chunk holding only its error: raised, with its status.
    blow_up = [{"site": -1, "op": "add", "vector": [3e38] * 64, "scale": 10.0}]
    with pytest.raises(InvalidField) as mid:
        list(client.completions(server["llama"], "Hi", max_tokens=4, stream=True, interventions=blow_up))
    assert mid.value.status == 422 and mid.value.field == "interventions"
    assert client.health()["status"] == "ok"


def test_a_refusal_by_policy_is_forbidden(client: LoomClient, server) -> None:
    """docs/errors.md: policy refusals are 403 (here remote code on a server that does not trust it)."""
    with pytest.raises(Forbidden) as refused:
        client.load_model(server["llama"], trust_remote_code=True)
    assert refused.value.status == 403 and refused.value.field == "trust_remote_code"
    assert refused.value.problem["status"] == 403 and refused.value.request_id


def test_connection_errors_are_loom_errors(tmp_path: Path) -> None:
    with LoomClient(f"unix://{tmp_path}/nobody.sock") as c, pytest.raises(LoomConnectionError) as exc:
        c.health()
    assert isinstance(exc.value, LoomError) and exc.value.__cause__ is not None
    assert str(exc.value).startswith("Connection error: ") and "--transport both" in str(exc.value)
    with pytest.raises(ValueError, match="unix:///path"):
        LoomClient("localhost:8080")


def test_every_other_endpoint(client: LoomClient, server) -> None:
    llama = server["llama"]
    client.load_model(server["bert"])  # whichever test ran before (or none), both are loaded from here
    assert {m["model_id"] for m in client.models()["loaded_models"]} >= {llama, server["bert"]}
    assert "transformers" in {lo["name"] for lo in client.loaders()["loaders"]}
    assert client.probe(llama)["selected"] == "transformers"
    assert "transformers" in {p["name"] for p in client.plugins()["plugins"]}
    assert "loom_http_requests_total" in client.metrics()
    assert "/extract" in client.openapi()["paths"]
    assert llama in {m["id"] for m in client.openai_models()["data"]}
    assert client.openai_model(llama) == {"id": llama, "object": "model", "created": 0, "owned_by": "loom"}
    chat = client.chat_completions(llama, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    chunks = list(
        client.chat_completions(llama, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, stream=True)
    )
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == chat["choices"][0]["message"]["content"]
    with_state = client.chat_completions(
        llama, [{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, return_hidden_states=True
    )
    final = with_state["hidden_state"]["final"]  # the original project's field, an array like every tensor
    assert isinstance(final, np.ndarray) and final.shape == (with_state["hidden_state"]["shape"][-1],)
    np.testing.assert_allclose(final, with_state["hidden_states"]["-1"][0], atol=1e-6)
    done = client.completions(llama, "Hello", max_tokens=3, temperature=0, return_hidden_states=True)
    assert done["choices"][0]["text"] == client.generate(llama, "Hello", max_tokens=3)["text"]
    texts = ["one text", "another text here"]
    analysis = client.analyze(llama, texts, hidden_state_layers=[0, -1], rows="tokens")
    n = client.extract(llama, texts[0])["metadata"]["num_layers"]
    assert {k: v["layer_index"] for k, v in analysis["layers"].items()} == {"0": 0, "-1": n}
    rows = np.concatenate([client.extract(llama, t, positions="all")["sequence_hidden_states"]["-1"] for t in texts])
    p = np.linalg.svd(rows.astype(np.float64), compute_uv=False) ** 2
    p = p[p > 1e-10 * p.max()] / p.sum()  # the original README's D_eff, computed here from the client's arrays
    assert analysis["layers"]["-1"]["deff_entropy"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)
    loaded = client.load_model(server["bert"])
    assert loaded["status"] == "loaded" and loaded["model"]["model_id"] == server["bert"]
    assert client.unload_model(server["bert"])["model_id"] == server["bert"]
    assert server["bert"] not in {m["model_id"] for m in client.models()["loaded_models"]}
    client.load_model(server["bert"])  # back for the other tests


def test_a_method_for_every_endpoint(server) -> None:
    """Every operation in the server's own OpenAPI document has a client method that sends it."""
    import inspect

    from loom_client.endpoints import Call, Endpoints

    sent: set[tuple[str, str]] = set()

    class Recorder(Endpoints):
        def _call(self, call: Call) -> None:
            sent.add((call.method, call.path))

        _stream = _call

    recorder = Recorder()
    for name, method in inspect.getmembers(recorder, inspect.ismethod):
        if not name.startswith("_"):
            params = [p for p in inspect.signature(method).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
            method(*["org/model" if p.name == "model" else ["x"] if p.name.endswith("s") else "x" for p in params])
    with LoomClient(server["tcp"]) as c:
        spec = c.openapi()["paths"]
    for path, operations in spec.items():
        # /v1/generate is the same operation as /generate under the original project's path
        concrete = (
            {"/v1/generate": "/generate"}.get(path, path).replace("{model_id}", "org/model").replace("{name}", "x")
        )
        for verb in operations:
            sent_as = (
                concrete + "/sites" if (path, verb) == ("/models/{model_id}", "get") else concrete
            )  # only .../sites
            if verb in {"get", "post", "delete"} and not path.startswith("/schema"):
                assert (verb.upper(), sent_as) in sent, f"no client method for {verb.upper()} {path}"


def test_interventions_take_numpy_vectors_and_the_new_endpoints_decode(client: LoomClient, server) -> None:
    llama = server["llama"]
    sites = client.sites(llama)
    assert sites["sites"]["blocks.0.attn.hook_z"] == [4, 16]
    vector = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    edit = [{"site": "blocks.1.hook_resid_post", "op": "add", "vector": vector, "scale": 6.0}]
    as_list = [{**edit[0], "vector": vector.tolist()}]
    steered = client.generate(llama, "The cat", max_tokens=8, interventions=edit)
    assert steered["token_ids"] == client.generate(llama, "The cat", max_tokens=8, interventions=as_list)["token_ids"]
    scalar = [{**edit[0], "scale": np.float32(6.0)}]  # numpy scalars go as their Python values
    assert client.generate(llama, "The cat", max_tokens=8, interventions=scalar)["token_ids"] == steered["token_ids"]
    assert steered["token_ids"] != client.generate(llama, "The cat", max_tokens=8)["token_ids"]
    client.put_vector("client-test", vector, site="blocks.1.hook_resid_post", replace=True)
    stored = client.vector("client-test")
    np.testing.assert_array_equal(stored["vector"], vector)
    assert "client-test" in {v["name"] for v in client.vectors()["vectors"]}
    by_name = client.generate(llama, "The cat", max_tokens=8, interventions=[{**edit[0], "vector": "client-test"}])
    assert by_name["token_ids"] == steered["token_ids"]
    made = client.contrast(llama, 2, ["I love it"], ["I hate it"])
    assert isinstance(made["vector"], np.ndarray) and made["vector"].shape == (64,)
    patched = client.patch(llama, "The cat sat", "The cap sat", [1], {"type": "logprob", "token": "."}, positions=[-1])
    assert len(patched["patched"]) == 1 and len(patched["patched"][0]) == 1
    assert client.delete_vector("client-test")["name"] == "client-test"


def test_readouts_through_the_client(client: LoomClient, server) -> None:
    import safetensors.numpy

    llama = server["llama"]
    rng = np.random.default_rng(5)
    weight, bias = rng.standard_normal((2, 64)).astype(np.float32), np.zeros(2, dtype=np.float32)
    client.put_probe("client-probe", 2, weight=weight, bias=bias, labels=["x", "y"], activation="softmax", replace=True)
    r = client.extract(llama, "The cat sat", probes=["client-probe"], logit_lens={"layers": [-1], "top_k": 3})
    x = client.extract(llama, "The cat sat", hidden_state_layers=[2])["hidden_states"]["2"].astype(np.float64)
    z = x @ weight.T.astype(np.float64)
    want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(r["probe_scores"]["client-probe"]["data"], want, atol=1e-6)
    assert len(r["logit_lens"]["-1"]["top_k"][0]) == 3
    sae = {"W_enc": rng.standard_normal((64, 16)).astype(np.float32), "b_enc": np.zeros(16, np.float32)}
    sae["b_dec"] = np.zeros(64, np.float32)
    stored = client.upload_probe("client-sae", safetensors.numpy.save(sae), site=2, activation="relu", replace=True)
    assert stored["kind"] == "sae" and stored["shapes"]["W_enc"] == [64, 16]
    assert "client-sae" in {p["name"] for p in client.probes()["probes"]}
    assert client.probe_info("client-sae")["activation"] == "relu"
    fitted = client.fit_probe(
        "client-fit", llama, 2, ["a cat", "a dog", "one two", "three four"], ["pet", "pet", "num", "num"]
    )
    assert fitted["labels"] == ["num", "pet"] and 0 <= fitted["cv_accuracy"] <= 1
    for name in ("client-probe", "client-sae", "client-fit"):
        assert client.delete_probe(name)["name"] == name
