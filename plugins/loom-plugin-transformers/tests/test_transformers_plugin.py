"""The transformers plugin through the real plugin manager, checked against transformers' own outputs.

Reference for states: ``model(input_ids, output_hidden_states=True).hidden_states``; for tokens:
``model.generate(do_sample=False)``. Tiny models come from ``loom_transformers.testing`` (built once per session).
"""

from __future__ import annotations

import logging
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from loom_transformers.testing import ARCHITECTURES, CAUSAL_ARCHITECTURES, build_tiny_model

from loom_kernel import Batch, Capture, GenerationParams, Intervention, LoadOptions, ModelRef
from loom_kernel.capture import resolve_layers
from loom_kernel.errors import BadModel, InvalidField, Unsupported
from loom_kernel.plugins import create_plugin_manager
from loom_kernel.resolve import resolve_model

PROMPT = "The quick brown fox jumps over the lazy dog. Hidden states"
OTHER = "Hello world! How are you today?"
LAYER_SPECS: list[Any] = [[0], [1], [-1], [-2], "all", [0, 2, -1], [-3, 1]]


@pytest.fixture(scope="module")
def hooks() -> Any:
    pm = create_plugin_manager()  # loads the installed entry points, this plugin among them
    pm.check_pending()
    return pm.hook


@pytest.fixture(scope="module")
def loaded(hooks: Any, tiny_models: dict[str, Path]) -> dict[str, Any]:
    return {
        arch: hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)
        for arch, path in tiny_models.items()
    }


def hidden_states(model: Any, ids: list[int]) -> tuple[Any, ...]:
    with torch.inference_mode():
        return model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def rel_err(got: Any, want: Any) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max())


def run(hooks: Any, model: Any, capture: Capture = Capture(), **batch: Any) -> Any:
    batch.setdefault("texts", (PROMPT,))
    return hooks.forward_with_states(model=model, batch=Batch(**batch), capture=capture)


def gen(max_tokens: int = 12, **kw: Any) -> GenerationParams:
    kw.setdefault("temperature", 0.0)
    return GenerationParams(max_tokens=max_tokens, **kw)


# --- plugin registration and probe ----------------------------------------------------------------------------


def test_entry_point_is_installed():
    eps = {ep.name: ep for ep in metadata.entry_points(group="loom")}
    assert eps["transformers"].value == "loom_transformers"
    assert eps["transformers"].dist.name == "loom-plugin-transformers"


def _probe(hooks: Any, ref: ModelRef) -> Any:
    mine = [r for r in hooks.probe(model=ref) if r is not None and r.loader == "transformers"]
    assert len(mine) <= 1
    return mine[0] if mine else None


def test_probe_scores(hooks, tiny_models):
    result = _probe(hooks, resolve_model(str(tiny_models["llama"])))
    assert (result.score, result.reason) == (0.5, "config.json with architectures ['LlamaForCausalLM']")
    assert _probe(hooks, resolve_model(str(tiny_models["llama"]))) == result  # deterministic
    assert _probe(hooks, resolve_model(str(tiny_models["bert"]))).score == 0.5
    bare = _probe(hooks, ModelRef(id="x", config={"model_type": "llama"}))
    assert (bare.score, bare.reason) == (0.1, "config.json without architectures (model_type 'llama')")
    assert _probe(hooks, ModelRef(id="x")) is None
    # Malformed configs lower the score or give no opinion; a probe never raises.
    assert _probe(hooks, ModelRef(id="x", config={"architectures": "Llama"})).score == 0.1
    assert _probe(hooks, ModelRef(id="x", config={"architectures": [1, None]})).score == 0.5
    assert _probe(hooks, ModelRef(id="x", config=["not", "a", "dict"])) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("tiny_model", ARCHITECTURES, indirect=True)
def test_every_tiny_model_probes_as_generic(hooks, tiny_model):
    result = _probe(hooks, resolve_model(str(tiny_model)))
    assert result.score == 0.5 and result.reason.startswith("config.json with architectures [")


# --- load -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_load_fields(loaded, arch):
    m = loaded[arch]
    cfg = m.model.config
    assert m.loader == "transformers" and m.device == "cpu" and m.dtype == "float32"
    assert m.kind == ("encoder" if arch == "bert" else "causal")
    assert m.num_layers == (cfg.n_layer if arch == "gpt2" else cfg.num_hidden_layers)
    assert m.hidden_size == 64 and m.max_context == 512
    assert m.size_bytes == sum(t.numel() * t.element_size() for t in [*m.model.parameters(), *m.model.buffers()])
    assert m.load_seconds > 0 and not m.model.training
    assert type(m.model).__name__ == {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}.get(
        arch, f"{cfg.architectures[0]}"
    )


