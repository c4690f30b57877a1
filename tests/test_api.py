"""The REST API against transformers' own output_hidden_states and generate, on tiny offline models."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from litestar.testing import AsyncTestClient
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from loom_kernel.api import create_app
from loom_kernel.config import Settings

CAUSAL = ["llama", "mistral", "qwen2", "gpt2"]
TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
async def client():
    app = create_app(settings=Settings(default_device="cpu", max_models=8))
    async with AsyncTestClient(app=app) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """transformers' own model and tokenizer per directory, loaded once."""
    cache: dict[str, tuple] = {}

    def get(path):
        key = str(path)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
            cache[key] = (model, AutoTokenizer.from_pretrained(key))
        return cache[key]

    return get


def decode(entry: dict) -> np.ndarray:
    if entry.get("encoding") == "base64":
        arr = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4")
    else:
        arr = np.asarray(entry["data"], dtype=np.float32)
    return arr.reshape(entry["shape"])


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    w = want.float().numpy()
    return float(np.abs(got - w).max() / max(np.abs(w).max(), 1e-12))


def hf_states(model, ids: list[int]) -> tuple:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("fmt", ["list", "base64"])
async def test_extract_equals_output_hidden_states(client, tiny_models, reference, arch, fmt):
    model, tok = reference(tiny_models[arch])
    n = model.config.num_hidden_layers
    layers = [0, 1, -1, -2, n]
    r = await client.post(
        "/extract",
        json={
            "model": str(tiny_models[arch]),
            "text": TEXT,
            "hidden_state_layers": layers,
            "return_full_sequence": True,
            "hidden_state_format": fmt,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == tok(TEXT)["input_ids"]
    ref = hf_states(model, body["token_ids"])
    for k in layers:
        key = str(k)
        seq = decode(body["sequence_hidden_states"][key])
        assert seq.shape == (len(body["token_ids"]), model.config.hidden_size)
        assert rel_err(seq, ref[k][0]) < 1e-5, key
        last = decode(body["hidden_states"][key])
        assert last.shape == (1, model.config.hidden_size)
        assert rel_err(last, ref[k][0, -1:]) < 1e-5
    assert body["layer_indices"] == {str(k): (k if k >= 0 else n + 1 + k) for k in layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_extract_all_layers_and_safetensors(client, tiny_models, reference, arch):
    model, _ = reference(tiny_models[arch])
    n = model.config.num_hidden_layers
    r = await client.post(
        "/extract",
        json={
            "model": str(tiny_models[arch]),
            "text": TEXT,
            "hidden_state_layers": "all",
            "positions": "all",
            "hidden_state_format": "safetensors",
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/vnd.loom.safetensors")
    tensors = load_safetensors(r.content)
    size = int.from_bytes(r.content[:8], "little")
    meta = json.loads(json.loads(r.content[8 : 8 + size])["__metadata__"]["loom"])
    assert sorted(meta["sequence_hidden_states"], key=int) == [str(k) for k in range(-n, 0)]
    ref = hf_states(model, meta["token_ids"])
    for k in range(-n, 0):
        assert rel_err(tensors[f"sequence_hidden_states.{k}"].numpy(), ref[k][0]) < 1e-5
        assert rel_err(tensors[f"hidden_states.{k}"].numpy(), ref[k][0, -1:]) < 1e-5


async def test_extract_answers_in_the_order_asked_with_text_pieces(client, tiny_models, reference):
    """Keys in the order asked (layer order for "all"); tokens as text pieces (" fox", not "Ġfox"), ids beside."""
    path = str(tiny_models["gpt2"])
    _, tok = reference(tiny_models["gpt2"])
    for layers, keys in (([-2, -4, -3, -1], ["-2", "-4", "-3", "-1"]), ("all", ["-3", "-2", "-1"])):
        r = await client.post("/extract", json={"model": path, "text": TEXT, "hidden_state_layers": layers})
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body["hidden_states"]) == keys and list(body["layer_indices"]) == keys
    ids = tok(TEXT)["input_ids"]
    assert body["token_ids"] == ids and body["tokens"] == [tok.decode([i]) for i in ids]
    assert body["tokens"][1] == " quick" and not any("Ġ" in t for t in body["tokens"])


@pytest.mark.parametrize("arch", CAUSAL)
async def test_greedy_generate_equals_transformers(client, tiny_models, reference, arch):
    model, tok = reference(tiny_models[arch])
    ids = tok(TEXT, return_tensors="pt")
    with torch.inference_mode():
        want = model.generate(**ids, do_sample=False, max_new_tokens=12)[0, ids["input_ids"].shape[1] :].tolist()
    r = await client.post(
        "/generate",
        json={
            "model": str(tiny_models[arch]),
            "prompt": TEXT,
            "max_tokens": 12,
            "temperature": 0,
            "return_hidden_states": True,
            "hidden_state_layers": [-1, 1],
            "return_full_sequence": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_ids"] == want
    assert body["token_count"] == len(want)
    assert body["text"] == tok.decode(want, skip_special_tokens=True)
    # Every row, prompt and generated, equals one forward pass over the final sequence.
    final = ids["input_ids"][0].tolist() + want
    ref = hf_states(model, final)
    for key, idx in (("-1", -1), ("1", 1)):
        seq = decode(body["sequence_hidden_states"][key])
        assert seq.shape[0] == len(final)
        assert rel_err(seq, ref[idx][0]) < 1e-4
        assert rel_err(decode(body["hidden_states"][key]), ref[idx][0, -1:]) < 1e-4
    assert body["positions"] == list(range(len(final)))


async def test_generate_last_state_and_generated_positions(client, tiny_models, reference):
    model, tok = reference(tiny_models["qwen2"])
    path = str(tiny_models["qwen2"])
    r = await client.post(
        "/generate", json={"model": path, "prompt": TEXT, "max_tokens": 5, "return_hidden_states": True}
    )
    body = r.json()
    assert "sequence_hidden_states" not in body and list(body["hidden_states"]) == ["-1"]
    final = tok(TEXT)["input_ids"] + body["token_ids"]
    ref = hf_states(model, final)
    assert rel_err(decode(body["hidden_states"]["-1"]), ref[-1][0, -1:]) < 1e-4
    r = await client.post(
        "/generate",
        json={
            "model": path,
            "prompt": TEXT,
            "max_tokens": 5,
            "positions": "generated",
            "hidden_state_format": "base64",
        },
    )
    body = r.json()
    prompt_len = len(tok(TEXT)["input_ids"])
    assert body["positions"] == list(range(prompt_len, prompt_len + 5))
    assert rel_err(decode(body["sequence_hidden_states"]["-1"]), ref[-1][0, prompt_len:]) < 1e-4


async def test_a_generation_that_names_no_max_tokens_runs_to_the_end_of_a_short_context(client, tiny_models, tmp_path):
    """Unnamed, max_tokens is 256 or what the context holds; named past the context, it is a 422."""
    import shutil

    short = tmp_path / "short"
    shutil.copytree(tiny_models["llama"], short)  # rotary positions: a shorter context is the same weights
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 24}))
    body = {"model": str(short), "prompt": TEXT, "temperature": 1.0, "seed": 3}
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["prompt_tokens"] + r.json()["token_count"] == 24 and r.json()["finish_reason"] == "length"
    r = await client.post("/generate", json={**body, "max_tokens": 30})
    assert r.status_code == 422 and r.json()["field"] == "max_tokens"


async def test_seeded_sampling_repeats(client, tiny_models):
    body = {"model": str(tiny_models["llama"]), "prompt": "Hello", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    a = (await client.post("/generate", json=body)).json()
    b = (await client.post("/generate", json=body)).json()
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) > 0


async def test_probe_ranking_and_loader_override(client, tiny_models):
    path = str(tiny_models["llama"])
    r = await client.get(f"/loaders/probe/{path}")  # an absolute path: its slash doubled after the prefix
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["selected"] == "transformers"
    assert body["ranking"][0] == {
        "loader": "transformers",
        "score": 0.5,
        "reason": body["ranking"][0]["reason"],
        "selected": True,
    }
    assert (await client.get(f"/loaders/probe/{path}")).json() == body
    loaders = (await client.get("/loaders")).json()["loaders"]
    assert "transformers" in [row["name"] for row in loaders]
    r = await client.post("/extract", json={"model": path, "text": "hi", "loader": "transformers"})
    assert r.status_code == 200 and r.json()["metadata"]["loader"] == "transformers"
    r = await client.post("/extract", json={"model": path, "text": "hi", "loader": "nope"})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["field"] == "loader" and "transformers" in r.json()["allowed"]


async def test_models_load_list_unload_with_slashed_ids(client, tiny_models):
    path = str(tiny_models["gpt2"])
    r = await client.post("/models/load", json={"model": path})
    assert r.status_code == 200, r.text
    listed = (await client.get("/models")).json()
    row = next(m for m in listed["loaded_models"] if m["model_id"] == path)
    assert row["state"] == "ready" and row["idle_seconds"] >= 0 and row["auto_unload_in"] <= 20 * 60
    assert listed["max_models"] == 8 and listed["auto_unload_minutes"] == 20
    assert path in (await client.get("/health")).json()["loaded_models"]
    r = await client.delete(f"/models/{path}")
    assert r.status_code == 200, r.text
    assert r.json()["model_id"] == path
    r = await client.delete(f"/models/{path}")
    assert r.status_code == 404 and r.json()["field"] == "model_id"
    r = await client.delete("/models/org/name")
    assert r.status_code == 404 and "'org/name'" in r.json()["detail"]


BAD = [
    ({"model": "no/such-model", "prompt": "hi"}, 404, "model"),
    ({"prompt": "hi"}, 422, "model"),
    ({"model": "M", "prompt": ""}, 422, "prompt"),
    ({"model": "M", "prompt": "hi", "max_tokens": -1}, 422, "max_tokens"),
    ({"model": "M", "prompt": "hi", "max_tokens": "ten"}, 422, "max_tokens"),
    ({"model": "M", "prompt": "hi", "max_tokens": 10**6}, 422, "max_tokens"),
    ({"model": "M", "prompt": 5}, 422, "prompt"),
    (
        {"model": "M", "prompt": "hi", "hidden_state_layers": [99], "return_hidden_states": True},
        422,
        "hidden_state_layers",
    ),
    (
        {"model": "M", "prompt": "hi", "hidden_state_layers": "most", "return_hidden_states": True},
        422,
        "hidden_state_layers",
    ),
    ({"model": "M", "prompt": "hi", "hidden_state_format": "numpy"}, 422, "hidden_state_format"),
    ({"model": "M", "prompt": "hi", "hidden_state_dtype": "int8"}, 422, "hidden_state_dtype"),
    ({"model": "M", "prompt": "hi", "positions": "first"}, 422, "positions"),
    ({"model": "M", "prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"model": "M", "prompt": "hi", "dtype": "float8"}, 422, "dtype"),
    ({"model": "M", "prompt": "hi", "device": "cuda:0"}, 422, "device"),
    ({"model": "M", "prompt": "hi", "max_token": 5}, 422, "max_token"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD)
async def test_bad_input_is_a_named_4xx_and_the_server_keeps_serving(client, tiny_models, body, status, field):
    if body.get("model") == "M":
        body = {**body, "model": str(tiny_models["gpt2"])}
    if body.get("device") == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = await client.post("/generate", json=body)
    assert r.status_code == status, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert problem["field"] == field and problem["status"] == status and problem["detail"]
    assert r.headers["x-request-id"] == problem["request_id"]
    ok = await client.post("/extract", json={"model": str(tiny_models["gpt2"]), "text": "still serving"})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "hint"),
    [
        ("/extract", {"text": "hi", "layers": [1]}, "did you mean `hidden_state_layers`?"),
        ("/generate", {"prompt": "hi", "max_token": 5}, "did you mean `max_tokens`?"),
        ("/extract", {"text": "hi", "logit_lens": {"topk": 3}}, "did you mean `top_k`?"),
        ("/extract", {"text": "hi", "interventions": [{"op": "zero", "sitee": 1}]}, "did you mean `site`?"),
    ],
)
async def test_an_unknown_field_near_a_known_one_gets_a_hint(client, path, body, hint):
    r = await client.post(path, json={"model": "M", **body})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].endswith(hint), r.json()
    required = {k: v for k, v in body.items() if k in ("text", "prompt")}
    far = await client.post(path, json={"model": "M", **required, "zzzzzz": 1})
    assert far.status_code == 422 and "zzzzzz" in far.json()["detail"] and "did you mean" not in far.json()["detail"]


async def test_malformed_json_and_unknown_route(client):
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = await client.post("/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert (await client.get("/nowhere")).status_code == 404
    assert (await client.get("/health")).json()["status"] == "ok"


async def test_encoder_cannot_generate_but_extracts(client, tiny_models):
    r = await client.post("/generate", json={"model": str(tiny_models["bert"]), "prompt": "hi"})
    assert r.status_code == 422 and r.json()["field"] == "model"
    r = await client.post(
        "/extract", json={"model": str(tiny_models["bert"]), "text": "hi", "hidden_state_layers": [0, -1]}
    )
    assert r.status_code == 200 and r.json()["tokens"][0] == "[CLS]"


async def test_openapi_schema(client):
    r = await client.get("/schema/openapi.json")
    paths = r.json()["paths"]
    for path in ("/generate", "/v1/generate", "/extract", "/health", "/models", "/models/load", "/loaders", "/plugins"):
        assert path in paths


async def test_openapi_documents_what_the_server_sends(client):
    """Found by schemathesis: the stream was documented as JSON, a malformed body's 400 as Litestar's
    ``{status_code, detail}`` JSON; the server sends SSE and an RFC 9457 problem."""
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    assert list(paths["/generate/stream"]["post"]["responses"]["200"]["content"]) == ["text/event-stream"]
    for path in ("/generate", "/extract", "/embed", "/models/load", "/v1/chat/completions"):
        content = paths[path]["post"]["responses"]["400"]["content"]
        assert list(content) == ["application/problem+json"], path
    r = await client.post("/models/load", content=b"\x00", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["field"] == "body"


async def test_allowed_paths_forbid_other_directories(tiny_models, tmp_path):
    app = create_app(settings=Settings(default_device="cpu", allowed_paths=[str(tmp_path)]))
    async with AsyncTestClient(app=app) as c:
        r = await c.post("/extract", json={"model": str(tiny_models["gpt2"]), "text": "hi"})
        assert r.status_code == 403 and r.json()["field"] == "model"
        assert r.json()["allowed"] == [str(tmp_path)]
        assert (await c.get("/health")).status_code == 200


@pytest.mark.slow
async def test_the_same_model_through_two_loaders_gives_the_same_states(client):
    """MiniLM through sentence-transformers (its default) and through transformers: one BertModel underneath."""
    body = {"model": "minilm", "text": "Two loaders, one model.", "hidden_state_layers": "all", "positions": "all"}
    by_st = (await client.post("/extract", json={**body, "loader": "sentence_transformers"})).json()
    by_tf = (await client.post("/extract", json={**body, "loader": "transformers"})).json()
    assert by_st["metadata"]["loader"] == "sentence_transformers" and by_tf["metadata"]["loader"] == "transformers"
    assert by_st["token_ids"] == by_tf["token_ids"] and set(by_st["sequence_hidden_states"]) == set(
        by_tf["sequence_hidden_states"]
    )
    for key, state in by_st["sequence_hidden_states"].items():
        a, b = torch.tensor(state["data"]), torch.tensor(by_tf["sequence_hidden_states"][key]["data"])
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-4, key


def test_handlers_resolve_their_dependencies_one_after_another():
    """Litestar resolves a handler's independent dependencies concurrently, one anyio task each: for /embed (manager
    and pm) that was about 3% of the event loop's time under load. The plugin manager and settings are provided
    from the model manager, so every handler's dependencies come in batches of one, awaited inline."""
    from litestar.routes import HTTPRoute

    app = create_app(settings=Settings(default_device="cpu"))
    seen = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for method, (_, kwargs_model) in route.route_handler_map.items():
            batches = kwargs_model.dependency_batches
            assert all(len(batch) == 1 for batch in batches), (route.path, method, batches)
            seen += bool(batches)
    assert seen >= 10  # the check saw the handlers that take manager, pm or settings


async def test_a_404_and_a_405_from_the_router_carry_their_request_id(client):
    for method, path, status in [("GET", "/no/such/path", 404), ("GET", "/generate", 405)]:
        r = await client.request(method, path)
        assert r.status_code == status, r.text
        assert r.json()["request_id"] and r.headers["x-request-id"] == r.json()["request_id"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ("/generate", {"prompt": "hi", "add_special_tokens": "no"}, "add_special_tokens"),
        ("/generate", {"prompt": "hi", "return_hidden_states": "true"}, "return_hidden_states"),
        ("/extract", {"text": "hi", "hidden_state_layers": ["1"]}, "hidden_state_layers"),
        ("/embed", {"text": "hi", "layer": "3"}, "layer"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ],
)
async def test_numbers_and_flags_sent_as_strings_are_refused_naming_the_field(client, tiny_models, path, body, field):
    """Strict everywhere, as the README promises: no field takes "5" for 5 or "true" for true."""
    r = await client.post(path, json={"model": str(tiny_models["llama"]), **body})
    assert r.status_code == (400 if path.startswith("/v1/") else 422), r.text
    assert r.json()["field"].startswith(field) and "str" in r.json()["detail"], r.text
