"""Logit lens, probes, sparse autoencoders, stop rules and probe fitting, against references nobody here wrote:
transformers' own final norm and LM head, numpy on the states the server returns, SAELens's encoding formula,
scikit-learn fitted in-process."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from serverutil import HANG_S
from test_batching import arrays, together
from test_interventions import load
from test_models import app_with, concurrent_client

TEXT = "the cat sat on the mat and looked at the"


@pytest.fixture(scope="module")
def paths(tiny_root: Path) -> dict[str, str]:
    from loom_transformers.testing import build_tiny_model

    return {arch: str(build_tiny_model(arch, tiny_root)) for arch in ("llama", "gpt2", "gemma2", "bert")}


def final_parts(net: Any, arch: str) -> tuple[Any, Any]:
    base = net.transformer if arch == "gpt2" else net.model
    return (base.ln_f if arch == "gpt2" else base.norm), net.lm_head


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
async def test_logit_lens_is_the_models_own_final_norm_and_head(paths, arch):
    net, tok = load(paths[arch], arch)
    norm, head = final_parts(net, arch)
    cap = getattr(net.config, "final_logit_softcapping", None)
    with torch.inference_mode():
        out = net(**tok(TEXT, return_tensors="pt"), output_hidden_states=True)
    n = len(out.hidden_states) - 1
    word = " the"
    tid = tok(word, add_special_tokens=False)["input_ids"][0]

    def reference(i: int) -> torch.Tensor:
        with torch.inference_mode():
            x = out.hidden_states[i][0]
            logits = head(x if i == n else norm(x))
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits.double(), -1)

    async with concurrent_client(app_with()) as c:
        body = {"model": paths[arch], "text": TEXT, "positions": "all"}
        lens = {"layers": "all", "top_k": 5, "tokens": [word]}
        r = await c.post("/extract", json={**body, "logit_lens": lens})
        assert r.status_code == 200, r.text
        got = r.json()["logit_lens"]
        assert "hidden_states" in r.json() and set(r.json()["hidden_states"]) == {"-1"}  # the default, not the lens's
    assert sorted(got, key=int) == [str(k) for k in range(-n, 0)]
    for key, entry in got.items():
        want = reference(int(key) + n + 1)
        values, ids = torch.topk(want, 5, dim=-1)
        assert [[t["token_id"] for t in row] for row in entry["top_k"]] == ids.tolist(), key
        np.testing.assert_allclose([[t["logprob"] for t in row] for row in entry["top_k"]], values.numpy(), atol=1e-5)
        np.testing.assert_allclose(entry["tokens"][word]["logprob"], want[:, tid].numpy(), atol=1e-5)
        assert entry["tokens"][word]["rank"] == (want > want[:, tid : tid + 1]).sum(-1).tolist()
    # The last layer's lens is the model's own next-token distribution.
    own = torch.log_softmax(out.logits[0].double(), -1)
    np.testing.assert_allclose(
        [[t["logprob"] for t in row] for row in got["-1"]["top_k"]], torch.topk(own, 5).values.numpy(), atol=1e-5
    )


OCTETS = {"content-type": "application/octet-stream"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
async def test_a_tuned_lens_is_tuned_lenses_own_prediction(paths, arch):
    """A tuned lens made by the tuned-lens package (``TunedLens.from_model``, its translators set at random as
    training would move them) and uploaded as the safetensors of its state dict: each layer's top tokens and
    log-probabilities are ``TunedLens.forward`` of transformers' hidden state at that index, the last layer's the
    model's own logits, alone and in a generation's stream; a lens of another depth, one named among ``probes``, a
    tuned lens read at a hook point, and a file that is not a tuned lens are 422s naming the field."""
    from tuned_lens import TunedLens

    net, tok = load(paths[arch], arch)
    lens = TunedLens.from_model(net)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in lens.layer_translators.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    state = {k: v.contiguous() for k, v in lens.state_dict().items()}
    with torch.inference_mode():
        out = net(**tok(TEXT, return_tensors="pt"), output_hidden_states=True)
    n = len(out.hidden_states) - 1
    ask = {"layers": list(range(n + 1)), "top_k": 5, "tuned": "tuned"}
    async with concurrent_client(app_with()) as c:
        r = await c.post("/probes/tuned?kind=tuned_lens", content=safetensors.torch.save(state), headers=OCTETS)
        assert r.status_code == 201, r.text
        r = await c.post("/extract", json={"model": paths[arch], "text": TEXT, "positions": "all", "logit_lens": ask})
        assert r.status_code == 200, r.text
        got = r.json()["logit_lens"]
        events = await token_events(
            c, {"model": paths[arch], "prompt": TEXT, "max_tokens": 2, "temperature": 0, "logit_lens": ask}
        )
        shallow = {k: v for k, v in state.items() if not k.startswith(f"layer_translators.{n - 1}.")}
        r = await c.post("/probes/shallow?kind=tuned_lens", content=safetensors.torch.save(shallow), headers=OCTETS)
        assert r.status_code == 201, r.text
        broken = {k: v for k, v in state.items() if k != "layer_translators.0.bias"}
        r = await c.post("/probes/broken?kind=tuned_lens", content=safetensors.torch.save(broken), headers=OCTETS)
        assert r.status_code == 422 and r.json()["field"] == "body", r.text
        for change, field in [
            ({"logit_lens": {**ask, "tuned": "shallow"}}, "logit_lens.tuned"),
            ({"logit_lens": {**ask, "tuned": "nope"}}, "logit_lens.tuned"),
            ({"logit_lens": {**ask, "layers": ["blocks.0.hook_resid_post"]}}, "logit_lens.layers"),
            ({"probes": ["tuned"]}, "probes[0]"),
        ]:
            r = await c.post("/extract", json={"model": paths[arch], "text": TEXT, **change})
            assert r.status_code == 422 and r.json()["field"] == field, r.text
    for i in range(n + 1):
        with torch.inference_mode():
            logits = lens(out.hidden_states[i][0], i) if i < n else out.logits[0]
        want = torch.log_softmax(logits.double(), -1)
        values, ids = torch.topk(want, 5, dim=-1)
        entry = got[str(i)]
        assert [[t["token_id"] for t in row] for row in entry["top_k"]] == ids.tolist(), i
        np.testing.assert_allclose([[t["logprob"] for t in row] for row in entry["top_k"]], values.numpy(), atol=1e-4)
    # A stream's token event reads that token's position: the first generated token's, in the model run on it.
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    fed = torch.cat([ids, torch.tensor([[events[0]["token_id"]]])], dim=1)
    with torch.inference_mode():
        run = net(input_ids=fed, output_hidden_states=True)
    for i in range(n + 1):
        with torch.inference_mode():
            logits = lens(run.hidden_states[i][0, -1:], i) if i < n else run.logits[0, -1:]
        first = events[0]["logit_lens"][str(i)]["top_k"][0]
        assert [t["token_id"] for t in first] == torch.topk(logits[0], 5).indices.tolist(), i


async def test_lens_at_hook_points_and_refusals(paths):
    net, tok = load(paths["llama"], "llama")
    kept = {}
    net.model.layers[1].register_forward_hook(lambda m, a, o: kept.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.inference_mode():
        net(**tok(TEXT, return_tensors="pt"))
        want = torch.log_softmax(net.lm_head(net.model.norm(kept["h"][0])).double(), -1)
    async with concurrent_client(app_with()) as c:
        body = {"model": paths["llama"], "text": TEXT, "positions": [2, -1]}
        r = await c.post("/extract", json={**body, "logit_lens": {"layers": ["blocks.1.hook_resid_post"], "top_k": 3}})
        entry = r.json()["logit_lens"]["blocks.1.hook_resid_post"]
        assert entry["positions"] == [2, want.shape[0] - 1]
        np.testing.assert_allclose(
            [[t["logprob"] for t in row] for row in entry["top_k"]],
            torch.topk(want[[2, -1]], 3).values.numpy(),
            atol=1e-5,
        )
        for change, field in [
            ({"logit_lens": {"top_k": 0}}, "logit_lens.top_k"),
            ({"logit_lens": {"tokens": ["the cat"]}}, "logit_lens.tokens[0]"),
            ({"logit_lens": {"layers": ["blocks.0.attn.hook_z"]}}, "logit_lens.layers"),
            ({"model": paths["bert"], "logit_lens": {}}, "logit_lens"),
        ]:
            r = await c.post("/extract", json={**body, **change})
            assert r.status_code == 422 and r.json()["field"] == field, r.text


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


async def test_probe_scores_match_numpy_on_the_served_states_and_streams_agree(paths):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 64)), rng.standard_normal(3)
    path = paths["llama"]
    async with concurrent_client(app_with()) as c:
        probe = {"name": "mood", "site": "blocks.1.hook_mlp_out", "weight": w.tolist(), "bias": b.tolist()}
        r = await c.post("/probes", json={**probe, "labels": ["a", "b", "c"], "activation": "softmax"})
        assert r.status_code == 201, r.text
        for act in ("sigmoid", "linear"):
            assert (await c.post("/probes", json={**probe, "name": act, "activation": act})).status_code == 201
        ask = {"model": path, "text": TEXT, "positions": "all", "probes": ["mood", "sigmoid", "linear"]}
        r = await c.post("/extract", json={**ask, "hidden_state_layers": ["blocks.1.hook_mlp_out"]})
        x = arrays(r.json(), "sequence_hidden_states")["blocks.1.hook_mlp_out"].astype(np.float64)
        scores = r.json()["probe_scores"]
        assert scores["mood"]["labels"] == ["a", "b", "c"] and scores["linear"]["labels"] == ["0", "1", "2"]
        np.testing.assert_allclose(scores["mood"]["data"], softmax(x @ w.T + b), atol=1e-6)
        np.testing.assert_allclose(scores["sigmoid"]["data"], 1 / (1 + np.exp(-(x @ w.T + b))), atol=1e-6)
        np.testing.assert_allclose(scores["linear"]["data"], x @ w.T + b, atol=1e-5)

        gen = {"model": path, "prompt": TEXT, "max_tokens": 6, "temperature": 0, "probes": ["mood"]}
        whole = (await c.post("/generate", json={**gen, "positions": "generated"})).json()
        events = await token_events(c, gen)
        assert [e["token_id"] for e in events] == whole["token_ids"]
        np.testing.assert_allclose(
            [e["probe_scores"]["mood"]["data"][0] for e in events], whole["probe_scores"]["mood"]["data"], atol=1e-6
        )
        assert all("hidden_states" not in e for e in events)  # the probe's states are not the client's to see

        lens = {"layers": [1, -1], "top_k": 3}
        whole = (await c.post("/generate", json={**gen, "logit_lens": lens, "positions": "generated"})).json()
        events = await token_events(c, {**gen, "logit_lens": lens})
        assert [e["token_id"] for e in events] == whole["token_ids"]
        for key in ("1", "-1"):
            streamed = [e["logit_lens"][key]["top_k"][0] for e in events]
            want = whole["logit_lens"][key]["top_k"]
            assert [[t["token_id"] for t in row] for row in streamed] == [[t["token_id"] for t in row] for row in want]
            np.testing.assert_allclose(
                [[t["logprob"] for t in row] for row in streamed],
                [[t["logprob"] for t in row] for row in want],
                atol=1e-5,
            )


@pytest.mark.parametrize("n, keep", [(1, False), (2, True)])
async def test_a_streamed_lens_is_the_models_own_norm_and_head_whatever_the_pass_hooks_there(paths, n, keep):
    """A stream's lens is computed per token on the output processor's thread while the model's thread runs the next
    pass, whose hooks (here: its states kept, and an edit of the final norm's output) are on the modules the lens
    runs: the lens must not go through them. Through them, the edit was applied to the lens too, and with two rows
    the hook's layout refused the lens's tensor, ending the stream in a 500 error event. The overlap is made
    certain: the pass feeding the second token waits (a forward pre-hook of the served model's first block) until
    the app sends the first token's event, and that token's lens waits for the pass to be in before its norm runs.
    Reference: transformers' own norm and head on the states of each choice's final sequence (the edit at index N
    changes which tokens come, not layer 1's states)."""
    path = paths["llama"]
    net, tok = load(path, "llama")
    norm, head = final_parts(net, "llama")
    last = net.config.num_hidden_layers
    push = (np.random.default_rng(2).standard_normal(64) * 4).tolist()
    body = {
        "model": path,
        "prompt": TEXT,
        "max_tokens": 5,
        "temperature": 0.9,
        "seed": 4,
        "n": n,
        "logit_lens": {"layers": [1], "top_k": 3},
        **({"hidden_state_layers": [-1], "stream_hidden_states": True} if keep else {}),
        "interventions": [{"site": last, "op": "add", "vector": push}],
    }
    prompt = tok(TEXT)["input_ids"]
    app = app_with()
    passes, inside, seen = itertools.count(), threading.Event(), threading.Event()

    def hold(module: Any, args: Any) -> None:
        if next(passes) == 2:  # prefill, the pass feeding token 0 (its states), then this one, its hooks on
            inside.set()
            seen.wait(HANG_S)

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        """The app, with ``seen`` set when it sends an event's bytes (the test client hands the body over whole)."""

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and b"event: " in message.get("body", b""):
                seen.set()
            await send(message)

        await app(scope, receive, sending)

    async with concurrent_client(app) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        served = app.state.manager.find(path).model().model
        handle = served.model.layers[0].register_forward_pre_hook(hold)
        norm_forward = served.model.norm.forward

        def lens_norm(x: Any) -> Any:  # the real norm, run once that pass is in: [P, H] is the lens's, not a pass's
            if x.dim() == 2:
                inside.wait(HANG_S)
            return norm_forward(x)

        served.model.norm.forward = lens_norm
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=watched), base_url="http://loom") as w:
                events = await token_events(w, body)
        finally:
            inside.set()
            seen.set()
            handle.remove()
            del served.model.norm.forward
    for choice in range(n):
        mine = [e for e in events if e.get("choice", 0) == choice]
        assert len(mine) == 5, events
        with torch.inference_mode():
            ids = torch.tensor([prompt + [e["token_id"] for e in mine]])
            x = net(ids, output_hidden_states=True).hidden_states[1][0, len(prompt) :]
            want = torch.topk(torch.log_softmax(head(norm(x)).double(), -1), 3)
        got = [e["logit_lens"]["1"]["top_k"][0] for e in mine]
        assert [[t["token_id"] for t in row] for row in got] == want.indices.tolist()
        np.testing.assert_allclose([[t["logprob"] for t in row] for row in got], want.values.numpy(), atol=1e-5)


async def token_events(c: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The token events of a /generate/stream (not its done event, whose body also holds token ids)."""
    events, kind = [], None
    async with c.stream("POST", "/generate/stream", json=body) as s:
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind == "token":
                events.append(json.loads(line[5:]))
    return events


def sae_reference(x: np.ndarray, t: dict[str, np.ndarray], act: str, k: int = 0) -> np.ndarray:
    """SAELens's encode: f = act((x - b_dec) W_enc + b_enc)."""
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if act == "relu":
        return np.maximum(pre, 0)
    if act == "jumprelu":
        return np.where(pre > t["threshold"], np.maximum(pre, 0), 0)
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[:, :k]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return out


@pytest.mark.parametrize("act", ["relu", "jumprelu", "topk"])
async def test_sae_encodings_match_the_formula_and_feature_steering_is_adding_the_decoder_row(paths, act):
    gen = torch.Generator().manual_seed(3)
    h, f = 64, 48
    tensors = {
        "W_enc": torch.randn(h, f, generator=gen) / 4,
        "b_enc": torch.randn(f, generator=gen) / 10,
        "b_dec": torch.randn(h, generator=gen) / 10,
        "W_dec": torch.randn(f, h, generator=gen),
    }
    if act == "jumprelu":
        tensors["threshold"] = torch.rand(f, generator=gen) / 5
    path = paths["llama"]
    site = "blocks.1.hook_resid_post"
    query = f"site={site}&activation={act}" + ("&k=6" if act == "topk" else "") + "&top_features=48"
    async with concurrent_client(app_with()) as c:
        up = await c.post(
            f"/probes/sae?{query}",
            content=safetensors.torch.save(tensors),
            headers={"content-type": "application/octet-stream"},
        )
        assert up.status_code == 201, up.text
        r = await c.post(
            "/extract",
            json={"model": path, "text": TEXT, "positions": "all", "probes": ["sae"], "hidden_state_layers": [site]},
        )
        x = arrays(r.json(), "sequence_hidden_states")[site].astype(np.float64)
        t = {k: v.double().numpy() for k, v in tensors.items()}
        want = sae_reference(x, t, act, 6)
        got = r.json()["probe_scores"]["sae"]
        dense = np.zeros_like(want)
        for p, row in enumerate(got["top_features"]):
            for entry in row:
                dense[p, entry["index"]] = entry["value"]
        np.testing.assert_allclose(dense, want, atol=1e-6)
        assert got["l0"] == (want > 0).sum(-1).tolist()
        recon = want @ t["W_dec"] + t["b_dec"]
        np.testing.assert_allclose(got["reconstruction_error"], np.linalg.norm(x - recon, axis=-1), rtol=1e-6)

        steer = {
            "model": path,
            "prompt": TEXT,
            "max_tokens": 10,
            "temperature": 0,
            "hidden_state_layers": [-1],
            "positions": "all",
        }
        by_feature = (
            await c.post(
                "/generate",
                json={**steer, "interventions": [{"op": "add", "feature": {"probe": "sae", "index": 5}, "scale": 3.0}]},
            )
        ).json()
        row = tensors["W_dec"][5].tolist()
        by_row = (
            await c.post(
                "/generate", json={**steer, "interventions": [{"site": site, "op": "add", "vector": row, "scale": 3.0}]}
            )
        ).json()
        assert by_feature["token_ids"] == by_row["token_ids"]
        np.testing.assert_array_equal(
            arrays(by_feature, "sequence_hidden_states")["-1"], arrays(by_row, "sequence_hidden_states")["-1"]
        )


async def test_stop_when_ends_the_row_at_the_first_crossing_and_other_rows_go_on(paths):
    path = paths["llama"]
    rng = np.random.default_rng(1)
    app = app_with()
    async with concurrent_client(app) as c:
        probe = {"name": "watch", "site": 2, "weight": rng.standard_normal((2, 64)).tolist(), "bias": [0.0, 0.0]}
        assert (
            await c.post("/probes", json={**probe, "labels": ["no", "yes"], "activation": "softmax"})
        ).status_code == 201
        gen = {"model": path, "prompt": TEXT, "max_tokens": 16, "temperature": 0}
        free = (await c.post("/generate", json={**gen, "probes": ["watch"], "positions": "generated"})).json()
        yes = [row[1] for row in free["probe_scores"]["watch"]["data"]]
        # A bound the scores cross first at a token in the middle of the generation.
        order = sorted(set(yes))
        bound = next(b for b in order if 2 <= next(i for i, v in enumerate(yes) if v > b) <= 12)
        first = next(i for i, v in enumerate(yes) if v > bound)
        rule = [{"probe": "watch", "label": "yes", "above": bound}]
        stopped = (await c.post("/generate", json={**gen, "stop_when": rule})).json()
        assert stopped["finish_reason"] == "probe"
        assert stopped["token_ids"] == free["token_ids"][: first + 1]
        assert stopped["stopped_by"]["label"] == "yes" and stopped["stopped_by"]["score"] == pytest.approx(yes[first])

        other = {"prompt": "hello there", "max_tokens": 16, "temperature": 0}
        alone = (await c.post("/generate", json={"model": path, **other})).json()
        both = await together(
            app, c, path, [("/generate", {**gen, "stop_when": rule, "model": path}), ("/generate", other)]
        )
        assert both[0].json()["token_ids"] == stopped["token_ids"] and both[0].json()["finish_reason"] == "probe"
        assert (
            both[1].json()["token_ids"] == alone["token_ids"]
            and both[1].json()["finish_reason"] == alone["finish_reason"]
        )


async def test_fit_matches_scikit_learn_on_transformers_states(paths):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    path = paths["llama"]
    net, tok = load(path, "llama")
    words = ["cat", "dog", "mat", "hat", "sun", "fox", "box", "lot", "man", "pen", "tea", "cup"]
    texts = [f"the {w} sat on the mat" for w in words] + [f"one two three {w} four" for w in words]
    labels = ["animal"] * len(words) + ["count"] * len(words)
    with torch.inference_mode():
        x = np.stack(
            [
                net(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states[2][0, -1].double().numpy()
                for t in texts
            ]
        )
    y = np.array([0 if label == "animal" else 1 for label in labels])
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    cv = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    async with concurrent_client(app_with()) as c:
        r = await c.post(
            "/probes/fit", json={"name": "topic", "model": path, "site": 2, "texts": texts, "labels": labels}
        )
        assert r.status_code == 201, r.text
        got = r.json()
        assert got["labels"] == ["animal", "count"] and got["cv_folds"] == 5
        assert got["train_accuracy"] == pytest.approx(clf.score(x, y)) and got["cv_accuracy"] == pytest.approx(
            cv.mean()
        )
        scored = (await c.post("/extract", json={"model": path, "text": texts[3], "probes": ["topic"]})).json()
        np.testing.assert_allclose(scored["probe_scores"]["topic"]["data"][0], clf.predict_proba(x[3:4])[0], atol=1e-4)


async def test_bad_probes_are_4xx_naming_the_field(paths, tmp_path):
    path = paths["llama"]
    ok = {"name": "p", "site": 2, "weight": [[0.1] * 64] * 2, "bias": [0.0, 0.0]}
    async with concurrent_client(app_with(options={"probes_max_mb": 0.01})) as c:
        for change, status, field in [
            ({"bias": [0.0, 0.0, 0.0]}, 422, "bias"),
            ({"labels": ["only one"]}, 422, "labels"),
            ({"weight": [0.1] * 64}, 422, "weight"),
            ({"activation": "tanh"}, 422, "activation"),
            ({"kind": "sae", "activation": "topk"}, 422, "W_enc"),
        ]:
            r = await c.post("/probes", json={**ok, **change})
            assert (r.status_code, r.json()["field"]) == (status, field), r.text
        big = {"W_enc": torch.zeros(64, 64), "b_enc": torch.zeros(64), "b_dec": torch.zeros(64)}  # 17 kB > 10 kB
        r = await c.post(
            "/probes/big?site=2",
            content=safetensors.torch.save(big),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code in (413, 507), r.text
        r = await c.post(
            "/probes/x?site=2", content=b"not a file", headers={"content-type": "application/octet-stream"}
        )
        assert r.status_code == 422 and r.json()["field"] == "body"
        assert (await c.post("/probes", json=ok)).status_code == 201
        assert (await c.post("/probes", json={**ok, "name": "wide", "weight": [[0.1] * 32] * 2})).status_code == 201
        for body, field in [
            ({"probes": ["nope"]}, "probes[0]"),
            ({"probes": ["wide"]}, "probes[0]"),
        ]:
            r = await c.post("/extract", json={"model": path, "text": "hi", **body})
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        r = await c.post(
            "/generate",
            json={"model": path, "prompt": "hi", "stop_when": [{"probe": "p", "label": "maybe", "above": 0}]},
        )
        assert r.status_code == 422 and r.json()["field"] == "stop_when[0].label"
        assert (await c.get("/probes/nope")).status_code == 404
        assert (await c.delete("/probes/p")).status_code == 200


def test_probes_persist_across_a_restart(tmp_path):
    from litestar.testing import TestClient

    directory = str(tmp_path / "probes")
    probe = {"name": "kept", "site": "blocks.0.hook_mlp_out", "weight": [[0.5] * 64], "bias": [1.0], "labels": ["x"]}
    with TestClient(app_with(options={"probes_directory": directory})) as c:
        assert c.post("/probes", json={**probe, "activation": "sigmoid"}).status_code == 201
    with TestClient(app_with(options={"probes_directory": directory})) as c:
        listed = c.get("/probes").json()["probes"]
        assert [(p["name"], p["site"], p["activation"], p["shapes"]["weight"]) for p in listed] == [
            ("kept", "blocks.0.hook_mlp_out", "sigmoid", [1, 64])
        ]
