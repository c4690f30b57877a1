"""The viewer in a real browser (headless Chromium under selenium) against a real `loom serve` with a tiny GPT-2:
each view opened from its URL draws exactly the server's answer to the same request, which the page also shows
as a curl command; no request leaves the origin and the console stays free of errors."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from loom_viewer.testing import browser_paths, chromium, console_errors, foreign, requested_urls, settled, wait_for

pytestmark = pytest.mark.slow  # one real server process and one browser for the module

TEXT = "The quick brown fox jumps over the lazy dog"
PROMPT = "The quick brown"
KEY = "viewer-test-key"


@pytest.fixture(scope="module")
def model(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["gpt2"])  # a causal model with hook points and 3 blocks of 4 heads


@pytest.fixture(scope="module")
def base(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from serverutil import loom_server

    with loom_server(["--preload", model], tmp_path_factory.mktemp("viewer-home")) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def api(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if browser_paths() is None:
        pytest.fail("the viewer's tests need chromium and chromedriver: `bash scripts/dev.sh test` installs them")
    with chromium() as driver:
        yield driver


def post(api: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    r = api.post(path, json=body)
    assert r.status_code in (200, 201), r.text
    return r.json()


def open_view(browser: Any, base: str, **params: str) -> str:
    """Open /viewer?params, wait for its answer, and check that nothing left the origin and nothing was logged."""
    requested_urls(browser)  # empty the logs of what came before
    console_errors(browser)
    browser.get(f"{base}/viewer?{urlencode(params)}")
    state = settled(browser)
    assert state == "done", browser.find_element("id", "status").text
    assert f"{base}/viewer/static/js/main.js" in assert_clean(browser, base)  # the log did record the page
    return state


def assert_clean(browser: Any, base: str) -> list[str]:
    """No request since the last look went elsewhere than ``base``, and the console logged no error."""
    urls = requested_urls(browser)
    assert foreign(urls, base) == []
    assert console_errors(browser) == []
    return urls


def drawn(browser: Any, selector: str) -> list[dict[str, str]]:
    """The data-* attributes of every element ``selector`` finds, in document order."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => ({...e.dataset}))", selector
    )


def shown_requests(browser: Any) -> list[tuple[str, dict[str, Any]]]:
    """The (URL, JSON body) of each curl command the page shows."""
    commands = [c for c in browser.find_element("id", "curl").text.split("\n") if c.startswith("curl ")]
    out = []
    for command in commands:
        words = shlex.split(command)
        url = next(w for w in words if w.startswith("http"))
        out.append((url, json.loads(words[words.index("-d") + 1])))
    return out


def test_files_are_served_with_their_types_and_a_strict_policy(api: httpx.Client) -> None:
    page = api.get("/viewer")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    srcs = re.findall(r'(?:src|href)="(/viewer/static/[^"]+)"', page.text)
    assert len(srcs) == 3  # favicon, style sheet, script
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for src in srcs:
        r = api.get(src)
        assert r.status_code == 200 and r.headers["content-type"].startswith(types[Path(src).suffix])
        assert r.headers["content-security-policy"] == policy
    for missing in ("/viewer/static/nope.js", "/viewer/static/%2e%2e/pages.py", "/viewer/static/..%2Fpages.py"):
        r = api.get(missing)
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert "/viewer" not in api.get("/schema/openapi.json").json()["paths"]


