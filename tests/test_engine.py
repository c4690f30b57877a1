"""The kernel's generation engine, piece by piece, without a server: picking tokens (against torch's own argmax,
log-softmax and a per-row generator), text token by token (against the tokenizer's own ``decode``), stop strings
and what a stream may show, and the engine with the output processor against transformers' own ``generate``."""

from __future__ import annotations

import random

import pytest
import torch

from loom_kernel import Batch, Capture, GenerationParams, LayerSel, LoadOptions, create_plugin_manager, generate_whole
from loom_kernel.detokenize import Detokenizer
from loom_kernel.output import cut_at_stop, stop_hit, streamable
from loom_kernel.sampling import Choice, generator, pick


def test_greedy_picks_are_argmax_with_log_softmax_entries():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [Choice(GenerationParams(temperature=0), None, top_logprobs=k, keep_logits=k == 2) for k in (None, 0, 2)]
    picks = pick(logits, rows)
    assert [p.token for p in picks] == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    assert picks[0].logprob is None and picks[1].logprob["top"] == []
    values, ids = torch.topk(lp[2], 2)
    assert picks[2].logprob["logprob"] == pytest.approx(float(lp[2].max()))
    assert picks[2].logprob["top"] == [[int(i), pytest.approx(float(v))] for i, v in zip(ids, values, strict=True)]
    assert torch.equal(picks[2].logits, logits[2])


def test_a_sampled_row_picks_what_it_picks_alone_and_a_seed_repeats():
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    params = [
        GenerationParams(temperature=t, top_k=k, top_p=p, seed=s)
        for t, k, p, s in [(1.0, 0, 1.0, 3), (0.7, 20, 0.9, 4), (0, 0, 1.0, None), (1.3, 5, 1.0, 5)]
    ]

    def draw(rows: list[int]) -> list[int]:
        return [p.token for p in pick(logits[rows], [Choice(params[r], generator(params[r].seed)) for r in rows])]

    together = draw([0, 1, 2, 3])
    assert together == [draw([r])[0] for r in range(4)] == draw([0, 1, 2, 3])
    kept = torch.topk(logits[3], 5).indices.tolist()
    assert all(draw([3])[0] in kept for _ in range(5))  # top-k 5: nothing else can be drawn


def test_logits_that_are_not_finite_give_no_token_and_the_others_go_on():
    logits = torch.randn(2, 10)
    logits[0, 3] = float("nan")
    picks = pick(logits, [Choice(GenerationParams(temperature=0), None), Choice(GenerationParams(temperature=0), None)])
    assert picks[0].token is None and picks[1].token == int(logits[1].argmax())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("stream", [True, False])
def test_text_token_by_token_equals_the_tokenizers_decode(tiny_models, arch, stream):
    """The concatenated pieces are decode(ids) (an incomplete character at the end waits for its next token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = Detokenizer(tok)
        if not stream:
            detok._stream = None  # the window fallback, as for a tokenizer that is not a fast one
        text = "".join(detok.push(i) for i in ids)
        want = tok.decode(ids, skip_special_tokens=True)
        assert want.startswith(text) and set(want[len(text) :]) <= {"\ufffd"}


def test_stop_strings_and_what_a_stream_may_show():
    assert streamable("hello wo", ("world",)) == "hello "
    assert streamable("hello w", ("xyz", "wor")) == "hello "
    assert streamable("hello", ("world",)) == "hello"
    assert streamable("caf\ufffd", ()) == "caf"
    assert cut_at_stop("one. two. three", (". t", "two")) == "one"
    assert cut_at_stop("abc", ("", "z")) == "abc"
    assert stop_hit("one. two", 5, (". t", "two")) == 3 and stop_hit("one. tw", 5, ("two",)) is None


def test_what_a_stream_may_show_costs_its_new_text_not_the_text_times_a_stop():
    """A stop string may be as long as a body holds (16 of 600 KB each): what a stream may show is worked out after
    every token, and compared every length of every stop with the text's tail, which for a 4096-token generation was
    minutes of the output thread, shared by the model's requests. Now only what is not streamed yet can be held back
    (the answer is the same: text streamed was no stop's start, so it never becomes one), and only the lengths ending
    in the text's last character are compared; the answer is the longest suffix that starts a stop, by brute force."""
    import random

    def reference(text: str, stops: tuple[str, ...]) -> str:
        end = len(text.rstrip("\ufffd"))
        hold = max((k for s in stops for k in range(1, len(s)) if k <= end and text[:end].endswith(s[:k])), default=0)
        return text[: end - hold]

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab\ufffd") for _ in range(rng.randrange(0, 12)))
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(3)))
        want = reference(text, stops)
        assert streamable(text, stops) == want, (text, stops)
        for start in range(len(want) + 1):  # whatever a stream showed before is part of what it may show now
            assert streamable(text, stops, start) == want, (text, stops, start)

    class Counted(str):
        cuts = 0

        def __getitem__(self, key: object) -> str:
            Counted.cuts += 1
            return str.__getitem__(self, key)  # type: ignore[index]

    text = "The function returns the value of x. " * 400  # 14,800 characters generated so far
    stops = tuple(Counted("Z" * 600_000 + str(i)) for i in range(16))
    shown = streamable(text, stops, len(text) - 9)  # the newest token's piece is not streamed yet
    assert shown == text and Counted.cuts == 0
    stops = tuple(Counted("a " * 300_000) for _ in range(16))  # a space ends the text: candidates, but few unshown
    assert streamable(text, stops, len(text) - 9) == text and Counted.cuts <= 16 * 5


