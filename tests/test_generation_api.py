"""/generate/stream, /generate/batch and the OpenAI endpoints, against /generate and transformers."""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

import pytest
import torch
from litestar.testing import AsyncTestClient

from loom_kernel import hookimpl
from loom_kernel.api import create_app
from loom_kernel.config import Settings
from loom_kernel.plugins import create_plugin_manager


@pytest.fixture
async def client():
    async with AsyncTestClient(app=create_app(settings=Settings(default_device="cpu"))) as c:
        yield c


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event, data) pairs of an SSE body."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((event, "\n".join(data)))
    return out


async def test_stream_tokens_and_done_match_generate(client, tiny_models):
    body = {
        "model": str(tiny_models["llama"]),
        "prompt": "The quick brown fox",
        "max_tokens": 8,
        "return_hidden_states": True,
        "hidden_state_layers": [-1, 1],
    }
    plain = (await client.post("/generate", json=body)).json()
    r = await client.post("/generate/stream", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    tokens = [json.loads(d) for e, d in events if e == "token"]
    (done,) = [json.loads(d) for e, d in events if e == "done"]
    assert [t["token_id"] for t in tokens] == plain["token_ids"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == plain["text"] == done["text"]
    assert done["hidden_states"] == plain["hidden_states"]
    assert done["finish_reason"] == plain["finish_reason"] == "length"


async def test_a_stream_of_n_choices_numbers_each_choices_tokens_as_its_own(client, tiny_models):
    """With ``n`` > 1 the choices' token events interleave; each carries its ``choice`` and its ``index`` among that
    choice's tokens (what ``index`` is with one choice), so each choice's events rebuild its answer. Before, ``index``
    counted the events of every choice, and a client placing tokens by it put them in the wrong slots."""
    body = {
        "model": str(tiny_models["llama"]),
        "prompt": "The quick brown fox",
        "max_tokens": 6,
        "temperature": 0.9,
        "seed": 5,
        "n": 3,
        "logprobs": True,
    }
    plain = (await client.post("/generate", json=body)).json()
    r = await client.post("/generate/stream", json=body)
    tokens = [json.loads(d) for e, d in sse(r.text) if e == "token"]
    assert {t["choice"] for t in tokens} == {0, 1, 2}
    for want in plain["choices"]:
        mine = [t for t in tokens if t["choice"] == want["index"]]
        assert [t["index"] for t in mine] == list(range(len(want["token_ids"])))
        assert [t["token_id"] for t in mine] == want["token_ids"]
        assert "".join(t["text"] for t in mine) == want["text"]
        assert [t["logprob"] for t in mine] == want["logprobs"]


async def test_stream_refuses_bad_fields_before_streaming(client, tiny_models):
    path = str(tiny_models["llama"])
    for extra, field in (
        ({"hidden_state_layers": [42], "return_hidden_states": True}, "hidden_state_layers"),
        ({"hidden_state_format": "safetensors"}, "hidden_state_format"),
        ({"max_tokens": -3}, "max_tokens"),
    ):
        r = await client.post("/generate/stream", json={"model": path, "prompt": "x", **extra})
        assert r.status_code == 422 and r.json()["field"] == field


class FailsMidStream:
    """A loader whose running generation raises at its second decoding step, as an out-of-memory error would, once."""

    failed = False

    @hookimpl(hookwrapper=True)
    def load(self, model: Any, loader: str, options: Any) -> Any:
        outcome = yield
        loaded = outcome.get_result()
        if loaded is not None and loaded.decoder is not None:
            loaded.decoder = functools.partial(self.decoder, loaded.decoder)

    def decoder(self, make: Any, attention: bool) -> Any:
        real, owner = make(attention), self
        steps = 0

        class Failing:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def step(self, feed: dict[int, int]) -> Any:
                nonlocal steps
                steps += 1
                if not owner.failed and steps >= 2:
                    owner.failed = True
                    raise RuntimeError("CUDA out of memory (simulated)")
                return real.step(feed)

        return Failing()


async def test_a_failure_mid_stream_ends_with_an_error_event(tiny_models):
    pm = create_plugin_manager()
    pm.register(FailsMidStream(), name="fails")
    async with AsyncTestClient(app=create_app(pm=pm, settings=Settings(default_device="cpu"))) as c:
        path = str(tiny_models["gpt2"])
        r = await c.post("/generate/stream", json={"model": path, "prompt": "boom", "max_tokens": 5})
        events = sse(r.text)
        assert [e for e, _ in events] == ["token", "token", "error"]
        problem = json.loads(events[-1][1])
        assert problem["status"] == 500 and "out of memory" not in problem["detail"] and problem["request_id"]
        ok = await c.post("/generate", json={"model": path, "prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200  # the worker is free and the server keeps serving


async def test_batch_equals_one_by_one(client, tiny_models):
    """One left-padded batched generation gives each prompt the tokens and states it gets alone."""
    path = str(tiny_models["qwen2"])
    prompts = ["Hello", "The meaning of life is a question", "Numbers like 1, 2"]
    common = {
        "model": path,
        "max_tokens": 6,
        "return_hidden_states": True,
        "hidden_state_layers": [0, 1, -1],
        "positions": "all",
    }
    r = await client.post("/generate/batch", json={**common, "prompts": prompts})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert len({x["prompt_tokens"] for x in results}) == 3
    for prompt, got in zip(prompts, results, strict=True):
        alone = (await client.post("/generate", json={**common, "prompt": prompt})).json()
        assert got["token_ids"] == alone["token_ids"] and got["text"] == alone["text"]
        assert got["finish_reason"] == alone["finish_reason"] and got["positions"] == alone["positions"]
        for group in ("hidden_states", "sequence_hidden_states"):
            for key, state in alone[group].items():
                want, have = torch.tensor(state["data"]), torch.tensor(got[group][key]["data"])
                assert have.shape == want.shape
                assert float((have - want).abs().max() / want.abs().max()) < 1e-4
    r = await client.post("/generate/batch", json={**common, "prompts": []})
    assert r.status_code == 422 and r.json()["field"] == "prompts"


async def test_chat_template_applied_once(client, tiny_models):
    path = str(tiny_models["llama"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = await client.post(
        "/v1/chat/completions", json={"model": path, "messages": messages, "max_tokens": 5, "temperature": 0}
    )
    body = r.json()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tok.bos_token_id) == 1
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert "hidden_state" not in body


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"n": 17}, "n"),  # 1 to 16 choices
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"max_tokens": 600}, "max_tokens"),  # over the tiny model's 512-token context
    ],
)
async def test_chat_bad_input(client, tiny_models, extra, field):
    body = {"model": str(tiny_models["llama"]), "messages": [{"role": "user", "content": "hi"}], **extra}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text  # OpenAI's status for a bad parameter; 422 on The Loom's own routes
    assert r.json()["field"] == field
    assert r.json()["error"]["param"] == field and r.json()["error"]["message"].startswith(field)