def assert_lens_drawn(browser: Any, base: str, api: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The page asked for ``body`` and drew a cell for every layer and position of the server's answer to it, with
    that position's top token; the answer's ``logit_lens``."""
    assert shown_requests(browser) == [(f"{base}/extract", body)]
    lens = post(api, "/extract", body)["logit_lens"]
    cells = drawn(browser, ".lens-cell")
    assert [(c["layer"], int(c["position"])) for c in cells] == [(k, p) for k in lens for p in lens[k]["positions"]]
    for c in cells:
        top = lens[c["layer"]]["top_k"][lens[c["layer"]]["positions"].index(int(c["position"]))][0]
        assert (c["token"], int(c["tokenId"]), float(c["logprob"])) == (top["token"], top["token_id"], top["logprob"])
    return lens


def test_logit_lens(browser: Any, base: str, api: httpx.Client, model: str) -> None:
    open_view(browser, base, model=model, text=TEXT, target=" fox")
    body = {
        "model": model,
        "text": TEXT,
        "positions": "all",
        "hidden_state_layers": [],
        "logit_lens": {"layers": "all", "top_k": 5, "tokens": [" fox"]},
    }
    lens = assert_lens_drawn(browser, base, api, body)

    # the target's curve at the last position, then at a position picked by clicking its token
    for pick in (None, 2):
        if pick is not None:
            browser.find_element("css selector", f'.col-label[data-column="{pick}"]').click()
            assert parse_qs(urlsplit(browser.current_url).query)["position"] == [str(pick)]
        position = pick if pick is not None else len(lens["-1"]["positions"]) - 1
        curve = [(k, lens[k]["tokens"][" fox"]) for k in lens]
        points = drawn(browser, ".target-point")[: len(curve)]
        assert [(p["layer"], int(p["position"]), int(p["rank"]), float(p["logprob"])) for p in points] == [
            (k, position, t["rank"][position], t["logprob"][position]) for k, t in curve
        ]

    # hovering a cell shows its top-k
    from selenium.webdriver.common.action_chains import ActionChains

    cell = browser.find_elements("css selector", ".lens-cell")[3]
    ActionChains(browser).move_to_element(cell).perform()
    tip = wait_for(browser, lambda d: d.find_element("id", "tip").text)
    data = cell.get_attribute("data-layer"), int(cell.get_attribute("data-position"))
    top = lens[data[0]]["top_k"][data[1]]
    assert len(top) == 5 and all(t["token"].strip() in tip for t in top)

    # the model picker lists the loaded models
    options = browser.execute_script("return [...document.querySelectorAll('#models option')].map((o) => o.value)")
    assert model in options
    assert_clean(browser, base)


def test_a_tuned_lens(browser: Any, base: str, api: httpx.Client, model: str) -> None:
    """A stored tuned lens named in the form: the page asks for it and draws the server's answer through it."""
    import safetensors.torch
    import torch

    g = torch.Generator().manual_seed(0)
    config = json.loads((Path(model) / "config.json").read_text())
    layers, width = config["n_layer"], config["n_embd"]
    lens = {f"layer_translators.{i}.weight": torch.randn(width, width, generator=g) * 0.3 for i in range(layers)}
    lens |= {f"layer_translators.{i}.bias": torch.randn(width, generator=g) for i in range(layers)}
    r = api.post(
        "/probes/viewer-lens?kind=tuned_lens",
        content=safetensors.torch.save(lens),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    open_view(browser, base, model=model, text=TEXT, tuned="viewer-lens")
    body = {
        "model": model,
        "text": TEXT,
        "positions": "all",
        "hidden_state_layers": [],
        "logit_lens": {"layers": "all", "top_k": 5, "tuned": "viewer-lens"},
    }
    lens = assert_lens_drawn(browser, base, api, body)
    plain = post(api, "/extract", {**body, "logit_lens": {"layers": "all", "top_k": 5}})["logit_lens"]
    assert lens != plain  # the translators moved the lens


def test_attention(browser: Any, base: str, api: httpx.Client, model: str) -> None:
    from selenium.webdriver.support.select import Select

    open_view(browser, base, model=model, text=TEXT, view="attention", layer="2", head="1")
    body = {"model": model, "text": TEXT, "positions": "all", "hidden_state_layers": [2], "return_attention": True}
    assert shown_requests(browser) == [(f"{base}/extract", body)]
    answer = post(api, "/extract", body)
    heads, queries, keys = answer["attentions"]["2"]["shape"]
    assert (heads, queries, keys) == (4, len(answer["token_ids"]), len(answer["token_ids"]))

    def check(layer: str, head: int) -> None:
        pattern = answer["attentions"][layer]["data"][head]
        cells = drawn(browser, ".attn-cell")
        assert len(cells) == queries * keys
        rows: dict[int, dict[int, float]] = {}
        for c in cells:
            rows.setdefault(int(c["query"]), {})[int(c["key"])] = float(c["weight"])
        for q, row in rows.items():
            assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)
            assert all(w == 0.0 for k, w in row.items() if k > q)  # causal: nothing after the query
            assert [row[k] for k in range(keys)] == pattern[q]

    check("2", 1)
    # another head is drawn from the same answer; another layer asks again
    Select(browser.find_element("css selector", 'select[data-picker="head"]')).select_by_value("3")
    assert parse_qs(urlsplit(browser.current_url).query)["head"] == ["3"]
    check("2", 3)
    assert not [u for u in requested_urls(browser) if u.endswith("/extract")]
    Select(browser.find_element("css selector", 'select[data-picker="layer"]')).select_by_value("1")
    assert settled(browser) == "done"
    answer = post(api, "/extract", {**body, "hidden_state_layers": [1]})
    check("1", 3)
    assert_clean(browser, base)

    # a pattern under an edit: block 0's attention output zeroed changes what block 2 attends to
    edit = [{"site": "blocks.0.hook_attn_out", "op": "zero"}]
    open_view(browser, base, model=model, text=TEXT, view="attention", layer="2", interventions=json.dumps(edit))
    edited = {**body, "interventions": edit}
    assert shown_requests(browser) == [(f"{base}/extract", edited)]
    plain = post(api, "/extract", body)["attentions"]["2"]["data"][0]
    answer = post(api, "/extract", edited)
    assert answer["attentions"]["2"]["data"][0] != plain
    check("2", 0)


def test_steering_side_by_side(browser: Any, base: str, api: httpx.Client, model: str) -> None:
    import torch

    vector = (torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4).tolist()
    post(api, "/vectors", {"name": "push", "vector": vector, "site": 1, "model": model, "replace": True})
    open_view(browser, base, model=model, prompt=PROMPT, view="steer", vector="push", scale="8", max_tokens="12")

    def texts() -> dict[str, str]:
        panes = {p["side"]: p for p in drawn(browser, ".pane")}
        assert {s: p["state"] for s, p in panes.items()} == {"base": "done", "steered": "done"}
        shown = browser.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('.pane')]"
            ".map((e) => [e.dataset.side, e.textContent]))"
        )
        assert shown == {s: p["text"] for s, p in panes.items()}  # the streamed tokens add up to the final text
        return shown

    def greedy(scale: float | None) -> str:
        body: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        if scale is not None:
            body["interventions"] = [{"site": 1, "op": "add", "vector": "push", "scale": scale}]
        return post(api, "/generate", body)["text"]

    base_text = greedy(None)
    assert texts() == {"base": base_text, "steered": greedy(8)}
    assert greedy(8) != base_text  # the vector does change this model's generation
    assert [body for _, body in shown_requests(browser)] == [
        {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        {
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 12,
            "temperature": 0,
            "interventions": [{"site": 1, "op": "add", "vector": "push", "scale": 8}],
        },
    ]

    # the slider reruns the steered side only
    requested_urls(browser)
    browser.execute_script(
        "const s = document.querySelector('input[name=scale-slider]'); s.value = '-3.5';"
        "s.dispatchEvent(new Event('change'))"
    )
    assert settled(browser) == "done"
    assert texts() == {"base": base_text, "steered": greedy(-3.5)}
    assert parse_qs(urlsplit(browser.current_url).query)["scale"] == ["-3.5"]
    assert len([u for u in requested_urls(browser) if u.endswith("/generate/stream")]) == 1
    assert_clean(browser, base)


def test_patching(browser: Any, base: str, api: httpx.Client, model: str) -> None:
    params = {
        "clean": "The quick brown fox",
        "corrupted": "The lazy brown fox",
        "correct": " over",
        "incorrect": " lazy",
    }
    open_view(browser, base, model=model, view="patch", **params)
    body = {
        "model": model,
        "clean": params["clean"],
        "corrupted": params["corrupted"],
        "sites": "resid_pre",
        "positions": "all",
        "metric": {"type": "logit_diff", "correct": " over", "incorrect": " lazy"},
    }
    assert shown_requests(browser) == [(f"{base}/patch", body)]
    answer = post(api, "/patch", body)
    cells = drawn(browser, ".patch-cell")
    assert [(c["site"], int(c["position"])) for c in cells] == [
        (s, p) for s in answer["sites"] for p in answer["positions"]
    ]
    for c in cells:
        s, p = answer["sites"].index(c["site"]), answer["positions"].index(int(c["position"]))
        want = answer["normalized"][s][p]
        assert (float(c["value"]) if c["value"] else None) == want
        assert float(c["patched"]) == answer["patched"][s][p]
    metric = drawn(browser, ".metric")[0]
    assert (float(metric["clean"]), float(metric["corrupted"])) == (
        answer["metric"]["clean"],
        answer["metric"]["corrupted"],
    )


def test_probes_and_sae_features(browser: Any, base: str, api: httpx.Client, model: str, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    texts = ["The quick brown fox", "The lazy dog", "Hidden states are activations", "Embeddings place sentences"]
    fit = {"name": "topic", "model": model, "site": 2, "positions": "mean", "texts": texts}
    post(api, "/probes/fit", {**fit, "labels": ["animal", "animal", "ml", "ml"]})
    g = torch.Generator().manual_seed(0)
    sae = {"W_enc": torch.randn(64, 32, generator=g), "b_enc": torch.zeros(32), "b_dec": torch.zeros(64)}
    save_file(sae, tmp_path / "sae.safetensors")
    r = api.post(
        "/probes/feats?site=blocks.1.hook_resid_post&activation=relu&top_features=4",
        content=(tmp_path / "sae.safetensors").read_bytes(),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code in (200, 201), r.text

    open_view(browser, base, model=model, view="probes", text=TEXT, probes="topic,feats")
    body = {"model": model, "text": TEXT, "positions": "all", "hidden_state_layers": [], "probes": ["topic", "feats"]}
    assert shown_requests(browser) == [(f"{base}/extract", body)]
    scores = post(api, "/extract", body)["probe_scores"]
    topic = scores["topic"]
    cells = drawn(browser, ".probe-cell")
    assert len(cells) == len(topic["positions"]) * len(topic["labels"])
    for c in cells:
        assert c["probe"] == "topic"
        row = topic["positions"].index(int(c["position"]))
        assert float(c["score"]) == topic["data"][row][topic["labels"].index(c["label"])]
    feats = scores["feats"]
    shown = drawn(browser, ".sae-feature")
    assert [(int(f["position"]), int(f["feature"]), float(f["value"])) for f in shown] == [
        (p, f["index"], f["value"])
        for p, top in zip(feats["positions"], feats["top_features"], strict=True)
        for f in top
    ]
    assert [int(x["l0"]) for x in drawn(browser, ".l0")] == feats["l0"]


def test_an_error_shows_the_problem_detail(browser: Any, base: str, api: httpx.Client, model: str) -> None:
    requested_urls(browser)
    console_errors(browser)
    browser.get(f"{base}/viewer?{urlencode({'model': model, 'text': TEXT, 'layers': '99'})}")
    assert settled(browser) == "error"
    body = {
        "model": model,
        "text": TEXT,
        "positions": "all",
        "hidden_state_layers": [],
        "logit_lens": {"layers": [99], "top_k": 5},
    }
    r = api.post("/extract", json=body)
    assert r.status_code == 422
    assert r.json()["detail"] in browser.find_element("id", "status").text
    assert foreign(requested_urls(browser), base) == []
    # the refused request is the one thing the console reports
    assert [e["message"] for e in console_errors(browser)] == [
        f"{base}/extract - Failed to load resource: the server responded with a status of 422 (Unprocessable Entity)"
    ]


def test_api_key_is_asked_once(browser: Any, tmp_path: Path) -> None:
    from serverutil import loom_server

    with loom_server([], tmp_path, LOOM_API_KEY=KEY) as (url, _, _):
        assert httpx.get(f"{url}/viewer").status_code == 200  # the page holds no data: a browser opens it keyless
        assert httpx.get(f"{url}/models").status_code == 401
        console_errors(browser)
        browser.get(f"{url}/viewer?view=patch")
        dialog = wait_for(browser, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is not None)
        assert dialog
        assert "API key" in browser.find_element("id", "key-reason").text
        browser.find_element("id", "key-input").send_keys(KEY)
        browser.find_element("id", "key-ok").click()
        wait_for(browser, lambda d: d.execute_script("return sessionStorage.getItem('loom-api-key')") == KEY)
        wait_for(browser, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is None)
        assert [e["message"] for e in console_errors(browser)] == [
            f"{url}/models - Failed to load resource: the server responded with a status of 401 (Unauthorized)"
        ]
        # kept for the tab: the next page asks nothing and its requests carry the key
        browser.get(f"{url}/viewer?view=attention")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.models"))  # /models answered
        assert browser.find_element("id", "key-dialog").get_attribute("open") is None
        assert console_errors(browser) == []
        browser.execute_script("sessionStorage.clear()")


@pytest.fixture
def other_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Another site's page: a directory served on ``localhost`` (a site other than 127.0.0.1) on a port of its own."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def answers(browser: Any, prefix: str, seen: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the browser sent to and got from URLs that start with ``prefix``, by the URL's ``via`` query value: the
    request's ``origin`` and ``sec-fetch-*`` headers (``sent``) and the answer's ``status``. ``seen`` keeps what
    earlier looks read, by DevTools' request id (whose events may come in any order)."""
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message["method"], message["params"]
        request = seen.setdefault(params.get("requestId", ""), {})
        if method == "Network.requestWillBeSent":
            request["url"] = params["request"]["url"]
        elif method == "Network.requestWillBeSentExtraInfo":
            headers = {k.lower(): v for k, v in params["headers"].items()}
            request["sent"] = {k: v for k, v in headers.items() if k == "origin" or k.startswith("sec-fetch-")}
        elif method == "Network.responseReceivedExtraInfo":
            request["status"] = params["statusCode"]
    return {
        parse_qs(urlsplit(r["url"]).query)["via"][0]: r for r in seen.values() if r.get("url", "").startswith(prefix)
    }


def test_another_sites_page_cannot_make_the_server_work(
    browser: Any, base: str, model: str, other_site: tuple[str, Path]
) -> None:
    """A page of another site asks the server for a loader probe (a GET that reads the disk) in every way a page
    can without the user: each is refused before the server does anything, whether the browser sent an ``Origin``
    or only its ``Sec-Fetch-Site``. A link to the viewer that the user follows from that page opens it."""
    site, root = other_site
    target = f"{base}/loaders/probe/{model}"
    (root / "index.html").write_text(
        "<!doctype html><title>elsewhere</title>"
        f'<img src="{target}?via=img"><script src="{target}?via=script"></script>'
        f'<iframe src="{target}?via=iframe"></iframe>'
        f'<script>fetch("{target}?via=fetch").catch(() => {{}});'
        f'fetch("{target}?via=no-cors", {{mode: "no-cors"}}).catch(() => {{}});</script>'
        f'<a id="viewer" href="{base}/viewer">the viewer</a>'
    )
    vias = {"img", "script", "iframe", "fetch", "no-cors"}
    seen: dict[str, dict[str, Any]] = {}
    browser.get_log("performance")  # empty the log of what came before
    browser.get(f"{site}/index.html")

    def answered(driver: Any) -> dict[str, dict[str, Any]] | None:
        got = answers(driver, target, seen)
        return got if all({"sent", "status"} <= got.get(via, {}).keys() for via in vias) else None

    done = wait_for(browser, answered)
    assert {via: done[via]["status"] for via in vias} == dict.fromkeys(vias, 403)
    # only the CORS fetch says its Origin: the Sec-Fetch-Site rule is what refuses the others
    assert {via for via in vias if "origin" in done[via]["sent"]} == {"fetch"}
    assert {done[via]["sent"]["sec-fetch-site"] for via in vias} == {"cross-site"}
    console_errors(browser)
    browser.find_element("id", "viewer").click()
    wait_for(
        browser, lambda d: d.current_url == f"{base}/viewer" and d.execute_script("return document.body.dataset.models")
    )
    # The other site's own errors (its missing favicon, which the browser may ask for late) are not the viewer's.
    assert [e for e in console_errors(browser) if not e["message"].startswith(site)] == []


def test_a_link_from_another_site_fills_the_form_but_runs_nothing(
    browser: Any, base: str, model: str, other_site: tuple[str, Path]
) -> None:
    """Another site's page sends the tab to a viewer URL on its own (no click): the guard lets a top-level navigation
    open the page, so the page itself must not then load the model and run the request that URL describes, with the
    tab's API key (same-origin fetches the guard cannot tell from the user's). It fills the form and waits for Run."""
    site, root = other_site
    target = f"{base}/viewer?{urlencode({'model': model, 'text': TEXT})}"
    (root / "go.html").write_text(f"<!doctype html><title>elsewhere</title><script>location = {target!r};</script>")
    requested_urls(browser)
    console_errors(browser)
    browser.get(f"{site}/go.html")
    wait_for(browser, lambda d: d.current_url == target and d.execute_script("return document.body.dataset.models"))
    assert settled(browser) == "done"
    assert "another site" in browser.find_element("id", "status").text
    assert f"{base}/extract" not in requested_urls(browser)
    console_errors(browser)  # what the other site's page logged (its missing favicon)
    form = browser.find_element("id", "form")
    assert browser.find_element("id", "model").get_attribute("value") == model
    assert form.find_element("name", "text").get_attribute("value") == TEXT
    browser.find_element("id", "run").click()  # the user's own Run sends it
    wait_for(browser, lambda d: d.find_elements("css selector", ".lens-cell"))
    assert settled(browser) == "done"
    assert f"{base}/extract" in assert_clean(browser, base)
