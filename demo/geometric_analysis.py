"""Geometric analysis of hidden states, layer by layer, for several models served by a running Loom.

For each model, every prompt goes through ``POST /extract`` with every layer index 0..N (0 is the embedding output)
and every token position. Per layer, the rows (``--rows``: every token of every prompt by default; or the last
token, or the token mean, one row per prompt) are stacked into a matrix whose geometry ``loom_geometry.metrics``
measures: D_eff in its entropy form and its 90%-variance form, the spectral decay exponent beta, the rows' norms.
The same texts then go through the server's ``POST /analyze``, and the two computations must agree.

    python demo/geometric_analysis.py --server http://127.0.0.1:8080 --model minilm --model /abs/path/to/causal \\
        --out demo/outputs

Writes to ``--out``: metrics.json, states.npz (float16 row matrices, ``<model>/layer_03``), deff_by_layer.png,
beta_by_layer.png, norms_by_layer.png, model_comparison.png and summary.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loom_geometry.metrics import layer_metrics

HERE = Path(__file__).resolve().parent
METRICS = ("deff_entropy", "deff_90", "beta", "norm_mean", "norm_std", "rank")
RTOL = 1e-5  # the server batches the prompts (padding, other matmul shapes): float32 noise, nothing more


@dataclass
class ModelStates:
    """One model's row matrices (layer index -> [rows, H] float32) and what the server said about the model."""

    model: str
    label: str
    metadata: dict[str, Any]
    layers: dict[int, np.ndarray] = field(default_factory=dict)
    row_tokens: list[str] = field(default_factory=list)
    row_prompt: list[int] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)


def read_prompts(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    return prompts


def model_label(model: str) -> str:
    """A short name for files and legends: the alias itself, or a path's or hub id's last component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1]) or "model"


def display_id(model: str) -> str:
    # a local model under the working directory is recorded relative to it, so committed outputs name no home dir
    path = Path(model)
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return model
    return model


def select_rows(seq: np.ndarray, rows: str) -> np.ndarray:
    """The rows one prompt contributes to a layer's matrix, as /analyze selects them (in float32, as it does)."""
    if rows == "tokens":
        return seq
    if rows == "last":
        return seq[-1:]
    return seq.mean(axis=0, keepdims=True, dtype=np.float32)


def collect(client: Any, model: str, prompts: list[str], rows: str) -> ModelStates:
    # "all" leaves out index 0 (the embedding output); the first call learns N so that 0..N can be named explicitly
    first = client.extract(model, prompts[0], hidden_state_layers=[0])
    n = int(first["metadata"]["num_layers"])
    layers = list(range(n + 1))
    out = ModelStates(model=model, label=model_label(model), metadata=first["metadata"])
    per_layer: dict[int, list[np.ndarray]] = {i: [] for i in layers}
    for p, text in enumerate(prompts):
        r = client.extract(model, text, hidden_state_layers=layers, positions="all", hidden_state_format="base64")
        for i in layers:
            per_layer[i].append(select_rows(np.asarray(r["sequence_hidden_states"][str(i)], np.float32), rows))
        tokens = [str(t) for t in r["tokens"]]
        out.token_counts.append(int(r["token_count"]))
        picked = tokens if rows == "tokens" else [tokens[-1] if rows == "last" else "<mean>"]
        out.row_tokens.extend(picked)
        out.row_prompt.extend([p] * len(picked))
    out.layers = {i: np.concatenate(per_layer[i]) for i in layers}
    return out


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no nan; beta is nan below rank 2 (no slope)


def layer_table(states: ModelStates) -> list[dict[str, Any]]:
    n = int(states.metadata["num_layers"])
    table = []
    for i, matrix in states.layers.items():
        m = layer_metrics(matrix)
        table.append(
            {
                "layer_index": i,
                "normalized_depth": i / n,
                "rows": int(matrix.shape[0]),
                **{k: finite_or_none(v) if isinstance(v, float) else v for k, v in m.items()},
            }
        )
    return table


def relative_difference(a: float | None, b: float | None, scale: float = 0.0) -> float:
    """|a - b| relative to the larger of the two, or to ``scale`` when that is larger."""
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(a), abs(b), scale, 1e-12)


