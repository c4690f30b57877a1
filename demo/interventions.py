"""Steering, ablation and activation patching over HTTP, against a running Loom, with ``loom_client``.

1. Steering: a contrast vector (file-handling sentences minus arithmetic sentences, token mean, at a layer) added at
   growing scales while the model reads a neutral prompt: the log-probability of " file" as the next token, and the
   greedy continuation.
2. Ablation: the same direction projected out at every block's input (directional ablation) and each attention head
   of every block zeroed in turn (``attn.hook_z``): the same log-probability after a file-related prompt.
3. Circuit edits: the head whose zeroing moved that log-probability most, knocked out through its attention pattern
   (``attn.hook_pattern`` zeroed at the last position: TransformerLens's attention knock-out), with the pattern it
   had; and the last block's most active MLP neuron (``mlp.hook_post``) zeroed and doubled at the last position.
4. Patching: a clean and a corrupted prompt differing in one word, the clean residual stream patched into the
   corrupted run at every block's input and position, metric the logit difference between the two prompts'
   preferred next tokens; then the same sweep estimated by attribution patching (one forward and backward pass),
   plotted against the exact effects.
5. Direct logit attribution: that logit difference on the clean prompt split into the embeddings and each block's
   attention and MLP outputs (and per head), through the model's own final norm frozen at the last position.

    python demo/interventions.py --server http://127.0.0.1:8080 --model pydoc-gpt2 --out demo/outputs/interventions

Writes interventions.json, interventions.md, patching.png, attribution.png and dla.png to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
from loom_client import LoomClient

FILE_TEXTS = [
    "Open the file for reading and writing.",
    "The file object has a read() method.",
    "Write the data to the file and close it.",
    "A file opened in binary mode returns bytes.",
    "The file is closed when the with block ends.",
]
NUMBER_TEXTS = [
    "Return the sum of two numbers.",
    "The integer is converted to a float.",
    "Compute the square root of x.",
    "Add one to the counter and return it.",
    "The number is rounded to the nearest integer.",
]
NEUTRAL, FILE_PROMPT = "The function returns", "Open the"
CLEAN, CORRUPTED = "The file object has a", "The list object has a"
STEER_TOKEN = " file"
PATCH_METRIC = {"type": "logit_diff", "correct": " string", "incorrect": " class"}
SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)


def next_logprob(client: LoomClient, model: str, prompt: str, token: str, edits: list[dict[str, Any]]) -> float:
    """log p(token | prompt) under ``edits``, from the raw logits of one generated step."""
    answer = client.generate(model, prompt, max_tokens=1, return_logits=True, interventions=edits)
    logits = answer["logits"][0].astype(np.float64)
    logits -= logits.max()
    logp = logits - np.log(np.exp(logits).sum())
    return float(logp[token_id(client, model, token)])


def token_id(client: LoomClient, model: str, token: str) -> int:
    ids = client.extract(model, token, add_special_tokens=False)["token_ids"]
    if len(ids) != 1:
        raise SystemExit(f"{token!r} is {len(ids)} tokens for {model}")
    return ids[0]


def steering(client: LoomClient, model: str, layer: int) -> dict[str, Any]:
    made = client.contrast(
        model, layer, FILE_TEXTS, NUMBER_TEXTS, positions="mean", name="file-vs-number", replace=True
    )
    rows = []
    for scale in SCALES:
        edits = [{"site": layer, "op": "add", "vector": "file-vs-number", "scale": scale}] if scale else []
        text = client.generate(model, NEUTRAL, max_tokens=16, interventions=edits)["text"]
        rows.append(
            {"scale": scale, "logprob_file": next_logprob(client, model, NEUTRAL, STEER_TOKEN, edits), "text": text}
        )
    return {"layer": layer, "norm": made["norm"], "separation": made["separation"], "rows": rows}


def ablation(client: LoomClient, model: str) -> dict[str, Any]:
    sites = client.sites(model)
    n = sites["num_layers"]
    heads = sites["sites"]["blocks.0.attn.hook_z"][0]
    direction = client.vector("file-vs-number")["vector"]
    every_block = [{"site": f"blocks.{i}.hook_resid_pre", "op": "ablate", "vector": direction} for i in range(n)]
    baseline = next_logprob(client, model, FILE_PROMPT, STEER_TOKEN, [])
    ablated = next_logprob(client, model, FILE_PROMPT, STEER_TOKEN, every_block)
    unit = direction / np.linalg.norm(direction)
    states = client.extract(
        model,
        FILE_PROMPT,
        hidden_state_layers=[f"blocks.{n - 1}.hook_resid_pre"],
        positions="all",
        interventions=every_block,
    )["sequence_hidden_states"][f"blocks.{n - 1}.hook_resid_pre"]
    heads_effect = [
        [
            next_logprob(
                client,
                model,
                FILE_PROMPT,
                STEER_TOKEN,
                [{"site": f"blocks.{b}.attn.hook_z", "op": "zero", "heads": [h]}],
            )
            - baseline
            for h in range(heads)
        ]
        for b in range(n)
    ]
    return {
        "baseline_logprob_file": baseline,
        "direction_ablated_logprob_file": ablated,
        "max_projection_after_ablation": float(np.abs(states @ unit).max()),
        "head_zeroed_change": heads_effect,
    }


def circuits(client: LoomClient, model: str, ablated: dict[str, Any]) -> dict[str, Any]:
    """One head knocked out through its pattern, one neuron zeroed and doubled: log p(STEER_TOKEN | FILE_PROMPT)."""
    n = client.sites(model)["num_layers"]
    effects = np.abs(np.array(ablated["head_zeroed_change"]))
    block, head = (int(i) for i in np.unravel_index(np.argmax(effects), effects.shape))
    pattern_site, neuron_site = f"blocks.{block}.attn.hook_pattern", f"blocks.{n - 1}.mlp.hook_post"
    seen = client.extract(model, FILE_PROMPT, hidden_state_layers=[pattern_site, neuron_site], positions="all")
    pattern = seen["sequence_hidden_states"][pattern_site][-1, head]  # the last query's attention over the keys
    activations = seen["sequence_hidden_states"][neuron_site][-1]
    neuron = int(np.argmax(np.abs(activations)))
    one_hot = np.zeros_like(activations)
    one_hot[neuron] = 1.0
    knock = [{"site": pattern_site, "op": "zero", "heads": [head], "positions": [-1]}]
    zero = [{"site": neuron_site, "op": "ablate", "vector": one_hot, "positions": [-1]}]
    double = [
        {"site": neuron_site, "op": "add", "vector": one_hot, "scale": float(activations[neuron]), "positions": [-1]}
    ]
    return {
        "baseline_logprob_file": ablated["baseline_logprob_file"],
        "head": {"block": block, "head": head, "site": pattern_site, "pattern": pattern.tolist()},
        "tokens": seen["tokens"],
        "knocked_out_logprob_file": next_logprob(client, model, FILE_PROMPT, STEER_TOKEN, knock),
        "neuron": {"block": n - 1, "index": neuron, "site": neuron_site, "activation": float(activations[neuron])},
        "neuron_zeroed_logprob_file": next_logprob(client, model, FILE_PROMPT, STEER_TOKEN, zero),
        "neuron_doubled_logprob_file": next_logprob(client, model, FILE_PROMPT, STEER_TOKEN, double),
    }


def patching(client: LoomClient, model: str) -> dict[str, Any]:
    return client.patch(model, CLEAN, CORRUPTED, "resid_pre", PATCH_METRIC)


def attribution_patching(client: LoomClient, model: str, exact: dict[str, Any]) -> dict[str, Any]:
    """The exact sweep again, estimated by attribution patching: each cell against its exact effect."""
    estimate = client.patch(model, CLEAN, CORRUPTED, "resid_pre", PATCH_METRIC, method="attribution")
    corrupted = exact["metric"]["corrupted"]
    effects = np.array(exact["patched"], dtype=np.float64) - corrupted
    estimated = np.array(estimate["attribution"], dtype=np.float64)
    return {
        "exact_effect": effects.tolist(),
        "attribution": estimated.tolist(),
        "correlation": float(np.corrcoef(effects.ravel(), estimated.ravel())[0, 1]) if effects.std() else None,
        "runs": {"exact": exact["runs"], "attribution": estimate["runs"]},
    }


def logit_attribution(client: LoomClient, model: str) -> dict[str, Any]:
    target = {"tokens": [PATCH_METRIC["correct"], PATCH_METRIC["incorrect"]]}
    layers = client.logit_attribution(model, target, text=CLEAN, components="layers")
    heads = client.logit_attribution(model, target, text=CLEAN, components="heads")
    return {"layers": layers, "heads": heads}


def plot_attribution(scatter: dict[str, Any], dla: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = np.ravel(scatter["exact_effect"]), np.ravel(scatter["attribution"])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(x, y, s=14)
    bound = max(np.abs(x).max(), np.abs(y).max(), 1e-9) * 1.1
    ax.plot([-bound, bound], [-bound, bound], color="grey", linewidth=0.8)
    ax.set_xlabel("exact: patched - corrupted")
    ax.set_ylabel("attribution patching estimate")
    ax.set_title("resid_pre, every block and position")
    fig.tight_layout()
    fig.savefig(out / "attribution.png", dpi=120)
    plt.close(fig)
    comps = dla["layers"]["components"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(comps), 3.5))
    values = [c["value"] for c in comps]
    ax.bar(range(len(comps)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.set_xticks(range(len(comps)), [c["site"].replace("blocks.", "").replace("hook_", "") for c in comps])
    ax.tick_params(axis="x", rotation=60)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title(f"direct logit attribution: sum {dla['layers']['sum']:.3f} = logit diff {dla['layers']['logit']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "dla.png", dpi=120)
    plt.close(fig)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array([[np.nan if v is None else v for v in row] for row in result["normalized"]])
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * matrix.shape[1], 1.0 + 0.5 * matrix.shape[0]))
    image = ax.imshow(matrix, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), result["tokens"]["corrupted"], rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), result["sites"])
    ax.set_title("clean resid_pre patched into the corrupted run (normalized)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(report: dict[str, Any]) -> str:
    s, a, p, c = report["steering"], report["ablation"], report["patching"], report["circuits"]
    lines = [
        f"# Interventions on {report['model']}",
        "",
        f"The Loom {report['server_version']}, {report['date']}. Produced by `demo/interventions.py`.",
        "",
        f"## Steering (contrast vector at layer {s['layer']}, norm {s['norm']:.3f})",
        "",
        f"Mean projection on the direction: file texts {s['separation']['positive_mean_projection']:.3f}, "
        f"number texts {s['separation']['negative_mean_projection']:.3f}.",
        "",
        f"| scale | log p({STEER_TOKEN!r} \\| {NEUTRAL!r}) | greedy continuation |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['scale']:g} | {r['logprob_file']:.3f} | {json.dumps(r['text'])} |" for r in s["rows"]]
    lines += [
        "",
        "## Ablation",
        "",
        f"log p({STEER_TOKEN!r} | {FILE_PROMPT!r}): {a['baseline_logprob_file']:.3f}; with the file direction "
        f"projected out at every block's input: {a['direction_ablated_logprob_file']:.3f} (largest projection left: "
        f"{a['max_projection_after_ablation']:.1e}).",
        "",
        "Change in that log-probability when one head is zeroed (rows: blocks, columns: heads):",
        "",
        "| block | " + " | ".join(f"head {h}" for h in range(len(a["head_zeroed_change"][0]))) + " |",
        "| --- | " + " | ".join("---" for _ in a["head_zeroed_change"][0]) + " |",
    ]
    lines += [
        f"| {b} | " + " | ".join(f"{v:+.3f}" for v in row) + " |" for b, row in enumerate(a["head_zeroed_change"])
    ]
    head, neuron = c["head"], c["neuron"]
    attended = ", ".join(
        f"{t.replace(chr(0x120), chr(0xB7))} {w:.2f}" for t, w in zip(c["tokens"], head["pattern"], strict=True)
    )
    lines += [
        "",
        "## Circuit edits",
        "",
        f"Head {head['head']} of block {head['block']} (the largest change above) knocked out at the last position "
        f"(`{head['site']}` zeroed for that head): log p({STEER_TOKEN!r}) {c['baseline_logprob_file']:.3f} -> "
        f"{c['knocked_out_logprob_file']:.3f}. The last token's attention it removed: {attended}.",
        "",
        f"Neuron {neuron['index']} of block {neuron['block']}'s MLP (`{neuron['site']}`), the most active at the last "
        f"position ({neuron['activation']:+.3f}): zeroed, log p({STEER_TOKEN!r}) -> "
        f"{c['neuron_zeroed_logprob_file']:.3f}; doubled, {c['neuron_doubled_logprob_file']:.3f}.",
    ]
    lines += [
        "",
        f'## Patching ("{CLEAN}" into "{CORRUPTED}")',
        "",
        f"Metric: logit({PATCH_METRIC['correct']!r}) - logit({PATCH_METRIC['incorrect']!r}) at the last position: "
        f"clean {p['metric']['clean']:.3f}, corrupted "
        f"{p['metric']['corrupted']:.3f}; {p['runs']} runs in {p['calls']} batched calls. Normalized effect of "
        "patching the clean residual stream at each block's input and position (`patching.png`):",
        "",
        "| site | " + " | ".join(t.replace("\u0120", "\u00b7") for t in p["tokens"]["corrupted"]) + " |",
        "| --- | " + " | ".join("---" for _ in p["positions"]) + " |",
    ]
    lines += [
        f"| {site} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |"
        for site, row in zip(p["sites"], p["normalized"], strict=True)
    ]
    d, sc = report["dla"], report["attribution_patching"]
    top = sorted((c for c in d["heads"]["components"] if "head" in c), key=lambda c: -abs(c["value"]))[:6]
    lines += [
        "",
        "Attribution patching estimates the same sweep from the clean pass and one forward and backward pass of the "
        f"corrupted run ({sc['runs']['attribution']} passes against {sc['runs']['exact']} runs; `attribution.png`): "
        f"correlation with the exact effects {sc['correlation']:.3f}."
        if sc["correlation"] is not None
        else "Attribution patching: the exact effects are all zero.",
        "",
        f"## Direct logit attribution of logit({PATCH_METRIC['correct']!r}) - logit({PATCH_METRIC['incorrect']!r}) "
        f"after {CLEAN!r}",
        "",
        f"The components sum to {d['layers']['sum']:.4f}; the model's own logit difference is "
        f"{d['layers']['logit']:.4f} (`dla.png`).",
        "",
        "| component | value |",
        "| --- | --- |",
    ]
    lines += [f"| {c['site']} | {c['value']:+.4f} |" for c in d["layers"]["components"]]
    lines += ["", "The heads that contribute most (each head's result through the frozen final norm):", ""]
    lines += ["| component | head | value |", "| --- | --- | --- |"]
    lines += [f"| {c['site']} | {c.get('head', '')} | {c['value']:+.4f} |" for c in top]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="pydoc-gpt2")
    parser.add_argument("--layer", type=int, default=2, help="where the steering vector is made and added")
    parser.add_argument("--out", type=Path, default=Path("demo/.cache/outputs/interventions"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with LoomClient(args.server, timeout=600) as client:
        report = {
            "model": args.model,
            "server_version": client.health()["version"],
            "date": datetime.date.today().isoformat(),
            "steering": steering(client, args.model, args.layer),
            "ablation": ablation(client, args.model),
            "patching": patching(client, args.model),
        }
        report["circuits"] = circuits(client, args.model, report["ablation"])
        report["attribution_patching"] = attribution_patching(client, args.model, report["patching"])
        report["dla"] = logit_attribution(client, args.model)
        client.delete_vector("file-vs-number")
    (args.out / "interventions.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "interventions.md").write_text(summary(report))
    plot(report["patching"], args.out / "patching.png")
    plot_attribution(report["attribution_patching"], report["dla"], args.out)
    print(summary(report))
    return report


if __name__ == "__main__":
    main()