async def test_chat_without_template_is_a_400(client, tiny_models):
    r = await client.post(
        "/v1/chat/completions",
        json={"model": str(tiny_models["gpt2"]), "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and r.json()["field"] == "messages"


def test_openai_client_against_a_real_server(tiny_models, tmp_path):
    """The official openai SDK, unchanged, over a real socket: chat and completions, streaming and not."""
    import openai
    from serverutil import loom_server

    path = str(tiny_models["llama"])
    with loom_server(["--preload", path], tmp_path) as (base, _, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model=path, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, seed=1
        )
        assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens > 0
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=path, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True
            )
            if c.choices
        ]
        assert "".join(pieces) == chat.choices[0].message.content
        with_states = client.chat.completions.create(
            model=path,
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=6,
            temperature=0,
            extra_body={"return_hidden_states": True},
        ).model_dump(warnings=False)  # the original project's metadata is numeric, OpenAI's strings
        hs = with_states["hidden_state"]
        assert hs["layer"] == -1 and hs["shape"] == [1, 64] and len(hs["final"]) == 64
        prompt = with_states["usage"]["prompt_tokens"]
        assert prompt == chat.usage.prompt_tokens and with_states["text"] == chat.choices[0].message.content
        completion = client.completions.create(model=path, prompt="The quick brown fox", max_tokens=5, temperature=0)
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=path, prompt="The quick brown fox", max_tokens=5, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == completion.choices[0].text and completion.usage.completion_tokens == 5
        assert path in [m.id for m in client.models.list().data]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydantic's serializer warns when a field is not of its declared type
            plain = chat.model_dump()
            hello = [{"role": "user", "content": "Hello"}]
            for chunk in client.chat.completions.create(model=path, messages=hello, max_tokens=4, stream=True):
                assert chunk.model_dump().get("metadata") is None
        assert plain.get("metadata") is None and "hidden_state" not in plain  # OpenAI's schema alone
        hello = [{"role": "user", "content": "x"}]
        with pytest.raises(openai.BadRequestError) as bad:  # a 422 elsewhere: OpenAI's status on /v1
            client.chat.completions.create(model=path, messages=hello, logprobs=True, top_logprobs=99)
        assert "top_logprobs" in bad.value.message and bad.value.param == "top_logprobs"
        assert bad.value.type == "invalid_request_error"
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="no-such-model", messages=hello)
        assert "no-such-model" in missing.value.message and missing.value.param == "model"