def cross_check(client: Any, states: ModelStates, prompts: list[str], rows: str, table: list[dict]) -> dict[str, Any]:
    """The same metrics from the server's POST /analyze over the same texts and rows, and the largest disagreement."""
    r = client.analyze(states.model, prompts, hidden_state_layers=sorted(states.layers), rows=rows)
    worst = {k: 0.0 for k in ("rows", *METRICS)}
    for mine in table:
        theirs = r["layers"][str(mine["layer_index"])]
        for k in worst:
            # a spread of equal norms (a LayerNorm output) is float noise around 0: measure it against the norm
            scale = mine["norm_mean"] if k == "norm_std" else 0.0
            worst[k] = max(worst[k], relative_difference(mine[k], theirs[k], scale))
    return {
        "endpoint": "POST /analyze",
        "rows": r["rows"],
        "token_counts_agree": r["token_counts"] == states.token_counts,
        "max_relative_difference": worst,
        "rtol": RTOL,
        "agrees": r["token_counts"] == states.token_counts and all(v <= RTOL for v in worst.values()),
    }


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed member timestamps so that the same states give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def states_arrays(all_states: list[ModelStates]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for s in all_states:
        for i, matrix in s.layers.items():
            arrays[f"{s.label}/layer_{i:02d}"] = matrix.astype(np.float16)  # float16: a tenth of the bytes of JSON
        arrays[f"{s.label}/row_tokens"] = np.array(s.row_tokens, dtype=str)
        arrays[f"{s.label}/row_prompt"] = np.array(s.row_prompt, dtype=np.int32)
    return arrays


# ---- plots ----------------------------------------------------------------------------------------------------


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version string: the same figure, the same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)


def label_axes(ax: Any, xlabel: str = "layer index (0 = embedding output)", **labels: Any) -> None:
    """Title, axis labels, a light grid (minor ticks too, on a log axis) and the legend: every plot's finish."""
    ax.set(xlabel=xlabel, **labels)
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def series(report: dict[str, Any], key: str, x: str = "layer_index") -> tuple[list[float], list[float]]:
    layers = report["layers"]
    return [layer[x] for layer in layers], [math.nan if layer[key] is None else layer[key] for layer in layers]


def plot_deff(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "deff_entropy", "D_eff, entropy form: exp(H) of the spectrum"),
        (axes[1], "deff_90", "D_eff, 90% form: directions holding 90% of sum s²"),
    ):
        for r in reports:
            ax.plot(*series(r, key), marker="o", label=f"{r['label']} (H={r['hidden_size']})")
        label_axes(ax, title=title, ylabel="D_eff")
    save(fig, path)


