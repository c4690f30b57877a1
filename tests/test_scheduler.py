"""Continuous batching: requests join a running generation at step boundaries and leave it when done; forward
passes run between decoding steps. Orderings are staged with the model's own passes (a pre-hook that holds a
chosen pass until the test has seen what it waits for), never with sleeps or clocks."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from serverutil import until
from test_batching import Gate, assert_same, eventually, serving

from loom_kernel import Batch, Capture, LoadedModel, hookimpl

LONG = {"prompt": "one two three four five six seven", "max_tokens": 200, "temperature": 0}


class Passes:
    """Counts the generating model's decoding steps (passes of one new token a row; a prefill is not one) on its
    thread; before step ``n`` it runs what ``at(n, ...)`` set. Holding a step, never a prefill, means no request is
    half-joined while the test waits."""

    def __init__(self, net: Any) -> None:
        self.count = 0
        self.before: dict[int, Callable[[], None]] = {}
        self.handle = net.register_forward_pre_hook(self._hook, with_kwargs=True)

    def at(self, n: int, wait: Callable[[], Any]) -> None:
        self.before[n] = wait

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[1] != 1:
            return
        self.count += 1
        if (wait := self.before.pop(self.count, None)) is not None:
            wait()

    def close(self) -> None:
        self.handle.remove()


def arrived(entry: Any, n: int) -> Callable[[], bool]:
    """Whether ``n`` requests have reached the model's scheduler: run (joined, or passed through) or waiting."""
    return lambda: entry.worker.counters.batched_requests + entry.worker.queued >= n


async def start_long(
    c: Any, model: str, entry: Any, passes: Passes, *, wait_at: int, joining: int, hold_at: int
) -> tuple[asyncio.Future, threading.Event]:
    """Start the long generation and return once it decodes: its step ``wait_at`` waits until ``joining`` more
    requests have reached the scheduler, its step ``hold_at`` until the returned event is set."""
    release = threading.Event()
    start, sent = passes.count, entry.worker.counters.batched_requests
    passes.at(start + wait_at, lambda: until(arrived(entry, sent + 1 + joining)))
    passes.at(start + hold_at, lambda: release.wait(120))
    long_task = asyncio.ensure_future(c.post("/generate", json={"model": model, **LONG}))
    await eventually(lambda: passes.count >= start + 1)
    return long_task, release


async def answered(task: asyncio.Future, release: threading.Event) -> Any:
    """``task``'s answer; a held pass is released either way, so that a failure does not hang the model."""
    try:
        return await asyncio.wait_for(task, 120)
    finally:
        release.set()


