"""The GPU paths through the real app, against transformers itself on the same device: dtypes, bitsandbytes,
placement.

    python scripts/cuda_checks.py [--device cuda] [--root DIR] [--cases float32,8bit] [--archs llama,gpt2]

For each tiny causal model (``loom_transformers.testing``) and each case (float32, float16, bfloat16, 8bit, 4bit,
``device_map: auto``), the app (``create_app``, default device ``--device``) answers ``/extract`` of every layer
at every position (safetensors) and a greedy ``/generate`` of 12 tokens; transformers loads the same checkpoint
with the same arguments (the dtype the app reports, the same ``BitsAndBytesConfig``, the same ``device_map``) and
runs ``output_hidden_states`` and ``generate``. Prints, per case, the device and dtype the app reports, the largest
difference of any state relative to the largest state of its layer, and whether the tokens agree. Exits 1 when a
state differs by more than the case's tolerance or a float32 case's tokens differ. On a machine without CUDA,
``--device cpu`` runs the same checks where they can run (the 8bit and 4bit cases need bitsandbytes' CPU backend).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

PROMPT = "The quick brown fox jumps over the lazy dog. Hidden states"
# The app and transformers run the same modules on the same weights: anything beyond rounding is a bug.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2, "8bit": 2e-2, "4bit": 2e-2, "device_map": 1e-5}
CASES: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32"},
    "float16": {"dtype": "float16"},
    "bfloat16": {"dtype": "bfloat16"},
    "8bit": {"quantization": "8bit"},
    "4bit": {"quantization": "4bit"},
    "device_map": {"device_map": "auto"},
}


def reference(path: Path, fields: dict[str, Any], dtype: str, device: str) -> Any:
    """transformers' own load of ``path`` with what the app was asked for."""
    import torch
    from loom_bitsandbytes import bnb_config
    from transformers import AutoModelForCausalLM

    from loom_kernel import LoadOptions

    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if "quantization" in fields:
        kwargs["quantization_config"] = bnb_config(fields["quantization"], LoadOptions(device=device))
        kwargs["device_map"] = device
    elif "device_map" in fields:
        kwargs["device_map"] = fields["device_map"]
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    return model if "device_map" in kwargs else model.to(device)


def check(client: Any, path: Path, case: str, device: str) -> tuple[str, bool]:
    """One line of the table, and whether the case passed."""
    import torch
    from safetensors.torch import load
    from transformers import AutoConfig, AutoTokenizer

    fields = CASES[case]
    body = {"model": str(path), **fields}
    layers = list(range(AutoConfig.from_pretrained(str(path)).num_hidden_layers + 1))  # the embeddings too
    r = client.post(
        "/extract",
        json={**body, "text": PROMPT, "hidden_state_layers": layers, "return_full_sequence": True}
        | {"hidden_state_format": "safetensors"},
    )
    if r.status_code != 200:
        return f"{case:<10} | /extract {r.status_code}: {r.text[:200]}", False
    got = load(r.content)
    (row,) = [m for m in client.get("/models").json()["loaded_models"] if m["model_id"] == str(path)]
    ids = AutoTokenizer.from_pretrained(str(path))(PROMPT)["input_ids"]
    model = reference(path, fields, row["dtype"], device)
    first = next(model.parameters()).device
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids], device=first), output_hidden_states=True).hidden_states
    worst = 0.0
    for i, theirs in enumerate(want):
        mine, theirs = got[f"sequence_hidden_states.{i}"].float(), theirs[0].float().cpu()
        worst = max(worst, float((mine - theirs).abs().max() / theirs.abs().max()))
    g = client.post("/generate", json={**body, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    with torch.inference_mode():
        tokens = model.generate(
            input_ids=torch.tensor([ids], device=first),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=first),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=model.config.eos_token_id,
        )[0, len(ids) :].tolist()
    same = g.status_code == 200 and g.json()["token_ids"] == tokens[: len(g.json()["token_ids"])]
    passed = worst <= TOLERANCE[case] and (same or case not in ("float32", "device_map"))
    line = (
        f"{case:<10} | {row['device']:<7} | {row['dtype']:<8} | {worst:9.2e} | {'same' if same else 'DIFFER'} | "
        f"{'ok' if passed else 'FAIL'}"
    )
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return line, passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the app's default device")
    parser.add_argument("--root", type=Path, default=None, help="where the tiny models are built (a temp dir)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    parser.add_argument("--archs", default=None, help="some of the tiny causal architectures (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per layer and pass: the casts are expected

    import torch
    from litestar.testing import TestClient
    from loom_transformers.testing import CAUSAL_ARCHITECTURES, build_tiny_model

    from loom_kernel.api import create_app
    from loom_kernel.config import Settings

    root = args.root or Path(tempfile.mkdtemp(prefix="loom-cuda-checks-"))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__} on {name}")
    failed = 0
    with TestClient(app=create_app(settings=Settings(default_device=args.device, max_models=1))) as client:
        for arch in args.archs.split(",") if args.archs else CAUSAL_ARCHITECTURES:
            path = build_tiny_model(arch, root)
            print(f"\n{arch}\ncase       | device  | dtype    | max diff  | tokens | pass")
            for case in args.cases.split(","):
                line, passed = check(client, path, case, args.device)
                print(line, flush=True)
                failed += not passed
    print(f"\n{failed} case(s) failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
