"""D_eff (entropy and 90%-variance forms), beta and norms against values worked out by hand on small matrices, and
/analyze against them on transformers' own states (beta against numpy's rank and scipy's slope)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from loom_geometry.metrics import beta, deff_90, deff_entropy, layer_metrics, spectrum


def with_singular_values(values: list[float], width: int, seed: int = 0) -> np.ndarray:
    """A matrix [len(values), width] whose singular values are exactly ``values`` (random orthogonal U, V)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(width, n)))
    return u @ np.diag(values) @ v.T


def test_rank_one_uses_one_dimension():
    row = np.arange(1.0, 9.0)
    m = layer_metrics(np.stack([row, 2 * row, -3 * row]))
    assert m["rank"] == 1
    assert m["deff_entropy"] == pytest.approx(1.0)
    assert m["deff_90"] == 1
    assert math.isnan(m["beta"])  # one point: no slope


def test_isotropic_uses_every_dimension():
    m = layer_metrics(np.eye(10) * 3.0)
    assert m["deff_entropy"] == pytest.approx(10.0)
    assert m["deff_90"] == 9  # 9 of 10 equal directions hold exactly 90%
    assert m["beta"] == pytest.approx(0.0, abs=1e-9)
    assert m["norm_mean"] == pytest.approx(3.0) and m["norm_std"] == pytest.approx(0.0)


def test_a_known_power_law_spectrum():
    # s_i = i^-1, so s_i^2 = i^-2: beta 2; p_i = i^-2 / sum_j j^-2.
    n = 8
    s = [1.0 / i for i in range(1, n + 1)]
    p = np.array([x * x for x in s]) / sum(x * x for x in s)
    want_entropy = math.exp(-sum(q * math.log(q) for q in p))
    want_90 = next(k for k in range(1, n + 1) if p[:k].sum() >= 0.9)
    s2 = spectrum(with_singular_values(s, width=32))
    np.testing.assert_allclose(s2, [x * x for x in s], rtol=1e-9)
    assert deff_entropy(s2) == pytest.approx(want_entropy, rel=1e-9)
    assert deff_90(s2) == want_90 == 4  # 1 + 1/4 + 1/9 = 1.361 of 1.527 is 0.891 < 0.9; with 1/16, 0.932
    assert beta(s2) == pytest.approx(2.0, rel=1e-9)


def test_two_equal_directions():
    s2 = spectrum(with_singular_values([2.0, 2.0], width=5))
    assert deff_entropy(s2) == pytest.approx(2.0)
    assert deff_90(s2) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_tensors_are_computed_in_float64(dtype):
    x = torch.tensor(with_singular_values([3.0, 1.0, 0.5], width=16), dtype=dtype)
    m = layer_metrics(x)
    ref = layer_metrics(x.float().numpy())
    assert m == pytest.approx(ref)
    assert all(math.isfinite(v) for k, v in m.items() if k != "beta")


