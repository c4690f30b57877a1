"""Faults around the engine stay with their request: a generation joins a running batch only where it fits, a row
whose own callback fails is its own answer and stops decoding, a request that fails stops what it left running, and
a fault outside any call's handling answers the work in hand instead of hanging the model's thread.

A real tiny GPT-2 through the transformers loader; its decoder is wrapped only to count what it is asked to do, and
the model's thread is held by a gate while requests queue, so that they meet at one step boundary for certain.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest

from loom_kernel import Batch, Capture, GenerationParams, LoadOptions, create_plugin_manager, generate_whole
from loom_kernel.batching import ModelThread
from loom_kernel.calls import Ticket
from loom_kernel.inputs import tokenize_rows
from loom_kernel.resolve import resolve_model
from loom_kernel.scheduler import BatchLimits


class Counting:
    """The loader's own decoder, counting the rows it holds at most and the steps each row is fed."""

    def __init__(self, real: Any) -> None:
        self.real, self.held, self.most, self.steps = real, set(), 0, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def prefill(self, rows: list[Any]) -> Any:
        out = self.real.prefill(rows)
        self.held |= {r.id for r in rows}
        self.most = max(self.most, len(self.held))
        return out

    def step(self, feed: dict[int, int]) -> Any:
        for i in feed:
            self.steps[i] = self.steps.get(i, 0) + 1
        return self.real.step(feed)

    def release(self, ids: list[int]) -> None:
        self.held -= set(ids)
        self.real.release(ids)


@pytest.fixture
def gpt2(tiny_models: dict[str, Path]) -> Any:
    model = create_plugin_manager().hook.load(
        model=resolve_model(str(tiny_models["gpt2"])), loader="transformers", options=LoadOptions(), kernel=None
    )
    made: list[Counting] = []
    real = model.decoder

    def counted(attention: bool) -> Counting:
        made.append(Counting(real(attention)))
        return made[-1]

    model.decoder = counted
    model.extra["decoders"] = made
    return model


def _tokenized(model: Any, text: str, params: GenerationParams, **fields: Any) -> Batch:
    batch, refused = tokenize_rows(model, Batch(texts=(text,), generation=params, **fields))
    assert refused == [None]
    return batch


def _held(thread: ModelThread) -> threading.Event:
    """A gate the model's thread waits on: what is queued meanwhile meets at the next boundary."""
    gate = threading.Event()
    thread.submit(gate.wait)
    return gate


def _settle(thread: ModelThread, decoder: Counting, turns: int = 20) -> None:
    """Let the model's thread take turns (a step, then a queued task) until its decoder holds no rows."""
    for _ in range(turns):
        if not decoder.held:
            return
        thread.submit(lambda: None).result(timeout=120)


def test_generations_join_a_running_batch_only_where_it_has_room(gpt2: Any) -> None:
    """Two generations meet at one boundary (one with special tokens, one without: once tokenized they join the
    same decoder): with room for one row, the second waits for the first to leave instead of joining beside it."""
    thread = ModelThread("gpt2", BatchLimits(max_batch_size=1))
    params = GenerationParams(max_tokens=4, temperature=0)
    batches = [
        _tokenized(gpt2, "the cat sat", params),
        _tokenized(gpt2, "a dog ran", params, add_special_tokens=False),
    ]
    gate = _held(thread)
    futures = [thread.enqueue(Ticket(), None, gpt2, batch, Capture()) for batch in batches]
    gate.set()
    rows = [future.result(timeout=120).rows[0] for future in futures]
    assert gpt2.extra["decoders"][0].most == 1
    for batch, row in zip(batches, rows, strict=True):
        assert row.token_ids == generate_whole(gpt2, batch, Capture()).rows[0].token_ids
    thread.stop()


