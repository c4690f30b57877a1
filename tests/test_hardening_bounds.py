"""Red-team round 2 on one process: texts cut before any tokenizer (and none tokenized on the event loop), error
details that repeat only a prefix of an input, duplicates folded, edit positions inside the sequence, logits that
are not finite, store budgets that count every byte, readouts in the answer estimate, SAE uploads sized from their
header, and probe fits that stop. Each against the real app (in-process ASGI) or a real server on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import struct
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from serverutil import HANG_S, killed_mid_fit, loom_server, refused_by_sklearn, until
from test_models import app_with, concurrent_client

HUGE = "the cat sat on the mat " * 220_000  # 5 MB
SHORT_BODY = 4096  # no error answer to a huge input may be longer


class Watched:
    """A model's own tokenizer that notes, for every call, the most characters it was given and whether it ran on
    the event loop: the real tokenizer still does the work."""

    def __init__(self, inner: Any) -> None:
        self.__dict__.update(inner=inner, calls=[])

    def _note(self, what: str, chars: int) -> None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((what, chars, on_loop))

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self._note("call", max(map(len, text)) if isinstance(text, list) else len(text))
        return self.inner(text, *args, **kwargs)

    def apply_chat_template(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
        self._note("chat", sum(len(m["content"]) for m in messages))
        return self.inner.apply_chat_template(messages, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


async def loaded(app: Any, path: str) -> Any:
    return (await app.state.manager.get(path)).model()


def one_token_words(tokenizer: Any, count: int) -> list[str]:
    """Words ``tokenizer`` reads as one token each."""
    words = [" the", " cat", " sat", " on", " mat", " dog", " a", " is"]
    found = [w for w in words if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(found) >= count, found
    return found[:count]


def assert_short_refusal(r: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    assert len(r.content) < SHORT_BODY, len(r.content)
    problem = r.json()
    got = problem["error"]["param"] if "error" in problem else problem["field"]
    assert got == field, problem
    return problem


# -- 10. huge texts outside /extract -------------------------------------------------------------------------------


async def test_huge_texts_never_reach_a_tokenizer_whole_nor_the_event_loop(tiny_models):
    from loom_kernel.inputs import char_limit

    path = str(tiny_models["llama"])
    app = app_with()
    async with concurrent_client(app) as c:
        model = await loaded(app, path)
        model.tokenizer = watched = Watched(model.tokenizer)
        good, bad = one_token_words(model.tokenizer.inner, 2)
        metric = {"type": "logit_diff", "correct": good, "incorrect": bad}
        patch = {"model": path, "clean": "the model is", "corrupted": "the model of", "sites": "resid_pre"}
        refused = [
            ("/patch", {**patch, "clean": HUGE, "metric": metric}, 422, "clean"),
            ("/patch", {**patch, "corrupted": HUGE, "metric": metric}, 422, "corrupted"),
            ("/patch", {**patch, "metric": {**metric, "correct": HUGE}}, 422, "metric.correct"),
            (
                "/extract",
                {"model": path, "text": "hi", "logit_lens": {"tokens": [good, HUGE]}},
                422,
                "logit_lens.tokens[1]",
            ),
            (
                "/generate",
                {"model": path, "prompt": "hi", "logit_lens": {"tokens": [HUGE]}},
                422,
                "logit_lens.tokens[0]",
            ),
            (
                "/generate/stream",
                {"model": path, "prompt": "hi", "logit_lens": {"tokens": [HUGE]}},
                422,
                "logit_lens.tokens[0]",
            ),
            ("/v1/chat/completions", {"model": path, "messages": [{"role": "user", "content": HUGE}]}, 400, "messages"),
            ("/generate", {"model": path, "prompt": HUGE}, 422, "prompt"),
        ]
        # Each huge request beside /health requests sent with it: all answered, none waiting on a tokenizer.
        answers = await asyncio.gather(
            *(c.post(url, json=body) for url, body, _, _ in refused), *(c.get("/health") for _ in refused)
        )
        assert [r.status_code for r in answers[len(refused) :]] == [200] * len(refused)
        for r, (_url, _body, status, field) in zip(answers, refused, strict=False):
            problem = assert_short_refusal(r, status, field)
            assert "characters" in problem["detail"], problem
        # The same requests at a size the model reads are answered, their texts tokenized on request threads.
        assert (await c.post("/patch", json={**patch, "metric": metric})).status_code == 200
        lens = {"model": path, "text": "the cat sat", "logit_lens": {"tokens": [good]}}
        assert (await c.post("/extract", json=lens)).status_code == 200
        chat = {"model": path, "messages": [{"role": "user", "content": "the cat sat"}], "max_tokens": 2}
        assert (await c.post("/v1/chat/completions", json=chat)).status_code == 200
    limit = char_limit(model)
    assert watched.calls and max(chars for _, chars, _ in watched.calls) <= limit, watched.calls
    assert [call for call in watched.calls if call[2]] == []  # none on the event loop
    assert {what for what, _, _ in watched.calls} == {"call", "chat"}


async def test_error_details_repeat_only_a_prefix_of_an_input(tiny_models):
    path = str(tiny_models["llama"])
    long = "x" * 200_000
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/vectors", json={"name": "v", "vector": [0.5] * 64})).status_code == 201
        for url, body, field in [
            (
                "/extract",
                {"model": path, "text": "hi", "hidden_state_layers": [f"blocks.0.{long}"]},
                "hidden_state_layers",
            ),
            (
                "/extract",
                {"model": path, "text": "hi", "interventions": [{"site": 1, "op": long}]},
                "interventions[0].op",
            ),
            ("/extract", {"model": path, "text": "hi", "probes": [long]}, "probes[0]"),
            (
                "/extract",
                {"model": path, "text": "hi", "interventions": [{"site": 1, "op": "add", "vector": long}]},
                "interventions[0].vector",
            ),
            (
                "/extract",
                {
                    "model": path,
                    "text": "hi",
                    "interventions": [{"site": 1, "op": "zero", "positions": list(range(-9000, 9000))}],
                },
                "interventions[0].positions",
            ),
            ("/vectors", {"name": long, "vector": [1.0]}, "name"),
            ("/embed", {"model": path, "text": "hi", "pooling": long}, "pooling"),
            ("/extract", {"model": path, "text": "hi", "positions": long}, "positions"),
        ]:
            problem = assert_short_refusal(await c.post(url, json=body), 422, field)
            assert "xxxxxxxx" in problem["detail"] or "characters" in problem["detail"] or "items" in problem["detail"]


# -- 11. duplicates ------------------------------------------------------------------------------------------------


async def test_a_site_named_many_times_is_read_once_and_lists_are_capped(tiny_models):
    path = str(tiny_models["llama"])
    site = "blocks.1.hook_resid_post"
    app = app_with()
    async with concurrent_client(app) as c:
        model = await loaded(app, path)
        calls = []
        unembed = model.unembed
        model.unembed = lambda states, normalized: calls.append(states.shape) or unembed(states, normalized)
        once = await c.post("/extract", json={"model": path, "text": "the cat sat", "logit_lens": {"layers": [site]}})
        assert once.status_code == 200 and len(calls) == 1
        many = {"model": path, "text": "the cat sat", "logit_lens": {"layers": [site] * 4000 + [1] * 90}}
        r = await c.post("/extract", json=many)
        assert r.status_code == 200 and sorted(r.json()["logit_lens"]) == ["1", site]
        assert len(calls) == 1 + 2  # the site once, and index 1 once
        assert r.json()["logit_lens"][site] == once.json()["logit_lens"][site]
        states = {"model": path, "text": "the cat sat", "hidden_state_layers": [site] * 4000 + [2] * 90}
        r = await c.post("/extract", json=states)
        assert r.status_code == 200 and sorted(r.json()["hidden_states"]) == ["2", site]
        for body, field in [
            ({"logit_lens": {"layers": [site] * 4097}}, "logit_lens.layers"),
            ({"hidden_state_layers": [1] * 4097}, "hidden_state_layers"),
        ]:
            r = await c.post("/extract", json={"model": path, "text": "hi", **body})
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        good, bad = one_token_words(model.tokenizer, 2)
        patch = {
            "model": path,
            "clean": "the model is",
            "corrupted": "the model of",
            "metric": {"type": "logit_diff", "correct": good, "incorrect": bad},
            "positions": [0, 1],
        }
        one = (await c.post("/patch", json={**patch, "sites": [site]})).json()
        folded = (await c.post("/patch", json={**patch, "sites": [site] * 3000})).json()
        assert folded["runs"] == one["runs"] == 4 and folded["patched"] == one["patched"]
        r = await c.post("/generate", json={"model": path, "prompt": "hi", "stop": ["x"] * 17})
        assert r.status_code == 422 and r.json()["field"] == "stop"


# -- 13. edit positions ----------------------------------------------------------------------------------------------


async def test_edit_positions_outside_the_sequence_are_422_naming_the_edit(tiny_models):
    path = str(tiny_models["llama"])
    text = "the cat sat"
    async with concurrent_client(app_with()) as c:
        tokens = (await c.post("/extract", json={"model": path, "text": text})).json()["token_count"]

        def edits(*positions: list[int]) -> list[dict[str, Any]]:
            return [{"site": 1, "op": "scale", "scale": 0.5, "positions": p} for p in positions]

        for positions, field in [
            ([[0], [1000]], "interventions[1].positions"),
            ([[2**62]], "interventions[0].positions"),
            ([[tokens]], "interventions[0].positions"),
            ([[-tokens - 1]], "interventions[0].positions"),
        ]:
            r = await c.post("/extract", json={"model": path, "text": text, "interventions": edits(*positions)})
            assert r.status_code == 422 and r.json()["field"] == field, (positions, r.text)
        assert (
            await c.post("/extract", json={"model": path, "text": text, "interventions": edits([0, -tokens])})
        ).status_code == 200
        gen = {"model": path, "prompt": text, "max_tokens": 4, "temperature": 0}
        last = tokens + 3  # the last token a 4-token generation feeds back is never fed: its index is still inside
        assert (await c.post("/generate", json={**gen, "interventions": edits([last])})).status_code == 200
        r = await c.post("/generate", json={**gen, "interventions": edits([last + 1])})
        assert r.status_code == 422 and r.json()["field"] == "interventions[0].positions", r.text
        r = await c.post("/v1/completions", json={**gen, "prompt": text, "interventions": edits([last + 1])})
        assert r.status_code == 400 and r.json()["error"]["param"] == "interventions[0].positions", r.text


# -- 12. logits that are not finite ---------------------------------------------------------------------------------


async def test_logits_that_are_not_finite_fail_their_own_request_only(tiny_models):
    path = str(tiny_models["llama"])
    # At index 3 (N, what the LM head reads) every number becomes 3e39: infinite in float32, and so are the logits.
    blow_up = [{"site": 3, "op": "add", "vector": [3e38] * 64, "scale": 10.0}]
    async with concurrent_client(app_with()) as c:
        plain = {"model": path, "prompt": "the cat sat", "max_tokens": 12, "temperature": 0}
        alone = (await c.post("/generate", json=plain)).json()["token_ids"]
        for temperature in (0.0, 1.0):
            body = {"model": path, "prompt": "the cat", "max_tokens": 4, "temperature": temperature, "seed": 1}
            bad, beside = await asyncio.gather(
                c.post("/generate", json={**body, "interventions": blow_up}), c.post("/generate", json=plain)
            )
            assert bad.status_code == 422 and bad.json()["field"] == "interventions", bad.text
            assert "not finite" in bad.json()["detail"]
            assert beside.status_code == 200 and beside.json()["token_ids"] == alone  # its batch ran on
        for url, body in [
            ("/v1/completions", {"prompt": "the cat"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the cat"}]}),
        ]:
            r = await c.post(
                url, json={"model": path, "max_tokens": 3, "temperature": 1.0, **body, "interventions": blow_up}
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "interventions", r.text
        events = []
        async with c.stream(
            "POST",
            "/generate/stream",
            json={"model": path, "prompt": "the cat", "max_tokens": 3, "interventions": blow_up},
        ) as s:
            assert s.status_code == 200
            events = [line async for line in s.aiter_lines() if line.startswith(("event:", "data:"))]
        assert events[-2] == "event: error" and json.loads(events[-1][5:])["field"] == "interventions", events


# -- 6. store budgets ------------------------------------------------------------------------------------------------


async def test_store_budgets_count_metadata_and_entries_are_capped():
    options = {"vectors_max_entries": 3, "probes_max_entries": 2}
    async with concurrent_client(app_with(options=options)) as c:
        plain = (await c.post("/vectors", json={"name": "plain", "vector": [0.5] * 64})).json()
        described = (
            await c.post("/vectors", json={"name": "described", "vector": [0.5] * 64, "description": "d" * 1000})
        ).json()
        assert described["bytes"] - plain["bytes"] >= 1000  # the description is kept, so it is counted
        listed = (await c.get("/vectors")).json()
        assert listed["bytes"] == plain["bytes"] + described["bytes"]
        for body, field in [
            ({"name": "big", "vector": [0.5], "description": "d" * (9 * 2**20)}, "description"),
            ({"name": "big", "vector": [0.5], "model": "m" * 2000}, "model"),
        ]:
            r = await c.post("/vectors", json=body)
            assert r.status_code == 422 and r.json()["field"] == field, r.text[:300]
        assert (await c.post("/vectors", json={"name": "third", "vector": [0.5]})).status_code == 201
        r = await c.post("/vectors", json={"name": "fourth", "vector": [0.5]})
        assert r.status_code == 507 and "max_entries" in r.json()["detail"], r.text
        assert (await c.post("/vectors", json={"name": "third", "vector": [0.25], "replace": True})).status_code == 201
        probe = {"name": "p", "site": 2, "weight": [[0.1] * 64] * 2, "bias": [0.0, 0.0]}
        r = await c.post("/probes", json={**probe, "labels": ["yes", "n" * 200]})
        assert r.status_code == 422 and r.json()["field"] == "labels[1]", r.text
        short = (await c.post("/probes", json={**probe, "labels": ["yes", "no"]})).json()
        longer = (await c.post("/probes", json={**probe, "name": "q", "labels": ["yes" * 40, "no" * 60]})).json()
        assert longer["bytes"] - short["bytes"] >= 3 * 40 + 2 * 60 - 5
        r = await c.post("/probes", json={**probe, "name": "r"})
        assert r.status_code == 507, r.text


# -- 7. readouts in the answer estimate -------------------------------------------------------------------------


def sae(h: int, f: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "W_enc": torch.randn(h, f, generator=gen),
        "b_enc": torch.randn(f, generator=gen),
        "b_dec": torch.zeros(h),
        "W_dec": torch.randn(f, h, generator=gen),
    }


async def upload(c: Any, name: str, tensors: dict[str, torch.Tensor], query: str, **meta: str) -> httpx.Response:
    body = safetensors.torch.save(tensors, metadata=meta or None)
    return await c.post(f"/probes/{name}?{query}", content=body, headers={"content-type": "application/octet-stream"})


async def test_probe_scores_and_sae_features_count_in_the_answer_estimate(tiny_models):
    path = str(tiny_models["llama"])
    app = app_with()
    async with concurrent_client(app) as c:
        site = "blocks.1.hook_resid_post"
        assert (await upload(c, "wide", sae(64, 2048), f"site={site}&top_features=1024")).status_code == 201
        linear = {"name": "lin", "site": 2, "weight": [[0.01] * 64] * 300, "bias": [0.0] * 300}
        assert (await c.post("/probes", json=linear)).status_code == 201
        for name, top, says in [("over", 1025, "1 to 1024"), ("neg", -5, "1 to"), ("narrow", 49, "1 to 48")]:
            r = await upload(c, name, sae(64, 2048 if name != "narrow" else 48), f"site={site}&top_features={top}")
            assert r.status_code == 422 and r.json()["field"] == "top_features" and says in r.json()["allowed"], r.text
        text = "the cat sat on the mat " * 4
        requests = [
            ("/extract", {"text": text, "positions": "all", "probes": ["wide"]}, "probes"),
            ("/extract", {"text": text, "positions": "all", "probes": ["lin"]}, "probes"),
            ("/extract", {"text": text, "positions": "all", "logit_lens": {"top_k": 100}}, "logit_lens"),
            ("/generate", {"prompt": text, "max_tokens": 6, "positions": "all", "probes": ["wide", "lin"]}, "probes"),
        ]
        for url, body, field in requests:
            app.state.settings.max_response_mb = 256.0
            r = await c.post(url, json={"model": path, **body})
            assert r.status_code == 200, r.text
            app.state.settings.max_response_mb = (len(r.content) - 1) / 2**20
            refused = await c.post(url, json={"model": path, **body})
            assert refused.status_code == 422 and refused.json()["estimate_bytes"] >= len(r.content), (url, body)
            assert refused.json()["field"] == field and refused.json()["parts"]["readouts"] > 0
        app.state.settings.max_response_mb = 256.0


# -- 8. SAE uploads --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real server with a probes directory and a 64 MiB probe budget: (base URL, its home)."""
    home = tmp_path_factory.mktemp("bounds")
    config = home / "config.yaml"
    config.write_text(json.dumps({"probes": {"directory": str(home / "probes"), "max_mb": 64}}))
    with loom_server(["--config", str(config)], home, LOOM_DEFAULT_DEVICE="cpu") as (base, log, proc):
        yield base, home, log, proc