def test_a_single_vector_and_bad_shapes():
    assert layer_metrics(np.ones(4))["deff_entropy"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        spectrum(np.zeros((2, 3, 4)))
    assert layer_metrics(np.zeros((3, 4)))["deff_entropy"] == 0.0


@pytest.mark.parametrize("rows", ["last", "mean", "tokens"])
async def test_analyze_matches_metrics_of_transformers_own_states(tiny_models, rows):
    """POST /analyze against the metrics of the states transformers itself returns, row choice by row choice."""
    from litestar.testing import AsyncTestClient
    from test_models import app_with
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = str(tiny_models["llama"])
    texts = ["the cat sat on the mat", "hello", "one two three four five", "a b c"]
    async with AsyncTestClient(app=app_with()) as c:
        r = await c.post(
            "/analyze", json={"model": model, "texts": texts, "hidden_state_layers": [0, -1], "rows": rows}
        )
        assert r.status_code == 200, r.text
        body = r.json()
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    tok = AutoTokenizer.from_pretrained(model)
    with torch.inference_mode():
        states = [net(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states for t in texts]
    for key, index in (("0", 0), ("-1", len(states[0]) - 1)):
        per_text = [s[index][0] for s in states]
        if rows == "last":
            matrix = torch.stack([s[-1] for s in per_text])
        elif rows == "mean":
            matrix = torch.stack([s.mean(0) for s in per_text])
        else:
            matrix = torch.cat(per_text)
        want = layer_metrics(matrix)
        got = body["layers"][key]
        assert got["rows"] == matrix.shape[0] and got["layer_index"] == index
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def reference_beta(matrix: np.ndarray) -> float:
    """beta as numpy and scipy compute the statistic: minus the least-squares slope of log s_i^2 on log i over the
    matrix's non-zero singular values (numpy's rank decides which); NaN, no slope, with fewer than two."""
    import scipy.stats  # scikit-learn's dependency (the interp plugin's), not the geometry plugin's

    x = np.asarray(matrix, dtype=np.float64)
    s = np.linalg.svd(x, compute_uv=False)[: np.linalg.matrix_rank(x)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that one point has no slope
        fit = scipy.stats.linregress(np.log(np.arange(1, s.size + 1)), np.log(s**2))
    return -float(fit.slope)


async def test_beta_where_the_states_span_one_direction_is_a_422_naming_texts(tiny_models):
    """Identical texts, or one text with a row per text, give every layer a rank-1 matrix: one point, no slope, so
    no beta (the reference's NaN, which JSON would carry as null); the server says so, naming texts and the layer,
    and answers the reference's beta as soon as the states span two directions."""
    from litestar.testing import AsyncTestClient
    from test_models import app_with
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = str(tiny_models["llama"])
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    tok = AutoTokenizer.from_pretrained(model)

    def states(texts: list[str], index: int, rows: str) -> np.ndarray:
        with torch.inference_mode():
            per_text = [
                net(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states[index][0] for t in texts
            ]
        if rows == "tokens":
            return torch.cat(per_text).double().numpy()
        return torch.stack([s[-1] if rows == "last" else s.mean(0) for s in per_text]).double().numpy()

    same = ["the cat sat on the mat"] * 3
    layers = {"0": 0, "-1": net.config.num_hidden_layers}
    async with AsyncTestClient(app=app_with()) as c:
        for texts, rows in ((same, "last"), (same, "mean"), (same[:1], "last")):
            for index in layers.values():
                assert np.linalg.matrix_rank(states(texts, index, rows)) == 1
                assert math.isnan(reference_beta(states(texts, index, rows)))
            body = {"model": model, "texts": texts, "hidden_state_layers": [0, -1], "rows": rows}
            r = await c.post("/analyze", json=body)
            assert r.status_code == 422, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            problem = r.json()
            assert problem["field"] == "texts" and problem["layer"] == "0", problem
            assert "beta" in problem["detail"] and "rank 1" in problem["detail"], problem
        for texts, rows in ((same[:1], "tokens"), ([*same, "one two three"], "last")):
            body = {"model": model, "texts": texts, "hidden_state_layers": [0, -1], "rows": rows}
            r = await c.post("/analyze", json=body)
            assert r.status_code == 200, r.text
            for key, index in layers.items():
                want = reference_beta(states(texts, index, rows))
                assert math.isfinite(want) and r.json()["layers"][key]["beta"] == pytest.approx(want, rel=1e-4)


async def test_analyze_in_bfloat16_and_bad_fields(tiny_models):
    from litestar.testing import AsyncTestClient
    from test_models import app_with

    model = str(tiny_models["llama"])
    async with AsyncTestClient(app=app_with()) as c:
        r = await c.post("/analyze", json={"model": model, "texts": ["a b c", "hello there"], "dtype": "bfloat16"})
        assert r.status_code == 200, r.text
        layers = r.json()["layers"]
        assert len(layers) == r.json()["metadata"]["num_layers"]
        assert all(math.isfinite(m["deff_entropy"]) and m["deff_entropy"] >= 1 for m in layers.values())
        bad = await c.post("/analyze", json={"model": model, "texts": ["x"], "hidden_state_layers": [99]})
        assert bad.status_code == 422 and bad.json()["field"] == "hidden_state_layers"
        bad = await c.post("/analyze", json={"model": model, "texts": ["x"], "rows": "some"})
        assert bad.status_code == 422 and bad.json()["field"] == "rows"
        assert (await c.post("/analyze", json={"model": model, "texts": []})).status_code == 422
        context = (await c.post("/models/load", json={"model": model})).json()["model"]["max_context"]
        long = " ".join(["w"] * (context + 8))  # within the character bound, past the context in tokens
        bad = await c.post("/analyze", json={"model": model, "texts": ["fine", long]})
        assert bad.status_code == 422 and bad.json()["field"] == "texts[1]" and bad.json()["row"] == 1, bad.text
        assert bad.json()["detail"].startswith("texts[1]: "), bad.text  # field and detail name the same row
        assert bad.json()["detail"].startswith("texts[1]: ")


async def test_analyze_keeping_more_than_max_capture_mb_is_a_422_before_any_pass(tiny_models):
    """Every layer at every token of 256 texts of a long context is tens of GB on a real model: what /analyze keeps is
    estimated before the pass and refused over geometry.max_capture_mb, naming texts and how many of them fit (which
    then pass); rows "last" keeps one position a text, and passes."""
    from litestar.testing import AsyncTestClient
    from test_models import app_with

    model = str(tiny_models["llama"])
    texts = [f"text number {i} " * 4 for i in range(8)]
    async with AsyncTestClient(app=app_with(options={"geometry_max_capture_mb": 0.25})) as c:
        await c.post("/models/load", json={"model": model})

        async def passes() -> int:
            listed = (await c.get("/models")).json()["loaded_models"]
            return next(m["batches"] for m in listed if m["model_id"] == model)

        before = await passes()
        body = {"model": model, "texts": texts, "hidden_state_layers": "all", "rows": "tokens"}
        r = await c.post("/analyze", json=body)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["title"] == "Capture too large" and problem["field"] == "texts", problem
        assert problem["estimate_bytes"] > problem["limit_bytes"] == 2**18
        assert await passes() == before  # refused before any pass
        fit = int(problem["allowed"].split()[2])
        assert 1 <= fit < len(texts), problem
        r = await c.post("/analyze", json={**body, "texts": texts[:fit]})
        assert r.status_code == 200, r.text
        r = await c.post("/analyze", json={**body, "rows": "last"})
        assert r.status_code == 200, r.text
