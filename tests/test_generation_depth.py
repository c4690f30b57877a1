"""Streamed per-token states, attention weights, log-probabilities and logits over HTTP, against transformers.

References: one ``output_hidden_states`` / ``output_attentions`` (eager) / logits pass of transformers' own model
over the final sequence the server reports.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

import pytest
import torch
from litestar.testing import AsyncTestClient
from safetensors.torch import load as load_safetensors
from test_generation_api import sse

from loom_kernel.api import create_app
from loom_kernel.config import Settings
from loom_kernel.encoding import SAFETENSORS_MEDIA_TYPE

PROMPT = "The quick brown fox jumps over"


@pytest.fixture
async def client():
    async with AsyncTestClient(app=create_app(settings=Settings(default_device="cpu"))) as c:
        yield c


@cache
def reference(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def forward(path: str, ids: list[int], **kw: Any) -> Any:
    net = reference(path)
    with torch.inference_mode():
        return net(input_ids=torch.tensor([ids]), **kw)


def eager_attentions(path: str, ids: list[int]) -> tuple[Any, ...]:
    net = reference(path)
    net.set_attn_implementation("eager")
    try:
        return forward(path, ids, output_attentions=True).attentions
    finally:
        net.set_attn_implementation("sdpa")


def tensor(entry: dict[str, Any]) -> Any:
    if entry.get("encoding") == "base64":
        return torch.frombuffer(bytearray(base64.b64decode(entry["data"])), dtype=torch.float32).view(entry["shape"])
    return torch.tensor(entry["data"], dtype=torch.float32)


def rel_err(got: Any, want: Any) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize(("layers", "fmt"), [([-1], "list"), ([0, 2, -1], "base64")])
async def test_streamed_token_states_are_rows_of_one_forward_pass(client, tiny_models, layers, fmt):
    path = str(tiny_models["llama"])
    body = {
        "model": path,
        "prompt": PROMPT,
        "max_tokens": 8,
        "stream_hidden_states": True,
        "hidden_state_layers": layers,
        "hidden_state_format": fmt,
    }
    r = await client.post("/generate/stream", json=body)
    events = sse(r.text)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    tokens = [json.loads(d) for e, d in events if e == "token"]
    done = json.loads(events[-1][1])
    assert [t["token_id"] for t in tokens] == done["token_ids"] and len(tokens) == done["token_count"]
    prompt_ids = reference_tokenizer(path)(PROMPT)["input_ids"]
    ref = forward(path, prompt_ids + done["token_ids"], output_hidden_states=True).hidden_states
    for i, event in enumerate(tokens):
        assert event["index"] == i and set(event["hidden_states"]) == {str(k) for k in layers}
        for k in layers:
            got = tensor(event["hidden_states"][str(k)])
            assert got.shape == (1, 64)
            assert rel_err(got, ref[k][0, len(prompt_ids) + i : len(prompt_ids) + i + 1]) < 1e-4
    # done carries the final state, the same as /generate's, and the same as the last token event's
    plain = await client.post("/generate", json={**body, "stream_hidden_states": False, "return_hidden_states": True})
    plain = plain.json()
    assert plain["token_ids"] == done["token_ids"]
    for k in layers:
        final = tensor(done["hidden_states"][str(k)])
        assert torch.equal(final, tensor(plain["hidden_states"][str(k)]))
        assert torch.equal(final, tensor(tokens[-1]["hidden_states"][str(k)]))


@cache
def reference_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def test_tokens_stream_without_states_unless_asked(client, tiny_models):
    r = await client.post("/generate/stream", json={"model": str(tiny_models["gpt2"]), "prompt": "Hi", "max_tokens": 3})
    tokens = [json.loads(d) for e, d in sse(r.text) if e == "token"]
    assert tokens and all(set(t) == {"index", "token_id", "text"} for t in tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "last", "generated"])
async def test_generate_attention_equals_eager_output_attentions(client, tiny_models, arch, positions):
    path = str(tiny_models[arch])
    body = {
        "model": path,
        "prompt": PROMPT,
        "max_tokens": 5,
        "return_attention": True,
        "hidden_state_layers": "all",
        "positions": positions,
    }
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert "hidden_states" not in got  # attention alone was asked for
    ids = reference_tokenizer(path)(PROMPT)["input_ids"] + got["token_ids"]
    total, prompt = len(ids), got["prompt_tokens"]
    rows = {"all": list(range(total)), "last": [total - 1], "generated": list(range(prompt, total))}[positions]
    if positions != "last":
        assert got["positions"] == rows
    ref = eager_attentions(path, ids)
    n = len(ref)  # block b produces hidden state b + 1, whose "all" key is b - n; state 0 has no attention
    assert set(got["attentions"]) == {str(b - n) for b in range(n)}
    for block in range(n):
        have = tensor(got["attentions"][str(block - n)])
        want = ref[block][0][:, rows]
        assert have.shape == want.shape == (4, len(rows), total)
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)


async def test_extract_attention_and_states_together(client, tiny_models):
    path = str(tiny_models["llama"])
    r = await client.post(
        "/extract",
        json={"model": path, "text": PROMPT, "return_attention": True, "hidden_state_layers": [1], "positions": "all"},
    )
    got = r.json()
    ids = got["token_ids"]
    ref = eager_attentions(path, ids)[0][0]
    torch.testing.assert_close(tensor(got["attentions"]["1"]), ref, rtol=1e-4, atol=1e-5)
    states = forward(path, ids, output_hidden_states=True).hidden_states[1][0]
    assert rel_err(tensor(got["sequence_hidden_states"]["1"]), states) < 1e-5


async def test_attention_refusals(client, tiny_models):
    path = str(tiny_models["llama"])
    # The 422 names what was asked for that has no attention (layer 0, hook points, both, nothing), and only that:
    # it said "layer 0 is the embedding output and hook points have no attention" to each.
    site = "blocks.0.hook_resid_post"
    for layers, says, not_said in [
        ([0], "layer 0 is the embedding output", ["hook point"]),
        ([site], "hook points have no attention", ["layer 0"]),
        ([0, site], "layer 0 is the embedding output and hook points have no attention", []),
        ([], "no layer is named", ["layer 0", "hook point"]),
    ]:
        body = {"model": path, "prompt": "Hi", "return_attention": True, "hidden_state_layers": layers}
        r = await client.post("/generate", json=body)
        assert r.status_code == 422 and r.json()["field"] == "hidden_state_layers", r.text
        detail = r.json()["detail"]
        assert says in detail and not any(text in detail for text in not_said), (layers, detail)
    r = await client.post("/extract", json={"model": "minilm", "text": "Hi", "return_attention": True})
    assert r.status_code == 422 and r.json()["field"] == "return_attention"
    assert (await client.post("/generate", json={"model": path, "prompt": "Hi", "max_tokens": 2})).status_code == 200


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
async def test_top_logprobs_equal_log_softmax_of_transformers_logits(client, tiny_models, arch):
    path = str(tiny_models[arch])
    body = {"model": path, "prompt": PROMPT, "max_tokens": 6, "top_logprobs": 4, "temperature": 0.9, "seed": 5}
    got = (await client.post("/generate", json=body)).json()
    tok = reference_tokenizer(path)
    prompt = tok(PROMPT)["input_ids"]
    logits = forward(path, prompt + got["token_ids"]).logits[0, len(prompt) - 1 : -1].float()
    want = torch.log_softmax(logits, dim=-1)
    assert len(got["logprobs"]) == got["token_count"] == 6
    for i, (entry, token) in enumerate(zip(got["logprobs"], got["token_ids"], strict=True)):
        assert entry["token_id"] == token and entry["token"] == tok.decode([token])
        assert abs(entry["logprob"] - float(want[i, token])) < 1e-4
        values, ids = torch.topk(want[i], 4)
        assert [t["token_id"] for t in entry["top_logprobs"]] == ids.tolist()
        assert max(abs(t["logprob"] - v) for t, v in zip(entry["top_logprobs"], values.tolist(), strict=True)) < 1e-4
    # the stream gives each token's entry in its event, the same as the response
    r = await client.post("/generate/stream", json=body)
    events = [json.loads(d) for e, d in sse(r.text) if e == "token"]
    assert [e["logprob"] for e in events] == got["logprobs"]


async def test_logits_in_json_and_safetensors(client, tiny_models):
    path = str(tiny_models["gpt2"])
    body = {"model": path, "prompt": PROMPT, "max_tokens": 4, "return_logits": True}
    got = (await client.post("/generate", json=body)).json()
    prompt = reference_tokenizer(path)(PROMPT)["input_ids"]
    want = forward(path, prompt + got["token_ids"]).logits[0, len(prompt) - 1 : -1]
    assert got["logits"]["shape"] == list(want.shape)
    torch.testing.assert_close(tensor(got["logits"]), want, rtol=1e-4, atol=1e-4)
    r = await client.post(
        "/generate",
        json={**body, "hidden_state_format": "safetensors", "return_attention": True, "return_hidden_states": True},
    )
    assert r.headers["content-type"].startswith(SAFETENSORS_MEDIA_TYPE)
    tensors = load_safetensors(r.content)
    assert set(tensors) == {"logits", "hidden_states.-1", "attentions.-1"}
    torch.testing.assert_close(tensors["logits"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs")],
)
async def test_bad_logprob_fields_are_422(client, tiny_models, extra, field):
    r = await client.post("/generate", json={"model": str(tiny_models["gpt2"]), "prompt": "Hi", **extra})
    assert r.status_code in (400, 422) and field in json.dumps(r.json())


async def test_batch_reports_a_bad_prompt_in_its_own_slot(client, tiny_models):
    path = str(tiny_models["gpt2"])  # context 512
    prompts = ["Hello world", "hello " * 600, "The quick brown fox"]
    common = {"model": path, "max_tokens": 4, "return_hidden_states": True}
    r = await client.post("/generate/batch", json={**common, "prompts": prompts})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    bad = results[1]["error"]
    assert bad["status"] == 422 and bad["field"] == "prompt" and "512" in bad["detail"] and bad["request_id"]
    for i in (0, 2):
        alone = (await client.post("/generate", json={**common, "prompt": prompts[i]})).json()
        assert results[i]["token_ids"] == alone["token_ids"]
        assert rel_err(tensor(results[i]["hidden_states"]["-1"]), tensor(alone["hidden_states"]["-1"])) < 1e-4