def test_a_whole_generation_equals_transformers_generate(tiny_models):
    """The engine and the output processor, here and now, on the transformers loader's decoder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loom_kernel.resolve import resolve_model

    path = str(tiny_models["gpt2"])
    model = create_plugin_manager().hook.load(
        model=resolve_model(path), loader="transformers", options=LoadOptions(), kernel=None
    )
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok("Hello world, the", return_tensors="pt")["input_ids"]
    want = net.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    capture = Capture(layers=(LayerSel("-1", 3),), positions="all", top_logprobs=2)
    batch = Batch(texts=("Hello world, the",), generation=GenerationParams(max_tokens=12, temperature=0))
    (row,) = generate_whole(model, batch, capture).rows
    assert row.generated_ids == want and row.text == tok.decode(want, skip_special_tokens=True)
    with torch.no_grad():
        states = net(torch.tensor([row.token_ids]), output_hidden_states=True).hidden_states[-1][0]
    assert (row.states["-1"] - states).abs().max() < 1e-5 and row.positions == list(range(len(row.token_ids)))
    assert len(row.logprobs) == 12


def test_a_row_whose_logits_are_not_finite_is_its_own_answer(tiny_models):
    """One row's edit sends its logits to infinity: that row's answer is the error naming its interventions, and
    the row beside it generates what it generates alone."""
    from loom_kernel import Intervention, InvalidField
    from loom_kernel.resolve import resolve_model

    model = create_plugin_manager().hook.load(
        model=resolve_model(str(tiny_models["gpt2"])), loader="transformers", options=LoadOptions(), kernel=None
    )
    params = GenerationParams(max_tokens=5, temperature=0)
    blow_up = Intervention(site=model.num_layers, op="add", vector=torch.full((64,), 3e38), scale=10.0)
    (alone,) = generate_whole(model, Batch(texts=("the cat sat",), generation=params), Capture()).rows
    both = Batch(texts=("the cat", "the cat sat"), generation=params, interventions=((blow_up,), ()))
    with pytest.raises(InvalidField):  # generate_whole raises a failed row; the engine's own answer has both
        generate_whole(model, both, Capture())
    bad, beside = _answer(model, both)
    (alone_bad,) = _answer(model, Batch(texts=("the cat",), generation=params, interventions=((blow_up,),)))
    assert isinstance(alone_bad, InvalidField)
    assert isinstance(bad, InvalidField) and bad.field == "interventions" and "not finite" in str(bad)
    assert beside.token_ids == alone.token_ids


def test_rows_are_running_once_their_prefill_has_run(tiny_models):
    """/models' running_rows (the engine's ``running``) counts a joining row once its prompt has been fed, not
    while the prefill runs (an /extract sent on seeing a running row then waits for a step, not for a prefill)."""
    from loom_kernel import RowInput
    from loom_kernel.generating import Engine
    from loom_kernel.resolve import resolve_model

    model = create_plugin_manager().hook.load(
        model=resolve_model(str(tiny_models["gpt2"])), loader="transformers", options=LoadOptions(), kernel=None
    )
    seen: list[int] = []

    class Watched:
        """The loader's own decoder, noting what the engine reports while its prefill runs."""

        def __init__(self, real) -> None:
            self.real = real

        def __getattr__(self, name: str):
            return getattr(self.real, name)

        def prefill(self, rows):
            seen.append(engine.running)
            return self.real.prefill(rows)

    engine = Engine(model, Watched(model.decoder(False)), lambda events: None)
    prompt = model.tokenizer("the cat sat")["input_ids"]
    engine.join([(RowInput(0, prompt, Capture()), GenerationParams(max_tokens=3, temperature=0))])
    assert seen == [0] and engine.running == 1
    engine.join([(RowInput(1, prompt, Capture()), GenerationParams(max_tokens=3, temperature=0))])
    assert seen == [0, 1] and engine.running == 2
    engine.close()


def _answer(model, batch: Batch) -> list:
    """The rows the engine and the output processor answer ``batch``'s call with, errors included."""
    import itertools

    from loom_kernel.batching import join
    from loom_kernel.calls import Call, Ticket
    from loom_kernel.generating import Engine
    from loom_kernel.inputs import tokenize_rows
    from loom_kernel.output import Processor

    batch, _ = tokenize_rows(model, batch)
    output = Processor("test", model.tokenizer, thread=False)
    engine = Engine(model, model.decoder(False), output.put)
    call = Call(pm=None, model=model, batch=batch, capture=Capture(), ticket=Ticket())
    join(engine, output, [call], itertools.count())
    while engine.busy:
        engine.step()
    assert call.future.done(), "the engine finished and the call has no answer"
    return call.future.result().rows


@pytest.mark.parametrize(("logits", "top_p"), [([0.0] * 4, 0.5), ([0.0] * 2, 0.5), ([1.0, 1.0, 0.0, 0.0], 0.5)])
def test_top_p_keeps_what_transformers_top_p_warper_keeps(logits, top_p):
    """Once the tokens before one hold exactly top_p, it is not sampled: four equally likely tokens at top_p 0.5
    leave two, as transformers' ``TopPLogitsWarper`` leaves them."""
    from transformers.generation.logits_process import TopPLogitsWarper

    row = torch.tensor(logits)
    kept = int(torch.isfinite(TopPLogitsWarper(top_p)(None, row[None].clone())).sum())
    params = GenerationParams(temperature=1.0, top_p=top_p, seed=0)
    choice = Choice(params, generator(params.seed))
    drawn = {pick(row[None], [choice])[0].token for _ in range(64)}
    assert len(drawn) == kept