def test_a_rows_failing_callback_is_its_own_answer_and_its_row_stops(gpt2: Any) -> None:
    """Request A's ``on_token`` raises at its first token: A answers that error, B beside it answers what it gets
    alone, and A's row is fed no more than the step already under way."""
    thread = ModelThread("gpt2")

    def broken(row: int, token: int, piece: str, extras: Any = None) -> bool:
        raise ValueError("a stream's callback failed")

    long = GenerationParams(max_tokens=40, temperature=0)
    a = _tokenized(gpt2, "the cat sat", long)
    a = Batch(token_ids=a.token_ids, generation=long, on_token=broken)
    b = _tokenized(gpt2, "a dog ran", GenerationParams(max_tokens=6, temperature=0))
    gate = _held(thread)
    fa, fb = (thread.enqueue(Ticket(), None, gpt2, batch, Capture()) for batch in (a, b))
    gate.set()
    with pytest.raises(ValueError, match="callback failed"):
        fa.result(timeout=120)
    assert fb.result(timeout=120).rows[0].token_ids == generate_whole(gpt2, b, Capture()).rows[0].token_ids
    decoder = gpt2.extra["decoders"][0]
    _settle(thread, decoder)
    assert not decoder.held and max(decoder.steps.values()) <= 6  # B's budget; A stopped after its first token
    thread.stop()


def test_a_fault_outside_any_call_answers_and_the_model_thread_goes_on(gpt2: Any) -> None:
    """The loader's decoder cannot be made: the generation answers that error, and the model's thread still runs
    what comes next (it used to die, leaving every later call waiting forever)."""
    thread = ModelThread("gpt2")
    working = gpt2.decoder

    def broken(attention: bool) -> Any:
        raise RuntimeError("no decoder today")

    gpt2.decoder = broken
    params = GenerationParams(max_tokens=3, temperature=0)
    future = thread.enqueue(Ticket(), None, gpt2, _tokenized(gpt2, "the cat", params), Capture())
    with pytest.raises(RuntimeError, match="no decoder today"):
        future.result(timeout=120)
    assert thread.submit(lambda: "still here").result(timeout=120) == "still here"
    gpt2.decoder = working
    again = thread.enqueue(Ticket(), None, gpt2, _tokenized(gpt2, "the cat", params), Capture())
    assert len(again.result(timeout=120).rows[0].token_ids) > 2
    thread.stop()


async def test_a_failed_request_stops_the_generation_it_left_running(pm: Any, tiny_models: dict[str, Path]) -> None:
    """A request whose work gathers a generation with a check that fails answers the check's error at once, and
    the generation it had started stops at its next boundary instead of running to its ``max_tokens``."""
    from loom_kernel import InvalidField, ModelManager, Settings

    manager = ModelManager(pm, Settings())
    entry = await manager.get(str(tiny_models["gpt2"]))
    counted: list[Counting] = []
    real = entry.model().decoder

    def counting(attention: bool) -> Counting:
        counted.append(Counting(real(attention)))
        return counted[-1]

    entry.model().decoder = counting
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_token(row: int, token: int, piece: str, extras: Any = None) -> bool:
        loop.call_soon_threadsafe(started.set)
        return True

    async def work(session: Any) -> Any:
        long = Batch(texts=("the cat sat",), generation=GenerationParams(max_tokens=200, temperature=0))

        async def check() -> None:
            await started.wait()
            raise InvalidField("probes: not a probe of this server", field="probes")

        return await asyncio.gather(session.forward(attrs.evolve(long, on_token=first_token), Capture()), check())

    with pytest.raises(InvalidField):
        await manager.run(entry, work)
    await asyncio.to_thread(_settle, entry.worker, counted[0])
    # It may stop before its first step: the engine reads the request's cancellation at every boundary.
    assert not counted[0].held and max(counted[0].steps.values(), default=0) < 200
    await manager.stop()


def test_a_failed_prefill_of_several_requests_prefills_each_alone(gpt2: Any) -> None:
    """The decoder fails a prefill of two prompts at once (as a device out of memory would): each request's prompt
    is prefilled alone, and each answers what it gets alone."""
    thread = ModelThread("gpt2")
    real = gpt2.decoder

    class Narrow(Counting):
        def prefill(self, rows: list[Any]) -> Any:
            if len(rows) > 1:
                raise RuntimeError("out of memory for two prompts at once")
            return super().prefill(rows)

    gpt2.decoder = lambda attention: Narrow(real(attention))
    params = GenerationParams(max_tokens=4, temperature=0)
    batches = [_tokenized(gpt2, "the cat sat", params), _tokenized(gpt2, "a dog ran far", params)]
    gate = _held(thread)
    futures = [thread.enqueue(Ticket(), None, gpt2, batch, Capture()) for batch in batches]
    gate.set()
    rows = [future.result(timeout=120).rows[0] for future in futures]
    gpt2.decoder = real
    for batch, row in zip(batches, rows, strict=True):
        assert row.token_ids == generate_whole(gpt2, batch, Capture()).rows[0].token_ids
    thread.stop()