async def post(c: Any, path: str, model: str, body: dict[str, Any]) -> Any:
    r = await c.post(path, json={"model": model, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
async def running(tiny_models):
    async with serving(tiny_models) as (app, c, model, _):
        entry = app.state.manager.find(model)
        passes = Passes(entry.loaded.model)
        try:
            yield c, model, entry, passes
        finally:
            passes.close()


async def test_a_short_request_joins_a_long_generation_and_finishes_first(running):
    c, model, entry, passes = running
    short = {"prompt": "the cat sat", "max_tokens": 8, "temperature": 0, "hidden_state_layers": "all"}
    short = {**short, "positions": "all", "return_hidden_states": True}
    long_alone = await post(c, "/generate", model, LONG)
    short_alone = await post(c, "/generate", model, short)
    assert long_alone["finish_reason"] == "length" and long_alone["token_count"] == 200
    before = entry.worker.counters.joined_running
    # The long generation holds at its 100th step until the short request is answered.
    long_task, release = await start_long(c, model, entry, passes, wait_at=5, joining=1, hold_at=100)
    short_task = asyncio.ensure_future(c.post("/generate", json={"model": model, **short}))
    got = (await answered(short_task, release)).json()
    assert not long_task.done()  # answered while the long generation still runs (held at its 100th pass)
    assert_same(got, short_alone)
    assert entry.worker.counters.joined_running == before + 1
    long = (await long_task).json()
    assert long["token_ids"] == long_alone["token_ids"]  # the company changed nothing

    # The joined row's states equal one transformers forward pass over its final sequence.
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model).eval()
    sequence = [*entry.loaded.tokenizer(short["prompt"])["input_ids"], *got["token_ids"]]
    assert got["positions"] == list(range(len(sequence)))
    with torch.inference_mode():
        ref = net(input_ids=torch.tensor([sequence]), output_hidden_states=True).hidden_states
    n = len(ref) - 1
    for key, entry_ in got["sequence_hidden_states"].items():
        state = np.asarray(entry_["data"], dtype=np.float32)
        np.testing.assert_allclose(state, ref[int(key) + n + 1][0].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("leaves", ["max_tokens", "stop string", "disconnect"])
async def test_a_row_that_leaves_frees_its_place_for_a_waiting_request(tiny_models, leaves):
    async with serving(tiny_models, max_batch_size=2) as (app, c, model, calls):
        entry = app.state.manager.find(model)
        passes = Passes(entry.loaded.model)
        try:
            brief = {"prompt": "a b", "max_tokens": 3, "temperature": 0}
            if leaves != "max_tokens":
                brief["max_tokens"] = 150  # leaves long before that: at its stop string, or when its client does
            waiting = {"prompt": "the cat sat on", "max_tokens": 6, "temperature": 0.8, "seed": 5}
            alone = [await post(c, "/generate", model, body) for body in (LONG, brief, waiting)]
            if leaves == "stop string":  # a piece of what it generates alone, first seen past its sixth token
                text, ids = alone[1]["text"], alone[1]["token_ids"]
                at = len(entry.loaded.tokenizer.decode(ids[:6], skip_special_tokens=True))
                brief["stop"] = [
                    next(text[i : i + 3] for i in range(at, len(text) - 3) if text.find(text[i : i + 3]) >= at)
                ]
                alone[1] = await post(c, "/generate", model, brief)
                assert alone[1]["finish_reason"] == "stop" and alone[1]["token_count"] > 6
            calls.seen.clear()
            release = threading.Event()
            start = passes.count
            # The long and the brief rows fill the batch; the third request must wait for the brief one to leave.
            passes.at(start + 2, lambda: until(lambda: entry.worker.queued >= 1))
            passes.at(start + 140, lambda: release.wait(120))
            gate = Gate(app, model)  # the two arrive together and join as one batch
            first = [asyncio.ensure_future(c.post("/generate", json={"model": model, **b})) for b in (LONG, brief)]
            await gate.open_when_queued(2)
            await eventually(lambda: entry.worker.running_rows >= 2)
            third = asyncio.ensure_future(c.post("/generate", json={"model": model, **waiting}))
            if leaves == "disconnect":
                await eventually(lambda: entry.worker.queued >= 1)
                first[1].cancel()  # the brief request's client goes away
            got = (await answered(third, release)).json()
            assert not first[0].done()
            assert_same(got, alone[2])
            assert_same((await first[0]).json(), alone[0])
            if leaves != "disconnect":
                assert_same((await first[1]).json(), alone[1])
            assert [rows for rows, gen, _ in calls.seen if gen] == [2, 1]  # the third joined on its own, later
            assert (await c.get("/models")).json()["loaded_models"][0]["joined_running"] >= 1
        finally:
            passes.close()


async def test_mixed_parameters_join_at_different_steps_and_each_equals_alone(running):
    c, model, entry, passes = running
    late = [
        {"prompt": "hello there", "max_tokens": 6, "temperature": 0.9, "seed": 7, "top_logprobs": 3},
        {"prompt": "a b c", "max_tokens": 9, "temperature": 1.2, "top_k": 5, "seed": 3, "stop": ["zz"]},
        {"prompt": "the mat", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "seed": 11, "positions": "generated"},
        {"prompt": "one", "max_tokens": 4, "temperature": 0, "return_hidden_states": True, "logprobs": True},
    ]
    alone = [await post(c, "/generate", model, body) for body in late]
    long_alone = await post(c, "/generate", model, LONG)
    release = threading.Event()
    start, sent = passes.count, entry.worker.counters.batched_requests
    for k in range(len(late)):  # pass 3(k + 1) waits for late request k: they join about three passes apart
        passes.at(start + 3 * (k + 1), lambda k=k: until(arrived(entry, sent + k + 2)))
    passes.at(start + 150, lambda: release.wait(120))
    long_task = asyncio.ensure_future(c.post("/generate", json={"model": model, **LONG}))
    tasks = []
    for k, body in enumerate(late):
        await eventually(lambda k=k: passes.count >= start + 3 * k + 1)
        tasks.append(asyncio.ensure_future(c.post("/generate", json={"model": model, **body})))
    try:
        results = [(await asyncio.wait_for(t, 120)).json() for t in tasks]
    finally:
        release.set()
    for got, want in zip(results, alone, strict=True):
        assert_same(got, want)
    assert (await long_task).json()["token_ids"] == long_alone["token_ids"]


async def test_a_stream_that_joins_late_streams_what_it_streams_alone(running):
    c, model, entry, passes = running
    body = {"prompt": "the cat", "max_tokens": 6, "temperature": 0, "stream_hidden_states": True}
    alone = (await c.post("/generate/stream", json={"model": model, **body})).text
    long_task, release = await start_long(c, model, entry, passes, wait_at=4, joining=1, hold_at=80)
    stream = asyncio.ensure_future(c.post("/generate/stream", json={"model": model, **body}))
    got = (await answered(stream, release)).text
    tokens, want = token_events(got), token_events(alone)
    assert [(e["token_id"], e["text"]) for e in tokens] == [(e["token_id"], e["text"]) for e in want]
    assert len(tokens) == 6 and "event: done" in got
    for a, b in zip(tokens, want, strict=True):
        np.testing.assert_allclose(a["hidden_states"]["-1"]["data"], b["hidden_states"]["-1"]["data"], atol=1e-5)
    await long_task


def token_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and '"token_id"' in line]


async def test_forward_passes_run_between_decoding_steps(running):
    c, model, entry, passes = running
    extract = {"text": "the cat sat on the mat", "hidden_state_layers": "all", "positions": "all"}
    embed = {"text": "the cat sat on the mat"}
    alone_extract = await post(c, "/extract", model, extract)
    alone_embed = await post(c, "/embed", model, embed)
    long_task, release = await start_long(c, model, entry, passes, wait_at=5, joining=2, hold_at=60)
    tasks = [
        asyncio.ensure_future(c.post("/extract", json={"model": model, **extract})),
        asyncio.ensure_future(c.post("/embed", json={"model": model, **embed})),
    ]
    try:
        got = [(await asyncio.wait_for(t, 120)).json() for t in tasks]
        assert not long_task.done()  # both answered while the generation is held mid-way
    finally:
        release.set()
    assert_same(got[0], alone_extract)
    np.testing.assert_allclose(got[1]["embedding"], alone_embed["embedding"], atol=1e-5)
    assert (await long_task).status_code == 200


class StepsAtPasses:
    """Records, at each plain forward pass, how many decoding steps the generating model had taken (``steps``)."""

    def __init__(self) -> None:
        self.steps: Callable[[], int] = lambda: 0
        self.seen: list[int] = []

    @hookimpl(tryfirst=True)
    def forward_with_states(self, model: LoadedModel, batch: Batch, capture: Capture) -> None:
        if batch.generation is None:
            self.seen.append(self.steps())


async def test_a_generation_steps_between_the_passes_of_a_request_that_runs_as_several(tiny_models):
    """A request whose rows pass ``max_batch_tokens`` runs as several passes: a running generation takes a
    decoding step between each two of them, not only after the last, and the answer is what it is alone."""
    texts = [f"text {i}: " + "the cat sat on the mat " * (1 + i % 3) for i in range(12)]
    at = StepsAtPasses()
    async with serving(tiny_models, at, max_batch_tokens=48) as (app, c, model, _):
        entry = app.state.manager.find(model)
        passes = Passes(entry.loaded.model)
        at.steps = lambda: passes.count
        try:
            want = await post(c, "/embed/batch", model, {"texts": texts})
            several = len(at.seen)
            assert several > 2, at.seen
            at.seen.clear()
            # The generation holds at its 150th step until the request is answered: it runs through every pass.
            long_task, release = await start_long(c, model, entry, passes, wait_at=5, joining=1, hold_at=150)
            task = asyncio.ensure_future(c.post("/embed/batch", json={"model": model, "texts": texts}))
            got = (await answered(task, release)).json()
        finally:
            passes.close()
        np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-5)
        assert len(at.seen) == several
        assert at.seen == sorted(set(at.seen)), at.seen  # a step between every two passes
        assert (await long_task).status_code == 200


async def test_a_prompt_refused_while_others_run_fails_alone(running):
    c, model, entry, passes = running
    long_alone = await post(c, "/generate", model, LONG)
    start = passes.count
    refused: list[asyncio.Future] = []
    passes.at(start + 3, lambda: until(lambda: entry.worker.queued >= 1 or (refused and refused[0].done())))
    long_task = asyncio.ensure_future(c.post("/generate", json={"model": model, **LONG}))
    await eventually(lambda: passes.count >= start + 1)
    refused.append(asyncio.ensure_future(c.post("/generate", json={"model": model, "prompt": "word " * 600})))
    r = await asyncio.wait_for(refused[0], 120)
    assert r.status_code == 422 and r.json()["field"] == "prompt"
    assert (await long_task).json()["token_ids"] == long_alone["token_ids"]