def test_load_declines_other_loaders(hooks, tiny_models):
    ref = resolve_model(str(tiny_models["gpt2"]))
    assert hooks.load(model=ref, loader="someone-else", options=LoadOptions(), kernel=None) is None


def test_load_logs_what_where_size_device_dtype_time(hooks, tiny_models, caplog):
    path = tiny_models["qwen2"]
    with caplog.at_level(logging.INFO, logger="loom.transformers"):
        hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)
    done = [r.getMessage() for r in caplog.records if r.name == "loom.transformers" and "loaded" in r.getMessage()]
    assert len(done) == 1
    assert str(path) in done[0] and "MiB on cpu as float32 in" in done[0] and "Qwen2ForCausalLM" in done[0]


def test_load_bad_dtype_is_invalid_field(hooks, tiny_models):
    ref = resolve_model(str(tiny_models["llama"]))
    with pytest.raises(InvalidField) as err:
        hooks.load(model=ref, loader="transformers", options=LoadOptions(dtype="float8"), kernel=None)
    assert err.value.field == "dtype" and err.value.status == 422
    assert err.value.allowed == ["auto", "float32", "float16", "bfloat16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_load_cuda_without_cuda_is_invalid_field(hooks, tiny_models, device):
    ref = resolve_model(str(tiny_models["llama"]))
    with pytest.raises(InvalidField) as err:
        hooks.load(model=ref, loader="transformers", options=LoadOptions(device=device), kernel=None)
    assert err.value.field == "device" and err.value.allowed == ["cpu"]


def test_load_unknown_device_is_invalid_field(hooks, tiny_models):
    with pytest.raises(InvalidField) as err:
        hooks.load(
            model=resolve_model(str(tiny_models["llama"])),
            loader="transformers",
            options=LoadOptions("tpu"),
            kernel=None,
        )
    assert err.value.field == "device"


def test_load_without_weights_is_the_models_fault(hooks, tiny_models, tmp_path):
    # Everything but the weights: the tokenizer is checked first, so it must be there for this to be the weights' fault.
    for f in tiny_models["llama"].iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(BadModel) as err:
        hooks.load(model=resolve_model(str(tmp_path)), loader="transformers", options=LoadOptions(), kernel=None)
    assert err.value.status == 422 and str(tmp_path) in err.value.detail and "no weights file" in err.value.detail


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_keeps_states_in_model_dtype(hooks, loaded, tiny_models):
    m = hooks.load(
        model=resolve_model(str(tiny_models["llama"])),
        loader="transformers",
        options=LoadOptions(dtype="bfloat16"),
        kernel=None,
    )
    assert loaded["llama"].dtype == "float32"
    assert m.dtype == "bfloat16" and m.model.dtype == torch.bfloat16
    assert m.size_bytes * 2 == pytest.approx(loaded["llama"].size_bytes, rel=0.01)
    row = run(hooks, m, Capture(layers=resolve_layers([-1], m.num_layers), positions="all")).rows[0]
    assert row.states["-1"].dtype == torch.bfloat16
    want = hidden_states(m, row.token_ids)[-1][0]
    assert rel_err(row.states["-1"], want) < 1e-2


# --- forward pass: states against output_hidden_states -------------------------------------------------------


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_states_match_output_hidden_states(hooks, loaded, arch, positions):
    m = loaded[arch]
    for spec in LAYER_SPECS:
        capture = Capture(layers=resolve_layers(spec, m.num_layers), positions=positions)
        out = run(hooks, m, capture)
        (row,) = out.rows
        total = len(row.token_ids)
        assert row.token_ids == m.tokenizer(PROMPT)["input_ids"] and row.prompt_tokens == total
        assert (row.text, row.finish_reason) == ("", None)
        assert row.positions == ([total - 1] if positions == "last" else list(range(total)))
        assert list(row.states) == [sel.key for sel in capture.layers]
        ref = hidden_states(m, row.token_ids)
        assert len(ref) == m.num_layers + 1
        for sel in capture.layers:
            got = row.states[sel.key]
            want = ref[sel.index][0][-1:] if positions == "last" else ref[sel.index][0]
            assert got.shape == (len(row.positions), m.hidden_size) and got.device.type == "cpu"
            assert got.dtype == torch.float32
            assert rel_err(got, want) < 1e-5, (spec, sel)


def test_all_layers_are_keyed_from_minus_n(hooks, loaded):
    m = loaded["llama"]
    row = run(hooks, m, Capture(layers=resolve_layers("all", m.num_layers))).rows[0]
    assert list(row.states) == ["-3", "-2", "-1"]


@pytest.mark.parametrize(
    ("arch", "first", "last"),
    [
        ("llama", "<s>", None),
        ("mistral", "<s>", None),
        ("qwen2", None, None),
        ("gpt2", None, None),
        ("bert", "[CLS]", "[SEP]"),
    ],
)
def test_special_tokens_follow_the_family(hooks, loaded, arch, first, last):
    m = loaded[arch]
    specials = set(m.tokenizer.all_special_tokens)
    for add in (True, False):
        ids = run(hooks, m, add_special_tokens=add).rows[0].token_ids
        tokens = m.tokenizer.convert_ids_to_tokens(ids)
        if add and first:
            assert tokens[0] == first
        if add and last:
            assert tokens[-1] == last
        if not add or (not first and not last):
            assert not specials & set(tokens)


def test_token_ids_input_and_vocabulary_check(hooks, loaded):
    m = loaded["gpt2"]
    ids = (5, 60, 300, 7)
    capture = Capture(layers=resolve_layers([2], m.num_layers), positions="all")
    row = run(hooks, m, capture, texts=(), token_ids=(ids,)).rows[0]
    assert row.token_ids == list(ids)
    assert rel_err(row.states["2"], hidden_states(m, list(ids))[2][0]) < 1e-5
    with pytest.raises(InvalidField) as err:
        run(hooks, m, capture, texts=(), token_ids=((1, 10_000),))
    assert err.value.field == "token_ids"


def test_no_layers_means_no_states(hooks, loaded):
    row = run(hooks, loaded["llama"]).rows[0]
    assert row.states == {} and row.positions == [] and row.token_ids


@pytest.mark.parametrize("positions", ["all", "last"])
def test_logits_without_layers_on_a_fresh_model_are_transformers_own(hooks, tiny_models, positions):
    """Logits alone (no layer, no site) as a model's first request: the pass still finds the base model it runs."""
    m = hooks.load(
        model=resolve_model(str(tiny_models["llama"])), loader="transformers", options=LoadOptions(), kernel=None
    )
    assert "base" not in m.extra  # nothing has looked for the blocks yet
    rows = run(hooks, m, Capture(positions=positions, logits=True), texts=(PROMPT, OTHER)).rows
    for row in rows:
        with torch.inference_mode():
            want = m.model(input_ids=torch.tensor([row.token_ids])).logits[0]
        want = want[-1:] if positions == "last" else want
        assert row.states == {}
        torch.testing.assert_close(row.logits.float(), want, rtol=1e-4, atol=1e-4)


def test_rows_of_a_batch_are_independent(hooks, loaded):
    m = loaded["qwen2"]
    capture = Capture(layers=resolve_layers([-1], m.num_layers), positions="all")
    both = run(hooks, m, capture, texts=(OTHER, PROMPT)).rows
    alone = run(hooks, m, capture).rows[0]
    assert both[1].token_ids == alone.token_ids and torch.equal(both[1].states["-1"], alone.states["-1"])
    assert both[0].token_ids == m.tokenizer(OTHER)["input_ids"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_a_padded_batch_equals_each_row_alone(hooks, loaded, arch, side, positions):
    """Several rows run as one padded pass; each row's states equal output_hidden_states of that row alone."""
    m = loaded[arch]
    texts = ("Hi", PROMPT, OTHER, "Hidden states")  # mixed lengths: every row but one is padded
    capture = Capture(layers=resolve_layers([0, 1, -1], m.num_layers), positions=positions)
    before = m.tokenizer.padding_side
    m.tokenizer.padding_side = side
    try:
        rows = run(hooks, m, capture, texts=texts).rows
    finally:
        m.tokenizer.padding_side = before
    assert len({len(r.token_ids) for r in rows}) > 1
    for text, row in zip(texts, rows, strict=True):
        assert row.token_ids == m.tokenizer(text)["input_ids"]
        ref = hidden_states(m, row.token_ids)
        assert row.positions == (list(range(len(row.token_ids))) if positions == "all" else [len(row.token_ids) - 1])
        for key, index in (("0", 0), ("1", 1), ("-1", -1)):
            want = ref[index][0, row.positions]
            assert row.states[key].shape == want.shape
            torch.testing.assert_close(row.states[key], want, rtol=1e-5, atol=1e-5)


def test_text_over_the_context_is_invalid(hooks, loaded):
    m = loaded["gpt2"]
    with pytest.raises(InvalidField) as err:
        run(hooks, m, texts=(), token_ids=((5,) * 513,))
    assert err.value.field == "token_ids"


def test_truncate_cuts_a_row_to_the_context_instead_of_failing(hooks, loaded):
    m = loaded["bert"]  # context 512
    long = "hello world " * 400
    with pytest.raises(InvalidField) as err:
        run(hooks, m, texts=("short", long))
    assert err.value.field == "text" and err.value.extra == {"row": 1}
    capture = Capture(layers=resolve_layers([-1], m.num_layers), positions="all")
    rows = run(hooks, m, capture, texts=("short", long), truncate=True).rows
    assert [r.truncated for r in rows] == [False, True]
    want = m.tokenizer(long, truncation=True, max_length=512)["input_ids"]
    assert rows[1].token_ids == want and len(want) == 512 and want[-1] == m.tokenizer.sep_token_id
    assert rel_err(rows[1].states["-1"], hidden_states(m, want)[-1][0]) < 1e-5
    (cut,) = run(hooks, m, texts=(), token_ids=((5,) * 600,), truncate=True).rows
    assert cut.truncated and cut.token_ids == [5] * 512


# --- generation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_greedy_generation_equals_transformers_generate(hooks, loaded, arch):
    m = loaded[arch]
    row = run(hooks, m, generation=gen(12)).rows[0]
    prompt = m.tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        want = m.model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=m.tokenizer.pad_token_id,
        )[0].tolist()
    assert row.token_ids == want and row.prompt_tokens == len(prompt)
    assert row.finish_reason == ("length" if len(want) == len(prompt) + 12 else "stop")
    assert row.text == m.tokenizer.decode(row.generated_ids, skip_special_tokens=True)


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_states_after_generation_equal_one_pass_over_the_final_sequence(hooks, loaded, arch):
    m = loaded[arch]
    layers = resolve_layers([0, 1, -2, -1], m.num_layers)
    full = run(hooks, m, Capture(layers=layers, positions="all"), generation=gen(10)).rows[0]
    last = run(hooks, m, Capture(layers=layers, positions="last"), generation=gen(10)).rows[0]
    assert full.token_ids == last.token_ids and len(full.generated_ids) > 0
    total = len(full.token_ids)
    assert full.positions == list(range(total)) and last.positions == [total - 1]
    ref = hidden_states(m, full.token_ids)
    for sel in layers:
        assert full.states[sel.key].shape == (total, m.hidden_size)
        assert last.states[sel.key].shape == (1, m.hidden_size)
        assert rel_err(full.states[sel.key], ref[sel.index][0]) < 1e-4, sel
        assert rel_err(last.states[sel.key], ref[sel.index][0][-1:]) < 1e-4, sel


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_the_roomy_cache_equals_transformers_dynamic_cache_and_appends_in_place(loaded, arch):
    from loom_transformers.cache import RoomyLayer, plain, roomy

    m = loaded[arch]
    ids = torch.tensor([m.tokenizer(PROMPT)["input_ids"], m.tokenizer(PROMPT)["input_ids"][::-1]])
    with torch.inference_mode():
        first = m.model(input_ids=ids, use_cache=True)
        dynamic = first.past_key_values
        room = roomy(m.model(input_ids=ids, use_cache=True).past_key_values)
        if not plain(dynamic):  # sliding windows keep their own layers, which the decoder never joins
            assert [type(layer) for layer in room.layers] == [type(layer) for layer in dynamic.layers]
            return
        assert all(type(layer) is RoomyLayer for layer in room.layers)
        token, buffers = first.logits[:, -1:].argmax(-1), set()
        for _ in range(40):
            want = m.model(input_ids=token, past_key_values=dynamic, use_cache=True)
            got = m.model(input_ids=token, past_key_values=room, use_cache=True)
            assert torch.equal(got.logits, want.logits)
            for mine, theirs in zip(room.layers, dynamic.layers, strict=True):
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
            buffers.add(room.layers[0].keys.data_ptr())
            token = want.logits[:, -1:].argmax(-1)
    assert len(buffers) <= 3  # copied only when the room ran out, not at each of the 40 steps


def test_generation_without_layers_skips_capture(hooks, loaded):
    row = run(hooks, loaded["llama"], generation=gen(4)).rows[0]
    assert row.states == {} and row.positions == [] and len(row.generated_ids) == 4


def test_seed_gives_the_same_tokens_alone_or_batched(hooks, loaded):
    m = loaded["llama"]
    params = gen(12, temperature=1.2, top_k=50, top_p=0.95, seed=7)
    a = run(hooks, m, generation=params).rows[0]
    b = run(hooks, m, generation=params).rows[0]
    batched = run(hooks, m, texts=(OTHER, PROMPT), generation=params).rows[1]
    assert a.token_ids == b.token_ids == batched.token_ids
    others = {tuple(run(hooks, m, generation=gen(12, temperature=1.2, seed=s)).rows[0].token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters


def test_top_k_one_is_greedy(hooks, loaded):
    m = loaded["mistral"]
    greedy = run(hooks, m, generation=gen(8)).rows[0]
    sampled = run(hooks, m, generation=gen(8, temperature=0.8, top_k=1, seed=3)).rows[0]
    assert sampled.token_ids == greedy.token_ids


def test_stop_string_truncates_text_and_streams_nothing_of_it(hooks, loaded):
    m = loaded["gpt2"]
    unstopped = run(hooks, m, generation=gen(16)).rows[0]
    full = unstopped.text
    assert len(full) >= 6, full
    k = len(full) // 2
    stop = full[k : k + 3]
    cut = full.find(stop)
    pieces: list[str] = []
    params = gen(16, stop=(stop, "never-there"))
    row = run(hooks, m, generation=params, on_token=lambda r, t, p, x: pieces.append(p)).rows[0]
    assert (row.text, row.finish_reason) == (full[:cut], "stop")
    assert unstopped.generated_ids[: len(row.generated_ids)] == row.generated_ids
    assert "".join(pieces) == row.text


def test_on_token_sees_every_token_and_can_stop_a_row(hooks, loaded):
    m = loaded["qwen2"]
    seen: list[tuple[int, int, str]] = []

    def on_token(row: int, token: int, piece: str, extras: dict) -> bool:
        seen.append((row, token, piece))
        return len(seen) < 3

    row = run(hooks, m, generation=gen(10), on_token=on_token).rows[0]
    assert row.finish_reason == "stop" and row.generated_ids == [t for _, t, _ in seen]
    assert len(seen) == 3 and {r for r, _, _ in seen} == {0}
    assert "".join(p for _, _, p in seen) == row.text


def test_eos_token_stops_generation(hooks, loaded):
    m = loaded["llama"]
    first = run(hooks, m, generation=gen(1)).rows[0].generated_ids[0]
    saved = m.stop_ids  # the loader's end-of-sequence ids (from the generation config): the kernel stops on them
    m.stop_ids = frozenset([first])
    try:
        capture = Capture(layers=resolve_layers([-1], m.num_layers), positions="last")
        row = run(hooks, m, capture, generation=gen(10)).rows[0]
    finally:
        m.stop_ids = saved
    assert row.generated_ids == [first] and row.finish_reason == "stop"
    ref = hidden_states(m, row.token_ids)
    assert rel_err(row.states["-1"], ref[-1][0][-1:]) < 1e-4


def test_max_tokens_zero_and_encoders(hooks, loaded):
    m = loaded["llama"]
    row = run(hooks, m, Capture(layers=resolve_layers([-1], 3)), generation=gen(0)).rows[0]
    assert row.generated_ids == [] and row.finish_reason == "length" and row.states["-1"].shape == (1, 64)
    with pytest.raises(Unsupported):
        run(hooks, loaded["bert"], generation=gen(4))


def test_generation_stops_at_the_context_limit(hooks, tiny_root):
    path = build_tiny_model("llama", tiny_root, name="tiny-llama-ctx16", max_position_embeddings=16)
    m = hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)
    assert m.max_context == 16
    capture = Capture(layers=resolve_layers([-1], m.num_layers), positions="all")
    # A request that names no max_tokens generates to the end of the context (fit_context); one that names more
    # than fits after its prompt is refused naming it, as vLLM and OpenAI refuse it.
    fit = gen(50, fit_context=True)
    row = run(hooks, m, capture, texts=(), token_ids=(tuple(range(5, 15)),), generation=fit).rows[0]
    assert len(row.token_ids) == 16 and row.finish_reason == "length"
    assert rel_err(row.states["-1"], hidden_states(m, row.token_ids)[-1][0]) < 1e-4
    full = run(hooks, m, capture, texts=(), token_ids=(tuple(range(5, 21)),), generation=fit).rows[0]
    assert full.generated_ids == [] and full.finish_reason == "length" and full.states["-1"].shape == (16, 64)
    with pytest.raises(InvalidField) as refused:
        run(hooks, m, capture, texts=(), token_ids=(tuple(range(5, 15)),), generation=gen(7))
    assert refused.value.field == "max_tokens"
    assert (
        len(run(hooks, m, capture, texts=(), token_ids=(tuple(range(5, 15)),), generation=gen(6)).rows[0].token_ids)
        == 16
    )
    with pytest.raises(InvalidField):
        run(hooks, m, texts=(), token_ids=(tuple(range(5, 22)),), generation=fit)


# --- batched generation, streamed states, attention, log-probabilities -----------------------------------------

BATCH_TEXTS = ("Hi", PROMPT, OTHER, "Hidden states are")


@pytest.mark.parametrize("arch", CAUSAL_ARCHITECTURES)
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(hooks, loaded, arch):
    """One batched generation (left padding, explicit positions) equals greedy generation of each prompt alone."""
    m = loaded[arch]
    capture = Capture(layers=resolve_layers([0, 1, -1], m.num_layers), positions="all")
    alone = [run(hooks, m, capture, texts=(t,), generation=gen(8)).rows[0] for t in BATCH_TEXTS]
    # An end-of-sequence token that one row meets early: rows of the batch stop at different steps.
    saved = m.stop_ids
    m.stop_ids = frozenset([alone[1].generated_ids[2]])
    try:
        alone = [run(hooks, m, capture, texts=(t,), generation=gen(8)).rows[0] for t in BATCH_TEXTS]
        batched = run(hooks, m, capture, texts=BATCH_TEXTS, generation=gen(8)).rows
    finally:
        m.stop_ids = saved
    assert len({len(r.generated_ids) for r in alone}) > 1 and len({r.prompt_tokens for r in alone}) > 1
    for one, row in zip(alone, batched, strict=True):
        assert row.token_ids == one.token_ids and row.finish_reason == one.finish_reason and row.text == one.text
        ref = hidden_states(m, row.token_ids)
        for sel in capture.layers:
            assert rel_err(row.states[sel.key], ref[sel.index][0]) < 1e-4, sel


def test_mamba_rows_leaving_at_different_steps_generate_what_each_generates_alone(hooks, tiny_root):
    """Mamba's cache layers (recurrent conv and SSM states) have no ``batch_select_indices``: a row that finishes
    first must leave the running batch without failing the others, each row still what transformers generates."""
    path = build_tiny_model("mamba", tiny_root)
    m = hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)

    def reference(text: str, stop: int | None) -> list[int]:
        prompt = m.tokenizer(text)["input_ids"]
        with torch.inference_mode():
            return m.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=stop,
                pad_token_id=m.tokenizer.pad_token_id,
            )[0].tolist()

    free = [reference(t, None) for t in BATCH_TEXTS]
    # An end-of-sequence token one row meets early, so that rows leave the batch at different steps.
    stop = free[1][len(m.tokenizer(BATCH_TEXTS[1])["input_ids"]) + 2]
    want = [reference(t, stop) for t in BATCH_TEXTS]
    saved = m.stop_ids
    m.stop_ids = frozenset([stop])
    try:
        rows = run(hooks, m, texts=BATCH_TEXTS, generation=gen(8)).rows
    finally:
        m.stop_ids = saved
    assert len({len(w) - r.prompt_tokens for w, r in zip(want, rows, strict=True)}) > 1  # they did leave apart
    assert [r.token_ids for r in rows] == want


