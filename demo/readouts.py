"""The logit lens and a probe trained on the server, against a running Loom, with ``loom_client``.

1. Logit lens: every layer of the model read through its own final norm and LM head at every position of a prompt:
   the top token and its probability (a layers x positions picture), and where a chosen answer token appears.
2. A probe fitted on the server (``/probes/fit``) on the model's states for sentences about files against
   sentences about numbers, with its training and cross-validated accuracy, then its scores token by token while
   the model generates, and a generation stopped by it (``stop_when``).

    python demo/readouts.py --server http://127.0.0.1:8080 --model pydoc-gpt2 --out demo/outputs/readouts

Writes readouts.json, readouts.md and logit_lens.png to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
from loom_client import LoomClient

PROMPT = "The file object has a"
ANSWER = " string"
FILES = [
    "Open the file for reading and writing.",
    "The file object has a read() method.",
    "Write the data to the file and close it.",
    "A file opened in binary mode returns bytes.",
    "The file is closed when the with block ends.",
    "Seek to the start of the file before reading.",
    "The path names a file on the disk.",
    "Flush the file buffer before closing it.",
]
NUMBERS = [
    "Return the sum of two numbers.",
    "The integer is converted to a float.",
    "Compute the square root of x.",
    "Add one to the counter and return it.",
    "The number is rounded to the nearest integer.",
    "Multiply the value by ten.",
    "Divide the total by the count.",
    "The result is a negative number.",
]
GENERATE_FROM = "Read the data from the"


def lens(client: LoomClient, model: str) -> dict[str, Any]:
    answer = client.extract(
        model,
        PROMPT,
        positions="all",
        logit_lens={"layers": "all", "top_k": 1, "tokens": [ANSWER]},
        hidden_state_layers=[-1],
    )
    layers = sorted(answer["logit_lens"], key=int)
    n = len(layers)
    top = {k: [row[0] for row in answer["logit_lens"][k]["top_k"]] for k in layers}
    curve = {k: answer["logit_lens"][k]["tokens"][ANSWER] for k in layers}
    return {
        "prompt": PROMPT,
        "tokens": answer["tokens"],
        "layers": [int(k) + n + 1 for k in layers],  # hidden-state indices 1..N: every block's output
        "top": [[{"token": t["token"], "p": float(np.exp(t["logprob"]))} for t in top[k]] for k in layers],
        "answer": ANSWER,
        "answer_rank_last": [curve[k]["rank"][-1] for k in layers],
        "answer_p_last": [float(np.exp(curve[k]["logprob"][-1])) for k in layers],
    }


def probe(client: LoomClient, model: str, layer: int) -> dict[str, Any]:
    fitted = client.fit_probe(
        "topic",
        model,
        layer,
        FILES + NUMBERS,
        ["file"] * len(FILES) + ["number"] * len(NUMBERS),
        positions="mean",
        replace=True,
    )
    run = client.generate(model, GENERATE_FROM, max_tokens=24, probes=["topic"], positions="all")
    scores = run["probe_scores"]["topic"]
    column = scores["labels"].index("file")
    tokens = client.extract(model, GENERATE_FROM + run["text"], add_special_tokens=True)["tokens"]
    per_token = [row[column] for row in scores["data"]]
    above = float(np.median(per_token[run["prompt_tokens"] :])) if len(per_token) > run["prompt_tokens"] else 0.5
    stopped = client.generate(
        model, GENERATE_FROM, max_tokens=24, stop_when=[{"probe": "topic", "label": "file", "above": above}]
    )
    client.delete_probe("topic")
    return {
        "layer": layer,
        "train_accuracy": fitted["train_accuracy"],
        "cv_accuracy": fitted["cv_accuracy"],
        "cv_folds": fitted["cv_folds"],
        "generation": run["text"],
        "tokens": tokens,
        "p_file": per_token,
        "stop_above": above,
        "stopped": {
            "text": stopped["text"],
            "finish_reason": stopped["finish_reason"],
            "stopped_by": stopped.get("stopped_by"),
        },
    }


def shown(token: str) -> str:
    """A byte-level BPE token as text: its space marker as a middle dot, its newline as \\n."""
    return token.replace("\u0120", "\u00b7").replace("\u010a", "\\n")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens_ = report["lens"]
    p = np.array([[cell["p"] for cell in row] for row in lens_["top"]])
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * p.shape[1], 1.0 + 0.6 * p.shape[0]))
    ax.imshow(p, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(lens_["top"]):
        for j, cell in enumerate(row):
            ax.text(j, i, f"{cell['token']!r}\n{cell['p']:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(p.shape[1]), [shown(t) for t in lens_["tokens"]], rotation=45, ha="right")
    ax.set_yticks(range(p.shape[0]), [f"index {i}" for i in lens_["layers"]])
    ax.set_title(f"logit lens on {report['model']}: top next token and its probability")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(report: dict[str, Any]) -> str:
    lens_, pr = report["lens"], report["probe"]
    lines = [
        f"# Readouts on {report['model']}",
        "",
        f"The Loom {report['server_version']}, {report['date']}. Produced by `demo/readouts.py`.",
        "",
        f"## Logit lens of {lens_['prompt']!r} (`logit_lens.png`)",
        "",
        f"Where {lens_['answer']!r} stands as the next token after the last position, layer by layer:",
        "",
        "| hidden-state index | top token at the last position | its p | rank of the answer | p of the answer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, layer in enumerate(lens_["layers"]):
        top = lens_["top"][i][-1]
        lines.append(
            f"| {layer} | {json.dumps(top['token'])} | {top['p']:.3f} | {lens_['answer_rank_last'][i]} | "
            f"{lens_['answer_p_last'][i]:.4f} |"
        )
    lines += [
        "",
        f"## A probe fitted on the server (file vs number sentences, token mean at index {pr['layer']})",
        "",
        f"Training accuracy {pr['train_accuracy']:.2f}, {pr['cv_folds']}-fold cross-validated accuracy "
        f"{pr['cv_accuracy']:.2f}. Its p(file) at each token of a generation from {GENERATE_FROM!r}:",
        "",
        "| token | p(file) |",
        "| --- | --- |",
    ]
    lines += [f"| {shown(t)} | {p:.3f} |" for t, p in zip(pr["tokens"], pr["p_file"], strict=False)]
    stop = pr["stopped"]
    lines += [
        "",
        f"With `stop_when: [{{probe: topic, label: file, above: {pr['stop_above']:.3f}}}]` the same generation ends "
        f"with finish_reason {stop['finish_reason']!r} after {json.dumps(stop['text'])} "
        f"(rule: {json.dumps(stop['stopped_by'])}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="pydoc-gpt2")
    parser.add_argument("--layer", type=int, default=2, help="where the probe reads the states")
    parser.add_argument("--out", type=Path, default=Path("demo/.cache/outputs/readouts"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with LoomClient(args.server, timeout=600) as client:
        report = {
            "model": args.model,
            "server_version": client.health()["version"],
            "date": datetime.date.today().isoformat(),
            "lens": lens(client, args.model),
            "probe": probe(client, args.model, args.layer),
        }
    (args.out / "readouts.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "readouts.md").write_text(summary(report))
    plot(report, args.out / "logit_lens.png")
    print(summary(report))
    return report


if __name__ == "__main__":
    main()
