"""The geometric-analysis demo (demo/geometric_analysis.py) end to end: a real server, two tiny models, every output."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from serverutil import REPO, loom_server

pytestmark = pytest.mark.slow

PNGS = ("deff_by_layer.png", "beta_by_layer.png", "norms_by_layer.png", "model_comparison.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hidden states are the activations a transformer computes at every layer.",
    "Numbers like 1, 2, 3 and 42 appear in text as well as words.",
    "Hello world! How are you today?",
]


def load_demo(name: str = "geometric_analysis"):
    """A demo script, imported fresh as a module so that a test may change its constants."""
    spec = importlib.util.spec_from_file_location(f"{name}_demo", REPO / "demo" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_demo_runs_end_to_end_on_tiny_models(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    demo = load_demo()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment line\n\n" + "\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    models = {"bert": str(tiny_models["bert"]), "llama": str(tiny_models["llama"])}
    with loom_server([], tmp_path) as (base, _, _):
        argv = ["--server", base, "--out", str(out), "--prompts", str(prompts)]
        assert demo.main([*argv, "--model", models["bert"], "--model", models["llama"]]) == 0

    for name in PNGS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name

    report = json.loads((out / "metrics.json").read_text())
    assert report["rows"] == "tokens" and report["prompts"] == PROMPTS
    assert [m["label"] for m in report["models"]] == [Path(p).name for p in models.values()]
    states = np.load(out / "states.npz")
    for m in report["models"]:
        n, h = m["num_layers"], m["hidden_size"]
        assert [x["layer_index"] for x in m["layers"]] == list(range(n + 1))  # 0 (embeddings) included
        assert m["rows"] == sum(m["token_counts"]) > len(PROMPTS)  # tokens: more rows than prompts
        assert m["cross_check"]["agrees"], m["cross_check"]
        for x in m["layers"]:
            values = [x[k] for k in ("deff_entropy", "deff_90", "beta", "norm_mean", "norm_std")]
            assert all(v is not None and math.isfinite(v) for v in values), x
            assert 1.0 <= x["deff_entropy"] <= x["rank"] + 1e-9 and 1 <= x["deff_90"] <= x["rank"] <= min(m["rows"], h)
            assert x["normalized_depth"] == x["layer_index"] / n
            matrix = states[f"{m['label']}/layer_{x['layer_index']:02d}"]
            assert matrix.shape == (m["rows"], h) and matrix.dtype == np.float16
        assert states[f"{m['label']}/row_tokens"].shape == (m["rows"],)

    summary = (out / "summary.md").read_text()
    assert all(f"## {m['label']}" in summary for m in report["models"])


def test_interventions_demo_runs_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """demo/interventions.py against a real server: steering moves the target token's log-probability monotonically
    with the scale, the ablated direction leaves no projection, and the patch table has a row per block."""
    demo = load_demo("interventions")
    demo.STEER_TOKEN = " the"  # tokens of the tiny tokenizer
    demo.CLEAN, demo.CORRUPTED = "The cat sat on the mat", "The cap sat on the mat"
    demo.PATCH_METRIC = {"type": "logit_diff", "correct": " the", "incorrect": "."}
    model = str(tiny_models["gpt2"])  # pydoc-gpt2's architecture
    out = tmp_path / "out"
    with loom_server(["--preload", model], tmp_path) as (base, _, _):
        report = demo.main(["--server", base, "--model", model, "--layer", "2", "--out", str(out)])
    files = ["attribution.png", "dla.png", "interventions.json", "interventions.md", "patching.png"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert (out / "patching.png").read_bytes().startswith(PNG_MAGIC)
    rows = report["steering"]["rows"]
    assert [r["scale"] for r in rows] == list(demo.SCALES)
    assert len({round(r["logprob_file"], 6) for r in rows}) == len(rows)  # every scale moves it
    assert report["ablation"]["max_projection_after_ablation"] < 1e-5
    assert len(report["ablation"]["head_zeroed_change"]) == 3
    patch = report["patching"]
    assert patch["sites"] == [f"blocks.{i}.hook_resid_pre" for i in range(3)] and patch["calls"] >= 1
    assert json.loads((out / "interventions.json").read_text())["patching"]["runs"] == patch["runs"]
    circuits = report["circuits"]  # a head knocked out through its pattern, a neuron zeroed and doubled
    assert abs(sum(circuits["head"]["pattern"]) - 1) < 1e-5 and len(circuits["head"]["pattern"]) == len(
        circuits["tokens"]
    )
    lps = [
        circuits[k] for k in ("knocked_out_logprob_file", "neuron_zeroed_logprob_file", "neuron_doubled_logprob_file")
    ]
    assert all(math.isfinite(v) and v != circuits["baseline_logprob_file"] for v in lps)
    assert "## Circuit edits" in (out / "interventions.md").read_text()
    dla = report["dla"]  # the components sum to the model's own logit difference
    assert (
        abs(dla["layers"]["sum"] - dla["layers"]["logit"]) < 1e-4
        and abs(dla["heads"]["sum"] - dla["layers"]["sum"]) < 1e-4
    )
    scatter = report["attribution_patching"]
    assert np.shape(scatter["attribution"]) == np.shape(scatter["exact_effect"]) == (3, len(patch["positions"]))


def test_readouts_demo_runs_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """demo/readouts.py against a real server: a lens row per block, the probe's accuracies, a stop by the probe."""
    demo = load_demo("readouts")
    demo.ANSWER = " the"  # a token of the tiny tokenizer
    model = str(tiny_models["llama"])
    out = tmp_path / "out"
    with loom_server(["--preload", model], tmp_path) as (base, _, _):
        report = demo.main(["--server", base, "--model", model, "--layer", "2", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["logit_lens.png", "readouts.json", "readouts.md"]
    assert (out / "logit_lens.png").read_bytes().startswith(PNG_MAGIC)
    lens = report["lens"]
    assert lens["layers"] == [1, 2, 3] and all(len(row) == len(lens["tokens"]) for row in lens["top"])
    probe = report["probe"]
    assert 0 <= probe["cv_accuracy"] <= 1 and probe["train_accuracy"] >= probe["cv_accuracy"] - 1e-9
    stopped = probe["stopped"]
    assert stopped["finish_reason"] == "probe"  # the bound is the median of the generated tokens' scores
    assert stopped["stopped_by"]["score"] > probe["stop_above"]
