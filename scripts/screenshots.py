"""Screenshots of each view of /viewer for the README (docs/img/viewer-*.png), drawn by headless Chromium from a real
server: with `pydoc-gpt2` where the server finds it, else with a tiny GPT-2 built offline (random weights: the
pictures then show the layout, not a trained model's behaviour). The vector, probe and SAE the views show are made
here through the API: a contrast vector and a fitted probe as the README's examples make them, and a small sparse
autoencoder trained for a minute on the model's own states.

    .venv/bin/python scripts/screenshots.py                 # -> docs/img/viewer-{lens,attention,steer,patch,probes}.png
    .venv/bin/python scripts/screenshots.py --out /tmp/shots --model /path/to/a/causal/model

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`) and selenium.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # serverutil: the tests' `loom serve` runner

# What each model is shown with: the README's examples for pydoc-gpt2; for a tiny model, words its tokenizer has.
PYDOC = {
    "lens": {"text": "The file object has a", "target": " string"},
    "attention": {"text": "Open the file for reading and return the number of lines", "layer": "2", "head": "1"},
    "steer": {"prompt": "The function returns", "scale": "2", "max_tokens": "24"},
    "patch": {"clean": "The file object has a", "corrupted": "The list object has a"}
    | {"correct": " string", "incorrect": " class"},
    "probes": {"text": "Read the data from the file, then return the sum of the numbers."},
}
TINY = {
    "lens": {"text": "The quick brown fox jumps over the lazy dog", "target": " fox"},
    "attention": {"text": "The quick brown fox jumps over the lazy dog", "layer": "2", "head": "1"},
    "steer": {"prompt": "The quick brown", "scale": "4", "max_tokens": "16"},
    "patch": {
        "clean": "The quick brown fox",
        "corrupted": "The lazy brown fox",
        "correct": " over",
        "incorrect": " lazy",
    },
    "probes": {"text": "The quick brown fox jumps over the lazy dog"},
}
FILE_TEXTS = ["Open the file for reading and writing.", "Write the data to the file and close it."]
FILE_TEXTS += ["Read the next line from the file object.", "The file is closed when the block ends."]
NUMBER_TEXTS = ["Return the sum of two numbers.", "Compute the square root of x."]
NUMBER_TEXTS += ["Multiply the integer by a float.", "The result is rounded to the nearest even number."]


def post(api: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    r = api.post(path, json=body)
    if r.status_code not in (200, 201):
        raise SystemExit(f"{path}: {r.status_code} {r.text}")
    return r.json()


def choose_model(api: httpx.Client, wanted: str | None, scratch: Path) -> str:
    """``wanted``, else pydoc-gpt2 where the server finds it, else a tiny GPT-2 built here."""
    for model in [wanted] if wanted else ["pydoc-gpt2"]:
        r = api.post("/models/load", json={"model": model})
        if r.status_code == 200:
            return model
        if wanted:
            raise SystemExit(f"{model}: {r.status_code} {r.json().get('detail')}")
        print(f"screenshots: pydoc-gpt2 is not here ({r.json().get('detail')}); a tiny GPT-2 instead", file=sys.stderr)
    from loom_transformers.testing import build_tiny_model

    model = str(build_tiny_model("gpt2", scratch))
    post(api, "/models/load", {"model": model})
    return model


def train_sae(api: httpx.Client, model: str, site: str, texts: list[str], features: int) -> bytes:
    """A ReLU sparse autoencoder fitted for a few hundred steps on the model's own states at ``site`` (from
    /extract), as a safetensors file under SAELens's tensor names."""
    import torch
    from safetensors.torch import save

    body = {"model": model, "text": "", "hidden_state_layers": [site], "positions": "all"}
    rows = [post(api, "/extract", {**body, "text": t})["sequence_hidden_states"][site]["data"] for t in texts]
    x = torch.tensor([r for rs in rows for r in rs], dtype=torch.float32)
    torch.manual_seed(0)
    d = x.shape[1]
    w_enc = torch.nn.Parameter(torch.randn(d, features) / d**0.5)
    w_dec = torch.nn.Parameter(w_enc.detach().T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(features))
    b_dec = torch.nn.Parameter(x.mean(0))
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=3e-3)
    scale = x.norm(dim=1).mean()
    for _ in range(300):
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        loss = ((f @ w_dec + b_dec - x) ** 2).sum(1).mean() / scale**2 + 0.1 * f.sum(1).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    tensors = {"W_enc": w_enc.detach(), "W_dec": w_dec.detach(), "b_enc": b_enc.detach(), "b_dec": b_dec.detach()}
    return save({k: v.contiguous() for k, v in tensors.items()})