def header(tensors: dict[str, tuple[str, list[int]]], meta: dict[str, str] | None = None) -> bytes:
    """A safetensors file's first bytes: its header for tensors of these dtypes and shapes, laid end to end."""
    sizes = {"BOOL": 1, "F32": 4, "F16": 2}
    at, head = 0, {}
    for name, (dtype, shape) in tensors.items():
        end = at + int(np.prod(shape)) * sizes[dtype]
        head[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, end]}
        at = end
    if meta:
        head["__metadata__"] = meta
    text = json.dumps(head).encode()
    return struct.pack("<Q", len(text)) + text


def answer_before_the_body(base: str, path: str, head: bytes, length: int) -> tuple[int, dict[str, Any]]:
    """Send ``length`` as the body's size and only ``head`` of it, then read the answer: an answer at all proves the
    server decided without the rest (which never comes)."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        conn.send(head)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_an_sae_upload_is_sized_and_typed_from_its_header_before_its_tensors(server):
    base, _home, _log, _proc = server
    site = "site=blocks.1.hook_resid_post"
    bools = header({"W_enc": ("BOOL", [64, 2**22]), "b_enc": ("BOOL", [2**22]), "b_dec": ("F32", [64])})
    status, problem = answer_before_the_body(base, f"/probes/b?{site}", bools, len(bools) + 64 * 2**22 + 2**22 + 256)
    assert (status, problem["field"]) == (422, "body") and "BOOL" in problem["detail"], problem
    big = header({"W_enc": ("F32", [64, 2**20]), "b_enc": ("F32", [2**20]), "b_dec": ("F32", [64])})  # 260 MiB > 64
    status, problem = answer_before_the_body(base, f"/probes/f?{site}", big, len(big) + 4 * (65 * 2**20 + 64))
    assert (status, problem["field"]) == (507, "body") and "probes.max_mb" in problem["detail"], problem
    with httpx.Client(base_url=base, timeout=120) as c:
        assert c.get("/health").status_code == 200
        for meta, field in [({"k": "abc"}, "k"), ({"k": "1e3"}, "k"), ({"top_features": "-5"}, "top_features")]:
            body = safetensors.torch.save(sae(64, 48), metadata={"activation": "topk", **meta})
            r = c.post(f"/probes/m?{site}", content=body, headers={"content-type": "application/octet-stream"})
            assert r.status_code == 422 and r.json()["field"] == field, r.text
        assert c.get("/probes").json()["probes"] == []


@pytest.mark.slow
def test_a_bad_file_in_the_probes_directory_is_not_served(server, tiny_models):
    """What an older version stored (top_features -5) or a hand-written file holds is checked as an upload is."""
    base, home, log, _proc = server
    tensors = sae(64, 48)
    safetensors.torch.save_file(
        tensors,
        str(home / "probes" / "planted.safetensors"),
        metadata={"kind": "sae", "activation": "relu", "site": "blocks.1.hook_resid_post", "top_features": "-5"},
    )
    with httpx.Client(base_url=base, timeout=120) as c:
        assert all(p["name"] != "planted" for p in c.get("/probes").json()["probes"])
        r = c.post("/extract", json={"model": str(tiny_models["llama"]), "text": "hi", "probes": ["planted"]})
        assert r.status_code == 422 and r.json()["field"] == "probes[0]", r.text
    until(lambda: "cannot use" in log.read_text() and "planted" in log.read_text(), "the log names the file")


async def test_sae_files_are_parsed_off_the_event_loop_and_uploads_are_bounded(monkeypatch):
    import loom_interp.probes as probes
    from loom_interp.state import MAX_UPLOADS

    seen: list[bool] = []
    real = probes.read_safetensors

    def watched(body: bytes) -> Any:
        try:
            asyncio.get_running_loop()
            seen.append(True)
        except RuntimeError:
            seen.append(False)
        return real(body)

    monkeypatch.setattr(probes, "read_safetensors", watched)
    file = safetensors.torch.save(sae(64, 48))
    gates = [asyncio.Event() for _ in range(MAX_UPLOADS + 1)]
    pulled = [0] * len(gates)

    async def body(i: int) -> Any:  # the first bytes, then nothing until the test opens this upload's gate
        pulled[i] += 1
        yield file[:8]
        await gates[i].wait()
        yield file[8:]

    async with concurrent_client(app_with()) as c:
        site = "site=blocks.1.hook_resid_post"
        sends = [
            asyncio.ensure_future(
                c.post(f"/probes/s{i}?{site}", content=body(i), headers={"content-type": "application/octet-stream"})
            )
            for i in range(len(gates))
        ]
        await asyncio.wait_for(_until(lambda: sum(pulled) == MAX_UPLOADS), 60)
        for _ in range(20):
            await asyncio.sleep(0)
        assert sum(pulled) == MAX_UPLOADS  # the next upload's body is not read while the slots are taken
        for gate in gates:
            gate.set()
        assert [(await s).status_code for s in sends] == [201] * len(gates)
    assert seen == [False] * len(gates)


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)


# -- 9. probe fits ------------------------------------------------------------------------------------------------


async def test_probe_fits_are_capped_stopped_past_their_time_and_when_their_client_leaves(tiny_models):
    from loom_interp.state import interp

    path = str(tiny_models["llama"])
    words = ["cat", "dog", "sat", "mat", "the", "on"]
    texts = [f"{a} {b} {c}" for a in words for b in words for c in words]  # 216 texts
    fit = {"name": "f", "model": path, "site": 2, "texts": texts}
    app = app_with(options={"probes_fit_seconds": 0.001})
    async with concurrent_client(app) as c:
        r = await c.post("/probes/fit", json={**fit, "texts": texts[:2] * 129, "labels": [str(i) for i in range(258)]})
        assert r.status_code == 422 and r.json()["field"] == "labels" and "256" in r.json()["allowed"], r.text
        labels = [t.split()[0] for t in texts]
        r = await c.post("/probes/fit", json={**fit, "labels": labels})
        assert r.status_code == 503 and "probes.fit_seconds" in r.json()["detail"], r.text
        fits = interp(app.state.manager.kernel).fitter
        assert fits.stopped == 1 and fits.busy == [] and fits.idle == []
        fits.seconds = 0  # no limit: the next fit is stopped by its client leaving
        leaving = asyncio.ensure_future(c.post("/probes/fit", json={**fit, "labels": labels}))
        await asyncio.wait_for(_until(lambda: bool(fits.busy)), 600)
        worker = fits.busy[0]
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
        await asyncio.wait_for(_until(lambda: not worker.process.is_alive()), 60)
        assert fits.stopped == 2
        assert (await c.get("/probes")).json()["probes"] == []


def two_classes(tiny_models: Any) -> dict[str, Any]:
    """A fit of four texts in two classes on the tiny Llama."""
    texts = ["the cat sat", "the dog sat", "one two three", "four five six"]
    labels = ["animal", "animal", "count", "count"]
    return {"name": "f", "model": str(tiny_models["llama"]), "site": 2, "texts": texts, "labels": labels}


async def test_a_fit_whose_worker_dies_is_a_503_and_the_next_fits_run(tiny_models, monkeypatch):
    import loom_interp.probes
    from loom_interp.state import interp

    fit = two_classes(tiny_models)
    app = app_with()
    async with concurrent_client(app) as c:
        fits = interp(app.state.manager.kernel).fitter
        monkeypatch.setattr(loom_interp.probes, "train", killed_mid_fit)  # sent to the worker by its name
        r = await asyncio.wait_for(c.post("/probes/fit", json=fit), HANG_S)  # the bound only ends a hang
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["title"] == "Fit stopped" and "signal 9" in r.json()["detail"], r.text
        assert fits.busy == [] and fits.idle == []
        assert (await c.get("/probes")).json()["probes"] == []
        monkeypatch.undo()
        r = await asyncio.wait_for(c.post("/probes/fit", json=fit), HANG_S)
        assert r.status_code == 201, r.text
        (idle,) = fits.idle
        idle.process.kill()  # between fits: the idle worker is gone too
        idle.process.join()
        r = await asyncio.wait_for(c.post("/probes/fit", json={**fit, "name": "g"}), HANG_S)
        assert r.status_code == 201, r.text
        assert fits.idle[0].process is not idle.process and idle.conn.closed
        assert sorted(p["name"] for p in (await c.get("/probes")).json()["probes"]) == ["f", "g"]


def overflowing_llama(tiny: Any, root: Any, text: str, others: list[str]) -> str:
    """A copy of the tiny llama whose embedding of one token of ``text`` (in none of ``others`` nor the load's
    self-check) is infinite: its states are NaN from block 0 on wherever that token is read, its other texts' are
    finite."""
    import shutil

    import transformers
    from loom_transformers.selfcheck import PROBE

    path = root / "overflowing-llama"
    shutil.copytree(tiny, path)
    net = transformers.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def ids(t: str) -> set[int]:
        return set(tokenizer(t)["input_ids"])

    token = min(ids(text) - set().union(*map(ids, others)) - set(PROBE))
    with torch.no_grad():
        net.get_input_embeddings().weight[token] = float("inf")
    net.save_pretrained(path)
    return str(path)


async def test_a_fit_scikit_learn_would_refuse_is_a_422_naming_the_field_before_the_fit(tiny_models, tmp_path):
    from loom_interp.state import interp
    from sklearn.linear_model import LogisticRegression

    texts = ["the cat sat", "the dog sat", "one two three", "four five six", "the dog ran", "seven eight nine", "ten"]
    path = overflowing_llama(tiny_models["llama"], tmp_path, texts[0], texts[1:])
    fit = {"name": "f", "model": path, "site": 2, "texts": texts[:6]}
    app = app_with()
    async with concurrent_client(app) as c:
        for labels in (["a"] * 6, ["a", "a", "a", "b", "b", "c"], ["a", "b"] * 2):  # one class, one text, a count
            r = await c.post("/probes/fit", json={**fit, "labels": labels})
            assert r.status_code == 422 and r.json()["field"] == "labels", r.text
        labels = ["a", "a", "a", "b", "b", "b"]
        states = await c.post("/extract", json={"model": path, "text": texts[0], "hidden_state_layers": [2]})
        x = np.array(states.json()["hidden_states"]["2"]["data"] + [[0.0] * 64] * 5, dtype=float)  # null: NaN
        with pytest.raises(ValueError, match="NaN"):  # scikit-learn's own refusal of that text's state
            LogisticRegression().fit(x, [0, 0, 0, 1, 1, 1])
        r = await c.post("/probes/fit", json={**fit, "labels": labels})
        assert r.status_code == 422 and r.json()["field"] == "texts[0]" and "not finite" in r.json()["detail"], r.text
        assert interp(app.state.manager.kernel).fitter.idle == []  # refused before any worker was asked
        r = await c.post("/probes/fit", json={**fit, "texts": texts[1:], "labels": labels})
        assert r.status_code == 201, r.text


async def test_a_fit_scikit_learn_refuses_in_its_worker_is_a_422_and_the_worker_is_kept(tiny_models, monkeypatch):
    import loom_interp.probes
    from loom_interp.state import interp

    fit = two_classes(tiny_models)
    app = app_with()
    async with concurrent_client(app) as c:
        fits = interp(app.state.manager.kernel).fitter
        monkeypatch.setattr(loom_interp.probes, "train", refused_by_sklearn)  # sent to the worker by its name
        r = await asyncio.wait_for(c.post("/probes/fit", json=fit), HANG_S)  # the bound only ends a hang
        assert r.status_code == 422 and r.json()["field"] == "labels", r.text
        assert "scikit-learn" in r.json()["detail"] and "n_splits=5" in r.json()["detail"], r.text
        (kept,) = fits.idle
        monkeypatch.undo()
        r = await asyncio.wait_for(c.post("/probes/fit", json=fit), HANG_S)
        assert r.status_code == 201, r.text
        assert fits.idle == [kept]
        assert [p["name"] for p in (await c.get("/probes")).json()["probes"]] == ["f"]


# -- red-team round 3: what a review found answering 500 or storing what it cannot use --------------------------


async def test_odd_vectors_sites_and_aliased_rows_are_422_naming_the_field(tiny_models):
    path = str(tiny_models["gpt2"])
    async with concurrent_client(app_with()) as c:
        for dtype in (["x"], {"a": 1}):  # unhashable: a membership test used to raise
            wire = {"shape": [2], "data": [1, 2], "dtype": dtype}
            r = await c.post("/vectors", json={"name": "v", "vector": wire})
            assert r.status_code == 422 and r.json()["field"] == "vector", r.text
        texts = {"positive": ["good day", "great day"], "negative": ["bad day", "awful day"]}
        for site in ("blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"):
            r = await c.post("/vectors/contrast", json={"model": path, "site": site, **texts})
            assert r.status_code == 422 and r.json()["field"] == "site" and "per token" in r.json()["detail"], r.text
            fit = {"model": path, "name": "p", "site": site, "texts": [*texts["positive"], *texts["negative"]]}
            r = await c.post("/probes/fit", json={**fit, "labels": ["y", "y", "n", "n"]})
            assert r.status_code == 422 and r.json()["field"] == "site", r.text
        by_text = await c.post("/vectors/contrast", json={"model": path, "site": "2", **texts})
        by_int = await c.post("/vectors/contrast", json={"model": path, "site": 2, **texts})
        assert by_text.status_code == by_int.status_code == 200, by_text.text
        assert by_text.json()["vector"] == by_int.json()["vector"]
        tokens = (await c.post("/extract", json={"model": path, "text": "the cat sat"})).json()["token_count"]
        rows = {"site": 1, "op": "add", "vector": [[0.1] * 64, [0.2] * 64], "positions": [0, -tokens]}
        r = await c.post("/extract", json={"model": path, "text": "the cat sat", "interventions": [rows]})
        assert r.status_code == 422 and r.json()["field"] == "interventions[0].positions", r.text


async def test_sae_uploads_and_stored_vectors_hold_finite_numbers_and_unreadable_entries_are_kept(tmp_path):
    options = {"vectors_directory": str(tmp_path / "vectors"), "probes_directory": str(tmp_path / "probes")}
    (tmp_path / "vectors").mkdir()
    (tmp_path / "probes").mkdir()
    two = {"a": torch.ones(4), "b": torch.ones(4)}
    safetensors.torch.save_file(two, str(tmp_path / "vectors" / "two.safetensors"))
    safetensors.torch.save_file(
        {"vector": torch.tensor([1.0, float("nan")])}, str(tmp_path / "vectors" / "nan.safetensors")
    )
    async with concurrent_client(app_with(options=options)) as c:
        listed = {v["name"] for v in (await c.get("/vectors")).json()["vectors"]}
        assert not listed & {"two", "nan"}
        for name in ("two", "nan"):
            r = await c.get(f"/vectors/{name}")
            assert r.status_code == 404, r.text
            r = await c.post("/vectors", json={"name": name, "vector": [0.5] * 4})
            assert r.status_code == 409 and "cannot use" in r.json()["detail"], r.text
        assert (await c.post("/vectors", json={"name": "two", "vector": [0.5] * 4, "replace": True})).status_code == 201
        broken = sae(64, 48)
        broken["W_dec"][0, 0] = float("nan")
        r = await upload(c, "s", broken, "site=blocks.1.hook_resid_post")
        assert r.status_code == 422 and r.json()["field"] == "body" and "NaN" in r.json()["detail"], r.text


async def test_fields_are_named_as_sent_and_a_fits_name_is_checked_before_its_work(tiny_models):
    path = str(tiny_models["gpt2"])
    async with concurrent_client(app_with()) as c:
        r = await c.post("/logit_attribution", json={"model": path, "text": "", "target": {"token": " the"}})
        assert r.status_code == 422 and r.json()["field"] == "text", r.text
        context = (await c.post("/models/load", json={"model": path})).json()["model"]["max_context"]
        long = " ".join(f"w{i}" for i in range(context))  # more tokens than the context, within the characters
        patch = {
            "model": path,
            "clean": long,
            "corrupted": long,
            "sites": [1],
            "metric": {"type": "logprob", "token": " the"},
        }
        r = await c.post("/patch", json=patch)
        assert r.status_code == 422 and r.json()["field"] == "clean", r.text
        texts = ["good day", "great day", "bad day", "awful day"]
        fit = {"model": "no/such-model", "name": "p", "site": 1, "texts": texts, "labels": ["y", "y", "n", "n"]}
        r = await c.post("/probes/fit", json={**fit, "description": "d" * 5000})
        assert r.status_code == 422 and r.json()["field"] == "description", r.text  # not the model's 404
        r = await c.post(
            "/vectors/contrast",
            json={
                "model": "no/such-model",
                "site": 1,
                "name": "bad name!",
                "positive": texts[:2],
                "negative": texts[2:],
            },
        )
        assert r.status_code == 422 and r.json()["field"] == "name", r.text


async def test_a_text_cut_by_characters_is_reported_truncated(tiny_models):
    """The character bound (context x the longest token) cuts a text before any tokenizer sees it; a text padded
    with characters that make no tokens may then fit the context in tokens, and is still reported as cut."""
    from loom_kernel.inputs import char_limit

    path = str(tiny_models["bert"])
    async with concurrent_client(app_with()) as c:
        assert (await c.post("/models/load", json={"model": path})).status_code == 200
        model = await loaded(c._transport.app, path)
        padded = " " * (char_limit(model) + 10) + "hello world"
        r = await c.post("/embed", json={"model": path, "text": padded})
        assert r.status_code == 200 and r.json()["truncated"], r.text
        r = await c.post("/embed", json={"model": path, "text": "hello world"})
        assert r.status_code == 200 and not r.json()["truncated"], r.text


async def test_a_fit_or_contrast_names_a_text_too_long_by_its_place_in_the_request(tiny_models):
    """Texts are sent to the model in calls of 32: text 40 too long for the context is ``texts[40]`` (a contrast's
    ``negative[k]``), not the loader's ``text`` at row 8 of its call."""
    path = str(tiny_models["gpt2"])
    async with concurrent_client(app_with()) as c:
        context = (await c.post("/models/load", json={"model": path})).json()["model"]["max_context"]
        long = " ".join(f"w{i}" for i in range(context))  # more tokens than the context, within the characters
        texts = [f"text number {i}" for i in range(48)]
        texts[40] = long
        labels = ["y", "n"] * 24
        r = await c.post("/probes/fit", json={"model": path, "name": "p", "site": 1, "texts": texts, "labels": labels})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == "texts[40]" and r.json()["detail"].startswith("texts[40]: "), r.text
        body = {"model": path, "site": 1, "positive": texts[:8], "negative": texts[8:]}
        r = await c.post("/vectors/contrast", json=body)
        assert r.status_code == 422 and r.json()["field"] == "negative[32]", r.text