def test_a_batch_seeds_one_generator_per_row(hooks, loaded):
    m = loaded["gpt2"]
    params = gen(10, temperature=1.0, seed=11)
    alone = [run(hooks, m, texts=(t,), generation=params).rows[0].token_ids for t in BATCH_TEXTS]
    assert [r.token_ids for r in run(hooks, m, texts=BATCH_TEXTS, generation=params).rows] == alone


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_states_are_rows_of_one_pass_over_the_final_sequence(hooks, loaded, arch):
    m = loaded[arch]
    layers = resolve_layers([0, 2, -1], m.num_layers)
    streamed: list[tuple[int, dict[str, Any]]] = []
    capture = Capture(layers=layers, positions="last", stream_states=True)
    row = run(hooks, m, capture, generation=gen(9), on_token=lambda r, t, p, x: streamed.append((t, x["states"]))).rows[
        0
    ]
    assert [t for t, _ in streamed] == row.generated_ids and len(streamed) == 9
    ref = hidden_states(m, row.token_ids)
    for i, (_, states) in enumerate(streamed):
        for sel in layers:
            assert states[sel.key].shape == (1, m.hidden_size)
            assert rel_err(states[sel.key], ref[sel.index][0, row.prompt_tokens + i : row.prompt_tokens + i + 1]) < 1e-4
    for sel in layers:  # the final state is the last streamed one
        assert torch.equal(row.states[sel.key], streamed[-1][1][sel.key])