def plot_beta(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in reports:
        ax.plot(*series(r, "beta"), marker="o", label=r["label"])
    label_axes(ax, title="beta: spectral decay, s_i² ~ i^-beta", ylabel="beta")
    save(fig, path)


def plot_norms(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in reports:
        x, mean = series(r, "norm_mean")
        _, std = series(r, "norm_std")
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=r["label"])
    ax.set_yscale("log")  # the models' scales differ by orders of magnitude
    label_axes(ax, title="L2 norm of the rows (mean ± std)", ylabel="norm")
    save(fig, path)


def plot_comparison(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in reports:
        x, deff = series(r, "deff_entropy", "normalized_depth")
        _, rank = series(r, "rank", "normalized_depth")
        _, beta = series(r, "beta", "normalized_depth")
        label = f"{r['label']} (N={r['num_layers']}, H={r['hidden_size']})"
        axes[0].plot(x, [d / r["hidden_size"] for d in deff], marker="o", label=label)
        axes[1].plot(x, [d / k if k else math.nan for d, k in zip(deff, rank, strict=True)], marker="o", label=label)
        axes[2].plot(x, beta, marker="o", label=label)
    for ax, title, ylabel in (
        (axes[0], "D_eff (entropy) / hidden size", "fraction of H"),
        (axes[1], "D_eff (entropy) / rank of the matrix", "fraction of rank"),
        (axes[2], "beta", "beta"),
    ):
        label_axes(ax, title=title, ylabel=ylabel, xlabel="normalized depth (layer index / N)", xlim=(-0.03, 1.03))
    save(fig, path)


# ---- summary ----------------------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 2) -> str:
    return "undefined" if x is None else f"{x:.{digits}f}"


def observations(r: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers, so the summary says what this run measured and nothing else."""
    layers = r["layers"]
    first, last = layers[0], layers[-1]
    peak = max(layers, key=lambda x: x["deff_entropy"])
    low = min(layers, key=lambda x: x["deff_entropy"])
    betas = [x for x in layers if x["beta"] is not None]
    steepest = max(betas, key=lambda x: x["beta"]) if betas else None
    change = last["deff_entropy"] / first["deff_entropy"] if first["deff_entropy"] else math.nan
    out = [
        f"D_eff (entropy) goes from {fmt(first['deff_entropy'])} at the embedding output to "
        f"{fmt(last['deff_entropy'])} at layer {last['layer_index']} (x{change:.2f}); it is highest at layer "
        f"{peak['layer_index']} ({fmt(peak['deff_entropy'])}) and lowest at layer {low['layer_index']} "
        f"({fmt(low['deff_entropy'])}).",
        f"At the last layer D_eff is {100 * last['deff_entropy'] / r['hidden_size']:.1f}% of the hidden size "
        f"({r['hidden_size']}) and {100 * last['deff_entropy'] / last['rank']:.1f}% of the matrix's rank "
        f"({last['rank']}); {last['deff_90']} directions hold 90% of the energy.",
        f"Mean row norm goes from {fmt(first['norm_mean'])} to {fmt(last['norm_mean'])} "
        f"(x{last['norm_mean'] / first['norm_mean']:.2f}).",
    ]
    if steepest is not None:
        out.append(
            f"beta ranges over {fmt(min(x['beta'] for x in betas))}..{fmt(steepest['beta'])}, steepest "
            f"(most collapsed spectrum) at layer {steepest['layer_index']}."
        )
    return out


def comparison_lines(reports: list[dict[str, Any]]) -> list[str]:
    if len(reports) < 2:
        return []

    def mean_beta(r: dict[str, Any]) -> float:
        return float(np.nanmean([math.nan if x["beta"] is None else x["beta"] for x in r["layers"]]))

    final = {r["label"]: r["layers"][-1]["deff_entropy"] / r["hidden_size"] for r in reports}
    betas = {r["label"]: mean_beta(r) for r in reports}
    wide, narrow = max(final, key=final.get), min(final, key=final.get)
    steep, flat = max(betas, key=betas.get), min(betas, key=betas.get)
    return [
        f"At normalized depth 1, D_eff / hidden size is {final[wide]:.3f} for {wide} and {final[narrow]:.3f} for "
        f"{narrow}: {wide} spreads its final states over the larger share of its dimensions.",
        f"Averaged over depth, beta is {betas[steep]:.2f} for {steep} and {betas[flat]:.2f} for {flat}.",
    ]


def summary_markdown(report: dict[str, Any]) -> str:
    out = [
        "# Geometric analysis of hidden states",
        "",
        f"{len(report['prompts'])} prompts, rows = `{report['rows']}` ({report['rows_note']}). The Loom "
        f"{report['server_version']}, {report['date']}. Metrics from `loom_geometry.metrics` on the "
        "states fetched with POST /extract, checked against the server's POST /analyze.",
        "",
    ]
    for r in report["models"]:
        check = r["cross_check"]
        worst = max(check["max_relative_difference"].values())
        out += [
            f"## {r['label']}",
            "",
            f"`{r['id']}`: loader `{r['loader']}`, {r['num_layers']} layers, hidden size {r['hidden_size']}, "
            f"{r['layers'][0]['rows']} rows per layer ({sum(r['token_counts'])} tokens in all).",
            "",
            "| layer | depth | rows | rank | D_eff (entropy) | D_eff (90%) | beta | norm mean | norm std |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for x in r["layers"]:
            out.append(
                f"| {x['layer_index']} | {x['normalized_depth']:.2f} | {x['rows']} | {x['rank']} | "
                f"{fmt(x['deff_entropy'])} | {x['deff_90']} | {fmt(x['beta'], 3)} | {fmt(x['norm_mean'])} | "
                f"{fmt(x['norm_std'])} |"
            )
        out += ["", *(f"- {line}" for line in observations(r))]
        out.append(
            f"- POST /analyze {'agrees' if check['agrees'] else 'DISAGREES'}: largest relative difference "
            f"{worst:.1e} (tolerance {check['rtol']:.0e})."
        )
        out.append("")
    if lines := comparison_lines(report["models"]):
        out += ["## Comparison", "", *(f"- {line}" for line in lines), ""]
    out += [
        "## Reading these numbers",
        "",
        "- The matrices are not mean-centred (as the original README computes D_eff), so a shared mean direction "
        "counts as one strong direction and lowers D_eff.",
        f"- D_eff can never exceed the rank, and the rank is at most min(rows, hidden size): with rows = "
        f"`{report['rows']}` that is {', '.join(str(r['layers'][0]['rows']) for r in report['models'])} rows. "
        "Compare layers and models on the same prompts only.",
        "- Layer N is the last block's output as transformers returns it: after the final norm where the architecture "
        "has one (GPT-2, Llama), the raw block output where it has none (BERT); a norm layer fixes the rows' scale.",
        "- Plots: deff_by_layer.png, beta_by_layer.png, norms_by_layer.png, model_comparison.png.",
        "",
    ]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------------------------------------------

ROWS_NOTE = {
    "tokens": "every token of every prompt, special tokens included",
    "last": "one row per prompt, its last token",
    "mean": "one row per prompt, the mean over its tokens",
}


def model_report(states: ModelStates, table: list[dict[str, Any]], check: dict[str, Any]) -> dict[str, Any]:
    meta = states.metadata
    return {
        "id": display_id(states.model),
        "label": states.label,
        "loader": meta.get("loader"),
        "dtype": meta.get("dtype"),
        "num_layers": int(meta["num_layers"]),
        "hidden_size": int(meta["hidden_size"]),
        "rows": int(table[0]["rows"]),
        "token_counts": states.token_counts,
        "layers": table,
        "cross_check": check,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loom_client import LoomClient

    prompts = read_prompts(args.prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    labels = [model_label(m) for m in args.model]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"two models share a name ({labels}); the outputs are keyed by it")

    started = time.perf_counter()
    all_states, reports = [], []
    with LoomClient(args.server, api_key=args.api_key, timeout=args.timeout) as client:
        health = client.health()
        for model in args.model:
            t0 = time.perf_counter()
            states = collect(client, model, prompts, args.rows)
            table = layer_table(states)
            check = cross_check(client, states, prompts, args.rows, table)
            all_states.append(states)
            reports.append(model_report(states, table, check))
            print(
                f"{states.label}: {len(table)} layers x {table[0]['rows']} rows, D_eff {table[0]['deff_entropy']:.1f}"
                f" -> {table[-1]['deff_entropy']:.1f}, /analyze agrees: {check['agrees']} "
                f"({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )

    report = {
        "server": args.server,
        "server_version": health.get("version"),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "rows": args.rows,
        "rows_note": ROWS_NOTE[args.rows],
        "metrics": {
            "deff_entropy": "exp(H), H = -sum p_i log p_i, p_i = s_i^2 / sum s_j^2 (singular values, not centred)",
            "deff_90": "fewest directions holding 90% of sum s_i^2",
            "beta": "negated least-squares slope of log s_i^2 against log i; inf (null here) at rank 1",
            "norm_mean/norm_std": "mean and standard deviation of the rows' L2 norms",
        },
        "prompts": prompts,
        "models": reports,
    }
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    write_npz(args.out / "states.npz", states_arrays(all_states))

    import matplotlib

    matplotlib.use("Agg")
    plot_deff(reports, args.out / "deff_by_layer.png")
    plot_beta(reports, args.out / "beta_by_layer.png")
    plot_norms(reports, args.out / "norms_by_layer.png")
    plot_comparison(reports, args.out / "model_comparison.png")
    (args.out / "summary.md").write_text(summary_markdown(report))
    print(f"wrote {args.out}/ in {time.perf_counter() - started:.1f} s", flush=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--server", default=os.environ.get("LOOM_URL", "http://127.0.0.1:8080"), help="http(s)://... or unix:///..."
    )
    p.add_argument("--model", action="append", required=True, help="a model id, alias or absolute path; repeat")
    p.add_argument("--out", type=Path, default=HERE / "outputs")
    p.add_argument("--prompts", type=Path, default=HERE / "prompts.txt", help="one prompt a line")
    p.add_argument("--rows", choices=sorted(ROWS_NOTE), default="tokens", help="which states make a layer's matrix")
    p.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY"))
    p.add_argument("--timeout", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    report = run(parse_args(argv))
    failed = [r["label"] for r in report["models"] if not r["cross_check"]["agrees"]]
    if failed:
        print(f"POST /analyze disagrees with the client-side metrics for {failed}; see metrics.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
