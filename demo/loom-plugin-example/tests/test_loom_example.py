"""The plugin's own tests, in-process through a pluggy manager: run them after ``pip install -e .``.

They need no server and no network: the toy model is written to a temporary directory.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import loom_example
import pluggy
import pytest
import torch

from loom_kernel import Batch, Capture, GenerationParams, LoadedModel, LoadOptions, ModelRef, resolve_layers
from loom_kernel.errors import Unsupported
from loom_kernel.plugins import create_plugin_manager


@pytest.fixture
def pm() -> pluggy.PluginManager:
    # Only the kernel's default pooling plus this plugin, registered under its entry point's name, so the tests
    # do not depend on which other plugins are installed.
    pm = create_plugin_manager(load_entry_points=False)
    pm.register(loom_example, name=loom_example.NAME)
    pm.check_pending()  # every hookimpl matches a hookspec: a misspelt hook name fails here
    return pm


@pytest.fixture
def toy(tmp_path: Path) -> ModelRef:
    path = loom_example.make_toy_model(tmp_path / "toy", seed=1)
    return ModelRef(id=str(path), path=path, config=json.loads((path / "config.json").read_text()))


@pytest.fixture
def loaded(pm: pluggy.PluginManager, toy: ModelRef) -> LoadedModel:
    return pm.hook.load(model=toy, loader="example", options=LoadOptions(), kernel=None)


def test_the_entry_point_names_the_package() -> None:
    (ep,) = [ep for ep in metadata.entry_points(group="loom") if ep.name == "example"]
    assert ep.load() is loom_example


def test_probe_scores_toy_configs_only(pm: pluggy.PluginManager, toy: ModelRef) -> None:
    (result,) = [r for r in pm.hook.probe(model=toy) if r is not None]
    assert (result.loader, result.score) == ("example", 1.0)
    other = ModelRef(id="bert", config={"model_type": "bert"})
    assert [r for r in pm.hook.probe(model=other) if r is not None] == []


def test_states_of_every_layer_match_the_module(pm: pluggy.PluginManager, loaded: LoadedModel) -> None:
    texts = ("a longer first row", "short")
    capture = Capture(layers=resolve_layers([0, 1, 2, 3], loaded.num_layers), positions="all")
    rows = pm.hook.forward_with_states(model=loaded, batch=Batch(texts=texts), capture=capture).rows
    net = loaded.model
    for text, row in zip(texts, rows, strict=True):
        ids = torch.tensor([[256, *text.encode()]])
        assert row.token_ids == ids[0].tolist() and row.positions == list(range(ids.shape[1]))
        with torch.inference_mode():  # each row alone: the padded batch must not change a row's states
            x = net.embed(ids) + net.positions(torch.arange(ids.shape[1]))
            want = [x]
            for block in net.blocks:
                x = block(x)
                want.append(x)
            want[-1] = net.norm(x)
        for index, state in enumerate(want):
            torch.testing.assert_close(row.states[str(index)], state[0], atol=1e-6, rtol=0)


def test_last_position_only(pm: pluggy.PluginManager, loaded: LoadedModel) -> None:
    capture = Capture(layers=resolve_layers(-1, loaded.num_layers), positions="last")
    (row,) = pm.hook.forward_with_states(model=loaded, batch=Batch(texts=("hi",)), capture=capture).rows
    assert row.positions == [2] and row.states["-1"].shape == (1, loaded.hidden_size)


def test_generation_is_refused_by_field(pm: pluggy.PluginManager, loaded: LoadedModel) -> None:
    batch = Batch(texts=("hi",), generation=GenerationParams(max_tokens=2))
    with pytest.raises(Unsupported) as err:
        pm.hook.forward_with_states(
            model=loaded, batch=batch, capture=Capture(layers=resolve_layers(-1, 3), positions="last")
        )
    assert err.value.field == "model"


def test_first_last_mean_pools_real_tokens_on_either_padding_side(pm: pluggy.PluginManager) -> None:
    states = torch.arange(24.0).view(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left-padded row 0, right-padded row 1
    got = pm.hook.pool(output=states, strategy="first_last_mean", mask=mask)
    want = torch.stack([(states[0, 1] + states[0, 3]) / 2, (states[1, 0] + states[1, 1]) / 2])
    torch.testing.assert_close(got, want)
    # Other names fall through to the kernel's defaults.
    torch.testing.assert_close(pm.hook.pool(output=states, strategy="max", mask=torch.ones(2, 4)), states.amax(1))


def test_the_causal_toy_generates_its_own_greedy_tokens_through_the_kernel(pm: pluggy.PluginManager, tmp_path) -> None:
    """Declared parts are all the kernel needs: generation (its engine), edits at an index and the lens."""
    path = loom_example.make_toy_model(tmp_path / "causal", seed=2, causal=True)
    ref = ModelRef(id=str(path), path=path, config=json.loads((path / "config.json").read_text()))
    model = pm.hook.load(model=ref, loader="example", options=LoadOptions(), kernel=None)
    (row,) = pm.hook.forward_with_states(
        model=model,
        batch=Batch(texts=("hi",), generation=GenerationParams(max_tokens=6, temperature=0)),
        capture=Capture(layers=resolve_layers(-1, 3), positions="last"),
    ).rows
    ids = [256, *b"hi"]
    with torch.inference_mode():  # greedy by hand: the module's own next-token choice, one token at a time
        for _ in range(6):
            ids.append(int(model.model(torch.tensor([ids]))[0, -1].argmax()))
    assert row.token_ids == ids


def test_the_lens_is_the_norm_and_head_alone_while_a_pass_has_its_hooks_on_them(
    pm: pluggy.PluginManager, tmp_path
) -> None:
    """A stream's lens runs on the output processor's thread while the model's thread runs a pass, whose hooks
    (here: an edit of index N, the final norm's output, and its recording) are on the final norm: the lens is the
    norm and the head alone. Through the hooks, the pass's edit was applied to the lens's states (or refused them)."""
    from loom_kernel.capture import StateRecorder
    from loom_kernel.editing import Layout, row_edits
    from loom_kernel.generic import declared
    from loom_kernel.types import Intervention

    path = loom_example.make_toy_model(tmp_path / "causal", seed=2, causal=True)
    ref = ModelRef(id=str(path), path=path, config=json.loads((path / "config.json").read_text()))
    model = pm.hook.load(model=ref, loader="example", options=LoadOptions(), kernel=None)
    declared(model)  # what the kernel does at load: its runner, decoder and lens for declared parts
    parts, n = model.parts, model.num_layers
    states = torch.randn(3, model.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = parts.lm_head(parts.final_norm(states)).float()
    push = Intervention(site=n, op="add", vector=torch.full((model.hidden_size,), 5.0))
    edit = row_edits([[push]], [Layout(col=0, tok=0, count=1, prompt=1)])
    with StateRecorder(model.model, parts.blocks, [n], parts.final_norm, edit, [n]) as recorder:  # a pass's hooks
        got = model.unembed(states, False)
        assert recorder.taken() == {}  # nothing of the lens's was recorded as the pass's state
    torch.testing.assert_close(got, want)