async def test_an_error_mid_stream_reaches_the_openai_sdk_with_its_message(tiny_models):
    import openai
    from test_models import app_with, concurrent_client

    pm = create_plugin_manager()
    pm.register(FailsMidStream(), name="fails")
    app = app_with(pm=pm)
    path = str(tiny_models["llama"])
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        client = openai.AsyncOpenAI(base_url="http://loom/v1", api_key="x", http_client=c)
        stream = await client.chat.completions.create(
            model=path, messages=[{"role": "user", "content": "Hello"}], max_tokens=20, temperature=0, stream=True
        )
        seen = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in stream:
                seen.append(chunk)
        assert "see the server log" in failed.value.message and failed.value.body["type"] == "server_error"
        assert len(seen) >= 3  # the role chunk and the tokens streamed before the failure


async def test_n_choices_are_rows_of_one_batch_each_equal_to_a_request_with_its_derived_seed(tiny_models):
    """``n`` = 3 with a seed through the official SDK: one batch of three rows; every choice is what a single
    request with seed + i gets, again on a second try; streamed, the chunks of each index make the same texts."""
    import openai
    from test_batching import Calls
    from test_models import app_with, concurrent_client

    pm = create_plugin_manager()
    calls = Calls()
    pm.register(calls, name="calls")
    app = app_with(pm=pm)
    path = str(tiny_models["llama"])
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        client = openai.AsyncOpenAI(base_url="http://loom/v1", api_key="x", http_client=c)
        ask: dict[str, Any] = {
            "model": path,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
            "temperature": 1.0,
            "seed": 11,
        }
        calls.seen.clear()
        three = await client.chat.completions.create(n=3, **ask)
        assert [(rows, generation) for rows, generation, _ in calls.seen] == [(3, True)]
        texts = [choice.message.content for choice in three.choices]
        assert [choice.index for choice in three.choices] == [0, 1, 2] and len(set(texts)) > 1
        alone = [await client.chat.completions.create(**{**ask, "seed": 11 + i}) for i in range(3)]
        assert texts == [a.choices[0].message.content for a in alone]
        assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
        assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens
        assert [
            choice.message.content for choice in (await client.chat.completions.create(n=3, **ask)).choices
        ] == texts
        streamed = ["", "", ""]
        async for chunk in await client.chat.completions.create(n=3, stream=True, **ask):
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
        assert streamed == texts
        prompt = {"model": path, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0.9, "seed": 5}
        two = await client.completions.create(n=2, **prompt)
        singles = [(await client.completions.create(**{**prompt, "seed": 5 + i})).choices[0].text for i in range(2)]
        assert [choice.text for choice in two.choices] == singles
        own = {"model": path, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0.9, "seed": 5}
        body = (await c.post("/generate", json={**own, "n": 2, "return_hidden_states": True})).json()
        for i, choice in enumerate(body["choices"]):
            single = (await c.post("/generate", json={**own, "seed": 5 + i, "return_hidden_states": True})).json()
            assert choice["index"] == i and choice["token_ids"] == single["token_ids"]
            assert choice["hidden_states"].keys() == single["hidden_states"].keys()
        assert body["token_ids"] == body["choices"][0]["token_ids"]


async def test_completions_take_the_models_own_token_ids(client, tiny_models):
    from transformers import AutoTokenizer

    path = str(tiny_models["llama"])
    ids = AutoTokenizer.from_pretrained(path)("The quick brown fox")["input_ids"]
    ask = {"model": path, "max_tokens": 5, "temperature": 0}
    by_text = (await client.post("/v1/completions", json={**ask, "prompt": "The quick brown fox"})).json()
    for prompt in (ids, [ids]):
        by_ids = (await client.post("/v1/completions", json={**ask, "prompt": prompt})).json()
        assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
        assert by_ids["usage"]["prompt_tokens"] == len(ids) == by_text["usage"]["prompt_tokens"]
    r = await client.post("/v1/completions", json={**ask, "prompt": [*ids[:3], 512]})  # the tiny vocabulary: 512
    assert r.status_code == 400 and r.json()["field"] == "prompt[3]" and "512" in r.json()["detail"], r.text
    two = (await client.post("/v1/completions", json={**ask, "prompt": [ids, ids[:3]]})).json()
    alone = (await client.post("/v1/completions", json={**ask, "prompt": ids[:3]})).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert [c["text"] for c in two["choices"]] == [by_text["choices"][0]["text"], alone["choices"][0]["text"]]
    assert two["usage"]["prompt_tokens"] == len(ids) + 3
