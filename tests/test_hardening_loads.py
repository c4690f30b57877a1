"""Loads that must fail cleanly, against a real `loom serve` process: configs that claim more memory than the
budget (507 before anything is allocated), loads that fail after allocating (their memory given back), model ids
and model directories that used to answer 500 (each a 4xx naming ``model``), and ``models.allowed_paths`` (403
whether or not the path exists)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from loom_transformers.testing import build_tiny_model
from serverutil import loom_server, rss_bytes

MiB = 2**20
PROBLEM = "application/problem+json"


def edited(base: Path, where: Path, **config: object) -> Path:
    """A copy of the model at ``base`` with keys of its config.json replaced."""
    shutil.copytree(base, where)
    data = json.loads((where / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**data, **config}))
    return where


class OpensAFile:
    """Unpickled, it would create ``path``: the stand-in for code hidden in a pickled checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("hardening")
    good = build_tiny_model("llama", root, name="good")
    out = {"good": good, "good2": root / "good2"}
    shutil.copytree(good, out["good2"])
    # The review's case: a 4M-token vocabulary claimed beside a weights file of a few hundred KB (~2 GB in float32).
    out["claims_4m_vocab"] = edited(good, root / "claims_4m_vocab", vocab_size=4_000_000, hidden_size=128)
    out["claims_exabytes"] = edited(good, root / "claims_exabytes", vocab_size=4 * 10**12)
    # A kind of model the loader refuses is refused as such, whatever its size.
    out["huge_encoder_decoder"] = edited(
        good, root / "huge_encoder_decoder", vocab_size=4 * 10**12, is_encoder_decoder=True
    )
    # 2 x 256 MiB of embeddings (input and output) that transformers allocates before it finds the weights' shapes.
    out["mismatched"] = edited(good, root / "mismatched", vocab_size=1_000_000)
    out["bad_config"] = edited(good, root / "bad_config", hidden_size="big")
    remote = edited(
        good,
        root / "remote_code",
        model_type="evilnet",
        architectures=["EvilForCausalLM"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"},
    )
    (remote / "evil.py").write_text(f"open({str(root / 'remote_code_ran')!r}, 'w').close()\n")
    out["remote_code"] = remote
    # The same auto_map on a model type transformers knows: its own class loads, the code beside it never runs.
    known = edited(good, root / "known_auto_map", auto_map=json.loads((remote / "config.json").read_text())["auto_map"])
    (known / "evil.py").write_text(f"open({str(root / 'known_auto_map_ran')!r}, 'w').close()\n")
    out["known_auto_map"] = known
    # A config saying 400 layers beside 4 layers of weights (396 blocks would be random), and one saying fewer.
    layers = json.loads((good / "config.json").read_text())["num_hidden_layers"]
    out["claims_400_layers"] = edited(good, root / "claims_400_layers", num_hidden_layers=400)
    out["claims_fewer_layers"] = edited(good, root / "claims_fewer_layers", num_hidden_layers=layers - 1)
    # A model directory without tokenizer files: transformers would build an empty tokenizer for it.
    shutil.copytree(good, root / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (root / "no_tokenizer" / name).unlink(missing_ok=True)
    out["no_tokenizer"] = root / "no_tokenizer"
    state = load_file(str(good / "model.safetensors"))
    for name, extra in (("pickled", {}), ("unsafe_pickle", {"x": OpensAFile(root / "pickle_ran")})):
        shutil.copytree(good, root / name)
        (root / name / "model.safetensors").unlink()
        torch.save({**state, **extra}, root / name / "pytorch_model.bin")
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """One server with default settings on the CPU: (base URL, pid)."""
    home = tmp_path_factory.mktemp("home")
    with loom_server([], home, LOOM_DEFAULT_DEVICE="cpu") as (base, _, proc):
        yield base, proc.pid


def load(base: str, model: str) -> httpx.Response:
    return httpx.post(f"{base}/models/load", json={"model": model}, timeout=300)


def assert_problem(r: httpx.Response, status: int, *says: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert problem["field"] == "model", problem
    for text in says:
        assert text in problem["detail"], problem
    return problem


def assert_still_serving(base: str, model: Path) -> None:
    assert httpx.get(f"{base}/health").status_code == 200
    r = httpx.post(f"{base}/extract", json={"model": str(model), "text": "still here"}, timeout=300)
    assert r.status_code == 200, r.text


def test_a_config_claiming_more_than_the_budget_is_refused_before_loading(models, tmp_path):
    """The weight files are tiny; the config's claim alone is over the budget (1 GiB here): 507 naming both."""
    fraction = 1024 * MiB / (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with loom_server([], tmp_path, LOOM_DEFAULT_DEVICE="cpu", LOOM_MEMORY_FRACTION=str(fraction)) as (base, _, proc):
        assert load(base, str(models["good"])).status_code == 200  # torch and transformers are in the baseline
        before = rss_bytes(proc.pid)
        for name in ("claims_4m_vocab", "claims_exabytes"):
            problem = assert_problem(load(base, str(models[name])), 507, "memory_fraction", "MiB")
            assert problem["needed_bytes"] > problem["budget_bytes"] > 0
        assert_problem(load(base, str(models["huge_encoder_decoder"])), 422, "encoder-decoder")
        assert rss_bytes(proc.pid) - before < 100 * MiB  # refused before transformers allocated anything
        loaded = [m["model_id"] for m in httpx.get(f"{base}/models").json()["loaded_models"]]
        assert loaded == [str(models["good"])]
        assert load(base, str(models["good2"])).status_code == 200
        assert_still_serving(base, models["good"])


def test_loads_that_fail_after_allocating_give_the_memory_back(server, models):
    """A checkpoint that does not match its config fails after transformers allocated its ~512 MiB: a 422 each
    time, and the process's resident memory returns to where it was."""
    base, pid = server
    assert load(base, str(models["good"])).status_code == 200  # torch and transformers are in the baseline
    before = rss_bytes(pid)
    for _ in range(3):
        assert_problem(load(base, str(models["mismatched"])), 422, "the checkpoint does not match its config")
    assert rss_bytes(pid) - before < 150 * MiB
    assert [m["model_id"] for m in httpx.get(f"{base}/models").json()["loaded_models"]] == [str(models["good"])]
    assert load(base, str(models["good2"])).status_code == 200
    assert_still_serving(base, models["good"])


@pytest.mark.parametrize(
    ("model", "status", "says"),
    [
        ("~nosuchuser", 404, "no directory ~nosuchuser"),
        ("~nosuchuser/models/x", 404, "no directory"),
        ("m" * 10_000, 422, "longer than any path"),
        ("/" + "m" * 10_000, 422, "longer than any path"),
        ("bad_config", 422, "config.json is invalid"),
        ("remote_code", 403, "models.trust_remote_code"),
        ("unsafe_pickle", 422, "refused as unsafe"),
        ("claims_400_layers", 422, "weights its config.json describes are missing from the checkpoint"),
        ("claims_fewer_layers", 422, "weights in the checkpoint have no place in the model"),
        ("no_tokenizer", 422, "no usable tokenizer"),
    ],
)
def test_bad_model_ids_and_directories_are_4xx_naming_the_model(server, models, model, status, says):
    base, _ = server
    target = str(models[model]) if model in models else model
    assert_problem(load(base, target), status, says)
    assert_still_serving(base, models["good"])


@pytest.mark.parametrize(("model", "status"), [("bad_config", 422), ("remote_code", 403), ("unsafe_pickle", 422)])
def test_sentence_transformers_answers_the_same_statuses(server, models, model, status):
    """One classification for every loader: sentence-transformers meets the same faults through transformers."""
    base, _ = server
    body = {"model": str(models[model]), "loader": "sentence_transformers"}
    r = httpx.post(f"{base}/models/load", json=body, timeout=300)
    assert_problem(r, status, "sentence-transformers could not load")


def test_no_code_from_a_refused_model_runs(server, models):
    """Neither the remote-code module beside config.json nor the object hidden in the pickle was ever executed."""
    base, _ = server
    for name in ("remote_code", "unsafe_pickle"):
        assert load(base, str(models[name])).status_code in (403, 422)
    root = models["good"].parent
    assert not (root / "remote_code_ran").exists() and not (root / "pickle_ran").exists()


def test_an_auto_map_on_a_model_type_transformers_knows_loads_without_its_code(server, models):
    """transformers' own class for the model type; the module the auto_map names is never imported."""
    base, _ = server
    assert load(base, str(models["known_auto_map"])).status_code == 200
    assert_still_serving(base, models["known_auto_map"])
    assert not (models["good"].parent / "known_auto_map_ran").exists()


def test_a_masked_lm_checkpoint_loads_as_its_encoder(server, tmp_path):
    """Its task head (cls.*) has no place in the encoder and its pooler is missing: neither is a state Loom reports,
    so the load is no mismatch, and the states equal transformers' own."""
    import numpy as np
    import torch
    import transformers
    from loom_transformers.testing import train_tokenizer

    tokenizer = train_tokenizer("bert")
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    base, _ = server
    body = {"model": str(tmp_path / "mlm"), "text": "the quick brown fox", "hidden_state_layers": [1, 2]}
    r = httpx.post(f"{base}/extract", json=body, timeout=300)
    assert r.status_code == 200, r.text
    encoder = transformers.AutoModel.from_pretrained(tmp_path / "mlm")
    with torch.no_grad():
        want = encoder(**tokenizer("the quick brown fox", return_tensors="pt"), output_hidden_states=True)
    for layer in (1, 2):
        got = np.asarray(r.json()["hidden_states"][str(layer)]["data"])
        np.testing.assert_allclose(got, want.hidden_states[layer][0, -1:].numpy(), atol=1e-5)


def test_a_pickle_of_plain_tensors_still_loads(server, models):
    """Pickled checkpoints are read with weights_only: one that holds only tensors is safe, and loads."""
    base, _ = server
    assert load(base, str(models["pickled"])).status_code == 200
    assert_still_serving(base, models["pickled"])


def test_allowed_paths_answer_403_whether_or_not_the_path_exists(models, tmp_path):
    allowed = tmp_path / "allowed"
    inside = allowed / "model"
    shutil.copytree(models["good"], inside)
    outside, missing = models["good2"], models["good2"].parent / "no-such-model"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": {"allowed_paths": [str(allowed)]},
                "custom_models": {
                    "custom-outside": {"factory": "pkg:build", "path": str(outside)},
                    "custom-missing": {"factory": "pkg:build", "path": str(missing)},
                },
            }
        )
    )
    with loom_server(["--config", str(config)], tmp_path, LOOM_DEFAULT_DEVICE="cpu") as (base, _, _):
        relative_outside = os.path.relpath(outside, Path(__file__).resolve().parents[1])  # from the server's cwd
        details = {}
        for model in (str(outside), str(missing), "./" + relative_outside, "~nosuchuser/x", "~root", "custom-outside"):
            details[model] = assert_problem(load(base, model), 403, "outside models.allowed_paths")["detail"]
        # A home is named as sent, as one that does not exist is: which users exist is not for callers to learn.
        assert details["~root"] == details["~nosuchuser/x"].replace("~nosuchuser/x", "~root")
        assert_problem(load(base, "custom-missing"), 403, "outside models.allowed_paths")
        # The same answer, path aside, for what exists and what does not.
        assert details[str(outside)].replace(str(outside), "P") == details[str(missing)].replace(str(missing), "P")
        probe = httpx.get(f"{base}/loaders/probe/{missing}")
        assert probe.status_code == 403
        assert_problem(load(base, str(allowed / "no-such-model")), 404, "no directory")
        assert load(base, str(inside)).status_code == 200
