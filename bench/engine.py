"""The engine's own costs, in the bench's process on the GPT-2-small-sized model (``python -m bench --only engine``).

- ``engine: host reads in a decoding step of 8 rows``: ``torch.profiler`` over one ``Engine.step`` of 8 running
  rows of different lengths, counting what makes the host wait for the device outside the model's own forward
  pass: on CUDA, device-to-host copies; on CPU, where ``.cpu()`` copies nothing, scalar reads
  (``aten::_local_scalar_dense``). transformers' mask code reads one scalar inside the forward pass when rows have
  pads (whether every column is real), as ``generate`` does; it is the model's, printed in the note. Baseline: the
  same step's logits picked one row at a time (``int(argmax)`` per row, how tokens were picked before). Target
  <= 1 read.
- ``engine: output processing per token at 2000 tokens vs 64``: the output processor fed one row's events (the
  model's tokenizer, two stop strings, a stream's ``on_token``), the median time a token takes among tokens
  1937-2000 over among the first 64. Target <= 1.1: incremental detokenizing does not re-decode the text so far.
- ``engine: 8 rows x 256 tokens vs transformers' batched generate``: generated tokens/s of the kernel's engine
  (``generate_whole``: the scheduler's engine and output processor over the transformers loader's decoder), greedy,
  against ``model.generate`` of the same 8 prompts, left-padded, in the same run. Target >= 1.
- ``engine: per-token time at 1000 tokens over at 64, the engine vs generate``: one row; how much a token's time
  grows from a 64-token generation to a 1000-token one, the engine's growth over ``generate``'s. Target <= 1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.generate import BATCH_PROMPTS

SCALAR_READ = "aten::_local_scalar_dense"


def bench_engine(model_dir: str, quick: bool, row: Callable[..., dict[str, Any]], device: str) -> list[dict[str, Any]]:
    from loom_kernel import LoadOptions, create_plugin_manager
    from loom_kernel.resolve import resolve_model

    pm = create_plugin_manager()
    model = pm.hook.load(
        model=resolve_model(model_dir), loader="transformers", options=LoadOptions(device=device), kernel=None
    )
    rows = [*host_reads(model, row), output_cost(model, row)]
    rows += versus_generate(model, model_dir, device, quick, row)
    return rows


def _in_forward(event: Any) -> bool:
    """Whether a profiler event ran inside a module's forward pass."""
    while event is not None:
        if event.name.startswith("nn.Module:"):
            return True
        event = event.cpu_parent
    return False


def _reads(trace: Any, cuda: bool) -> tuple[int, int]:
    """(host reads outside the model's forward pass, scalar reads inside it)."""
    events = list(trace.events())
    inside = sum(1 for e in events if e.name == SCALAR_READ and _in_forward(e))
    if cuda:  # every wait on the device is one device-to-host copy, a scalar read's included
        copies = sum(1 for e in events if "DtoH" in e.name or "Device -> Host" in e.name)
        return copies - inside, inside
    return sum(1 for e in events if e.name == SCALAR_READ and not _in_forward(e)), inside


def _running_engine(model: Any, rows: int) -> Any:
    from loom_kernel import Capture, GenerationParams, RowInput
    from loom_kernel.generating import Engine

    engine = Engine(model, model.decoder(False), lambda events: None)
    params = GenerationParams(max_tokens=64, temperature=0)
    inputs = [
        (RowInput(i, model.tokenizer(BATCH_PROMPTS[i % len(BATCH_PROMPTS)])["input_ids"], Capture()), params)
        for i in range(rows)
    ]
    engine.join(inputs)
    engine.step()  # warm: the first step of a fresh batch allocates the cache's room
    return engine