def prepare(api: httpx.Client, model: str, hidden: int, layers: int) -> dict[str, str]:
    """The stored vector, probe and SAE that the steering and probes views show; returns their names."""
    site = min(2, layers)
    contrast = {"model": model, "site": site, "positions": "mean", "positive": FILE_TEXTS, "negative": NUMBER_TEXTS}
    post(api, "/vectors/contrast", {**contrast, "name": "file-vs-number"})
    labels = ["file"] * len(FILE_TEXTS) + ["number"] * len(NUMBER_TEXTS)
    fit = {"name": "topic", "model": model, "site": site, "positions": "mean"}
    post(api, "/probes/fit", {**fit, "texts": FILE_TEXTS + NUMBER_TEXTS, "labels": labels})
    sae_site = f"blocks.{site - 1}.hook_resid_post"
    from pydoc_data.topics import topics

    texts = [topics[k][:300] for k in sorted(topics)[:30]]  # within pydoc-gpt2's 128 tokens
    sae = train_sae(api, model, sae_site, texts, features=2 * hidden)
    r = api.post(
        f"/probes/sae?site={sae_site}&activation=relu&top_features=6",
        content=sae,
        headers={"content-type": "application/octet-stream"},
    )
    if r.status_code not in (200, 201):
        raise SystemExit(f"/probes/sae: {r.status_code} {r.text}")
    return {"vector": "file-vs-number", "probes": "topic,sae"}


def fit_window(driver: Any, width: int) -> None:
    """A window as tall as the page, so that one screenshot holds all of it (and a tooltip stays where it is)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height)
    extra = height - driver.execute_script("return window.innerHeight")
    if extra > 0:  # a window manager's decorations, where there is one
        driver.set_window_size(width, height + extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--model", help="a causal model id or directory (default: pydoc-gpt2, else a tiny GPT-2)")
    args = parser.parse_args()

    from loom_viewer.testing import chromium, console_errors, foreign, requested_urls, settled
    from selenium.webdriver.common.action_chains import ActionChains
    from serverutil import loom_server

    cache = os.environ.get("LOOM_CACHE") or str(Path("~/.cache/loom").expanduser())  # the server gets its own HOME
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, loom_server([], Path(scratch), LOOM_CACHE=cache) as (url, _, _):
        with httpx.Client(base_url=url, timeout=600) as api:
            model = choose_model(api, args.model, Path(scratch))
            meta = next(m for m in api.get("/models").json()["loaded_models"] if m["model_id"] == model)
            names = prepare(api, model, meta["hidden_size"], meta["num_layers"])
        examples = PYDOC if model == "pydoc-gpt2" else TINY
        views = {
            "lens": examples["lens"],
            "attention": {"view": "attention", **examples["attention"]},
            "steer": {"view": "steer", "vector": names["vector"], **examples["steer"]},
            "patch": {"view": "patch", **examples["patch"]},
            "probes": {"view": "probes", "probes": names["probes"], **examples["probes"]},
        }
        with chromium(width=1280, height=900) as driver:
            for name, params in views.items():
                requested_urls(driver)
                driver.get(f"{url}/viewer?{urlencode({'model': model, **params})}")
                state = settled(driver)
                if state != "done":
                    raise SystemExit(f"{name}: {driver.find_element('id', 'status').text}")
                fit_window(driver, 1280)
                if name == "lens":  # the tooltip of the first layer's last position (beside the grid): its top-k
                    first = driver.find_element("css selector", ".lens-cell").get_attribute("data-layer")
                    cell = driver.find_elements("css selector", f'.lens-cell[data-layer="{first}"]')[-1]
                    ActionChains(driver).move_to_element(cell).perform()
                if leaks := foreign(requested_urls(driver), url):
                    raise SystemExit(f"{name}: requests left the origin: {leaks}")
                if errors := console_errors(driver):
                    raise SystemExit(f"{name}: console errors: {errors}")
                driver.save_screenshot(str(args.out / f"viewer-{name}.png"))
                print(f"screenshots: {args.out / f'viewer-{name}.png'} ({model})", file=sys.stderr)


if __name__ == "__main__":
    main()