def eager_attentions(model: Any, ids: list[int]) -> tuple[Any, ...]:
    net = model.model
    before = net.config._attn_implementation
    net.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return net(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        net.set_attn_implementation(before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_attention_equals_eager_output_attentions(hooks, loaded, arch, positions):
    m = loaded[arch]
    assert m.model.config._attn_implementation == "sdpa"
    layers = resolve_layers("all", m.num_layers)
    capture = Capture(layers=layers, positions=positions, states=False, attention=True)
    generation = gen(7) if m.can_generate else None
    rows = run(hooks, m, capture, texts=BATCH_TEXTS, generation=generation).rows
    assert m.model.config._attn_implementation == "sdpa"  # switched back after the request
    for row in rows:
        total = len(row.token_ids)
        ref = eager_attentions(m, row.token_ids)
        assert row.states == {} and set(row.attentions) == {s.key for s in layers if s.index > 0}
        for sel in layers[1:]:
            want = ref[sel.index - 1][0]  # block i produces hidden state i
            want = want[:, -1:] if positions == "last" else want
            got = row.attentions[sel.key]
            assert got.shape == want.shape and got.shape[-1] == total
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
def test_generated_tokens_keys_past_a_sliding_window_are_transformers_own(hooks, tiny_root, arch):
    """Past a sliding window the cache holds the last window's keys only: a generated token's attention weights,
    pattern and scores are still over every key of its row, at each key's own position (0, or the masked score,
    for keys out of the window), as eager ``output_attentions`` over the final sequence has them."""
    from loom_transformers.attention import MASKED

    path = build_tiny_model(arch, tiny_root, name=f"tiny-{arch}-window4", sliding_window=4)
    m = hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)
    points = ("blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores")  # block 0 slides in each family
    weights = Capture(layers=resolve_layers([1], m.num_layers), positions="all", states=False, attention=True)
    row = run(hooks, m, weights, generation=gen(5)).rows[0]
    (sites,) = run(hooks, m, Capture(sites=points, positions="all"), generation=gen(5)).rows
    assert sites.token_ids == row.token_ids and len(row.generated_ids) == 5 and row.prompt_tokens > 4
    want = eager_attentions(m, row.token_ids)[0][0]  # [heads, T, T]
    total = len(row.token_ids)
    pattern = sites.states[points[0]].transpose(0, 1)  # [T, heads, keys] -> [heads, T, keys]
    scores = sites.states[points[1]].transpose(0, 1)
    for got in (row.attentions["1"], pattern):
        assert got.shape == (want.shape[0], total, total)
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(scores == MASKED, want == 0)  # masked: the causal triangle and the keys out of the window
    torch.testing.assert_close(torch.softmax(scores, dim=-1), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt_neo", "bloom"])
def test_own_attention_scores_and_pattern_in_a_left_padded_generating_batch_are_transformers_own(
    hooks, tiny_root, arch
):
    """GPT-Neo computes its attention in its own ``_attn`` (unscaled scores, a local window at block 1), BLOOM in its
    attention module's ``forward`` (ALiBi from each row's first token): in one left-padded batch generating with the
    KV cache (a decoding step's one query over every key so far), each row's pattern at two blocks is transformers'
    eager ``output_attentions`` over the row's final sequence alone, its scores masked (MASKED) exactly where those
    weights are 0 and their softmax the pattern. Edits there (a head's pattern zeroed, generated tokens' scores
    scaled) give each row of the batch what it gives alone."""
    from loom_transformers.attention import MASKED

    path = build_tiny_model(arch, tiny_root)  # GPT-Neo: window 4 at block 1, shorter than the rows
    m = hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)
    points = tuple(f"blocks.{i}.attn.hook_{x}" for i in (0, 1) for x in ("pattern", "attn_scores"))
    capture = Capture(sites=points, positions="all")
    rows = run(hooks, m, capture, texts=BATCH_TEXTS, generation=gen(5)).rows
    assert len({r.prompt_tokens for r in rows}) > 1  # left padding in the batch
    for row in rows:
        want = eager_attentions(m, row.token_ids)
        total = len(row.token_ids)
        for i in (0, 1):
            pattern = row.states[f"blocks.{i}.attn.hook_pattern"].transpose(0, 1)  # -> [heads, T, keys]
            scores = row.states[f"blocks.{i}.attn.hook_attn_scores"].transpose(0, 1)
            assert pattern.shape == want[i][0].shape == (want[i].shape[1], total, total)
            torch.testing.assert_close(pattern.float(), want[i][0], rtol=1e-4, atol=1e-5)
            assert torch.equal(scores == MASKED, want[i][0] == 0)  # later keys, and keys out of block 1's window
            torch.testing.assert_close(torch.softmax(scores, dim=-1), want[i][0], rtol=1e-4, atol=1e-5)
    edits = (
        Intervention(site="blocks.1.attn.hook_pattern", op="zero", heads=(2,)),
        Intervention(site="blocks.0.attn.hook_attn_scores", op="scale", scale=0.5, positions="generated"),
    )
    batched = run(hooks, m, capture, texts=BATCH_TEXTS, generation=gen(5), interventions=(edits,) * 4).rows
    for text, row in zip(BATCH_TEXTS, batched, strict=True):
        (one,) = run(hooks, m, capture, texts=(text,), generation=gen(5), interventions=(edits,)).rows
        assert row.token_ids == one.token_ids
        for key in points:
            torch.testing.assert_close(row.states[key], one.states[key], rtol=1e-4, atol=1e-5)
        assert not row.states["blocks.1.attn.hook_pattern"][:, 2].any()


@pytest.mark.parametrize("post_ln", [False, True])
def test_opts_flattened_mlp_side_is_each_rows_own_in_a_left_padded_generating_batch(hooks, tiny_root, post_ln):
    """OPT's block runs its MLP side (the second norm, fc1, fc2) on the batch flattened to [B * T, d]: the points
    there, and edits at them, are each row's own in a left-padded batch generating with the KV cache, the same as
    the row alone (OPT-350m's form too: post-LN, project_out's output at index N)."""
    form = {"do_layer_norm_before": False, "word_embed_proj_dim": 32} if post_ln else {}
    path = build_tiny_model("opt", tiny_root, name=f"opt-flat-{post_ln}", perturb_norms=True, **form)
    m = hooks.load(model=resolve_model(str(path)), loader="transformers", options=LoadOptions(), kernel=None)
    n = m.num_layers
    points = tuple(f"blocks.1.{x}" for x in ("ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_post", "hook_mlp_out"))
    capture = Capture(layers=resolve_layers([1, n], n), sites=points, positions="all")
    edits = (
        Intervention(site="blocks.0.ln2.hook_scale", op="scale", scale=2.0, positions=[1, -1]),
        Intervention(site="blocks.1.mlp.hook_post", op="scale", scale=0.5, positions="generated"),
        Intervention(site="blocks.2.ln2.hook_normalized", op="zero", positions=[-1]),
    )
    batched = run(hooks, m, capture, texts=BATCH_TEXTS, generation=gen(5), interventions=(edits,) * 4).rows
    assert len({r.prompt_tokens for r in batched}) > 1  # left padding in the batch
    for text, row in zip(BATCH_TEXTS, batched, strict=True):
        (one,) = run(hooks, m, capture, texts=(text,), generation=gen(5), interventions=(edits,)).rows
        assert row.token_ids == one.token_ids
        assert set(row.states) == set(one.states) == {"1", str(n), *points}
        for key in row.states:
            torch.testing.assert_close(row.states[key], one.states[key], rtol=1e-4, atol=1e-5)
    assert batched[0].states[str(n)].shape[-1] == (32 if post_ln else m.hidden_size)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_top_logprobs_and_logits_equal_log_softmax_of_transformers_logits(hooks, loaded, arch):
    m = loaded[arch]
    capture = Capture(top_logprobs=5, logits=True)
    rows = run(hooks, m, capture, texts=BATCH_TEXTS[:2], generation=gen(6, temperature=0.8, seed=3)).rows
    for row in rows:
        with torch.inference_mode():
            logits = m.model(input_ids=torch.tensor([row.token_ids])).logits[0].float()
        steps = logits[row.prompt_tokens - 1 : len(row.token_ids) - 1]
        want = torch.log_softmax(steps, dim=-1)
        assert len(row.logprobs) == len(row.generated_ids) and row.logits.shape == steps.shape
        torch.testing.assert_close(row.logits, steps, rtol=1e-4, atol=1e-4)
        for i, (entry, token) in enumerate(zip(row.logprobs, row.generated_ids, strict=True)):
            assert entry["token_id"] == token
            assert abs(entry["logprob"] - float(want[i, token])) < 1e-4
            values, ids = torch.topk(want[i], 5)
            assert [t for t, _ in entry["top"]] == ids.tolist()
            assert max(abs(v - w) for (_, v), w in zip(entry["top"], values.tolist(), strict=True)) < 1e-4