def host_reads(model: Any, row: Callable[..., dict[str, Any]]) -> list[dict[str, Any]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = next(model.model.parameters()).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    engine = _running_engine(model, 8)
    with profile(activities=activities, with_stack=True) as trace:
        engine.step()
    ours, models_own = _reads(trace, cuda)
    out = engine.decoder.step({r: 0 for r in engine.rows})  # one more step's logits, for the per-row picking
    with profile(activities=activities) as trace:
        _ = [int(torch.argmax(out.logits[b])) for b in range(out.logits.shape[0])]
    before, _ = _reads(trace, cuda)
    engine.close()
    return [
        row(
            "engine: host reads in a decoding step of 8 rows vs picking one row at a time",
            float(ours),
            float(before),
            "reads",
            "<= 1 read",
            lambda ratio: ours <= 1,
            note=f"outside the model's forward pass; the model's own mask code read {models_own} inside it",
        )
    ]


def output_cost(model: Any, row: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Per-token time of the output processor, early and late in one long row."""
    import random

    from loom_kernel import Capture
    from loom_kernel.calls import Call, Ticket
    from loom_kernel.generating import Event
    from loom_kernel.output import Expected, Processor

    rng = random.Random(0)
    vocab = len(model.tokenizer)
    tokens = [rng.randrange(vocab) for _ in range(2000)]
    early, late = [], []
    for _ in range(5):
        processor = Processor("bench", model.tokenizer, thread=False)
        engine = type("NoEngine", (), {"abort": lambda *a: None})()
        call = Call(pm=None, model=model, batch=None, capture=Capture(), ticket=Ticket())  # type: ignore[arg-type]
        stops = ("<never-1>", "<never-2>")
        spec = Expected(0, call, 0, lambda *a: True, [1, 2, 3], Capture(), stops, engine)  # type: ignore[arg-type]
        processor.expect(call, {0: spec}, Capture())
        times = []
        for token in tokens:
            start = time.perf_counter()
            processor.put([Event(row=0, token=token)])
            times.append(time.perf_counter() - start)
        early.append(statistics.median(times[:64]))
        late.append(statistics.median(times[-64:]))
    first, last = statistics.median(early), statistics.median(late)
    return row(
        "engine: output processing per token at 2000 tokens vs at 64",
        last * 1e6,
        first * 1e6,
        "us/token",
        "<= 1.1",
        lambda ratio: ratio <= 1.1,
    )


def versus_generate(
    model: Any, model_dir: str, device: str, quick: bool, row: Callable[..., dict[str, Any]]
) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loom_kernel import Batch, Capture, GenerationParams, generate_whole

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    net = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    new = 64 if quick else 256

    def ours(prompts: list[str], n: int) -> float:
        batch = Batch(texts=tuple(prompts), generation=GenerationParams(max_tokens=n, temperature=0))
        start = time.perf_counter()
        generate_whole(model, batch, Capture())
        return time.perf_counter() - start

    def theirs(prompts: list[str], n: int) -> float:
        ids = tok(prompts, return_tensors="pt", padding=True).to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            net.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - start

    repeats = 1 if quick else 3
    ours(BATCH_PROMPTS, 8), theirs(BATCH_PROMPTS, 8)  # warm-up
    batched_ours = min(ours(BATCH_PROMPTS, new) for _ in range(repeats))
    batched_theirs = min(theirs(BATCH_PROMPTS, new) for _ in range(repeats))
    long = 256 if quick else 1000
    growth = []
    for run in (ours, theirs):
        short = min(run(BATCH_PROMPTS[:1], 64) for _ in range(repeats)) / 64
        longer = min(run(BATCH_PROMPTS[:1], long) for _ in range(repeats)) / long
        growth.append(longer / short)
    tokens = len(BATCH_PROMPTS) * new
    return [
        row(
            f"engine: 8 rows x {new} tokens vs transformers' batched generate",
            tokens / batched_ours,
            tokens / batched_theirs,
            "tok/s",
            ">= 1",
            lambda ratio: ratio >= 1.0,
        ),
        row(
            f"engine: per-token time at {long} tokens over at 64, the engine vs generate",
            growth[0],
            growth[1],
            "x",
            "<= 1",
            lambda ratio: ratio <= 1.0,
        ),
    ]
