"""Time to turn tensors into the final HTTP body bytes: the old encoders against the ones in loom_kernel.encoding.

    .venv/bin/python bench/encoding.py [--repeats 15]

Shapes: hidden states of one token [1, 768] and of a whole 128-token sequence at all 13 layers (13 x [128, 768]),
as /extract returns them, and a batch of embeddings [16, 384] as /embed/batch returns it. Each case builds the
response dict and encodes it with msgspec, as Litestar does for ``Response(content=dict)``; the time is the best
of ``--repeats`` runs, after one warm-up, and old and new alternate run by run so that a busy moment on a shared
machine does not favour either. Prints milliseconds, body size and the ratio old/new; nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loom_kernel.encoding import b64_raw, encode_states, json_raw, safetensors_bytes

ENCODER = msgspec.json.Encoder()


def old_list(t: torch.Tensor) -> dict[str, Any]:
    """The list format before: a Python float per element (``tolist``), each then formatted by msgspec."""
    return {"shape": list(t.shape), "dtype": "float32", "data": t.float().tolist()}


def old_base64(t: torch.Tensor) -> dict[str, Any]:
    """Base64 before: ``tobytes`` copies, then the str goes through msgspec's string encoder."""
    data = base64.b64encode(t.numpy().tobytes()).decode("ascii")
    return {"shape": list(t.shape), "dtype": "float32", "encoding": "base64", "data": data}


def memoryview_base64(t: torch.Tensor) -> dict[str, Any]:
    """Base64 from the tensor's memory (no ``tobytes`` copy), still a str."""
    data = base64.b64encode(memoryview(t.numpy())).decode("ascii")
    return {"shape": list(t.shape), "dtype": "float32", "encoding": "base64", "data": data}


def numpy_tolist(t: torch.Tensor) -> dict[str, Any]:
    """numpy's ``tolist`` instead of torch's: still a Python float per element."""
    return {"shape": list(t.shape), "dtype": "float32", "data": t.numpy().tolist()}


def orjson_raw(t: torch.Tensor) -> dict[str, Any]:
    """orjson writes a numpy array itself (only when orjson is installed: it is not a dependency)."""
    import orjson

    data = msgspec.Raw(orjson.dumps(t.numpy(), option=orjson.OPT_SERIALIZE_NUMPY))
    return {"shape": list(t.shape), "dtype": "float32", "data": data}


def best_ms(repeats: int, fns: dict[str, Callable[[], bytes]]) -> dict[str, float]:
    """The fastest of ``repeats`` runs of each, in milliseconds, the functions taking turns within each round."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: s * 1000.0 for name, s in best.items()}


def report(title: str, repeats: int, fns: dict[str, Callable[[], bytes]]) -> None:
    times = best_ms(repeats, fns)
    reference = next(iter(fns))
    print(f"\n{title}")
    for name, fn in fns.items():
        size = len(fn())
        ratio = times[reference] / times[name]
        print(f"  {name:38s} {times[name]:9.3f} ms  {size / 1e6:8.3f} MB  {ratio:6.2f}x")


def states(layers: int, tokens: int, width: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {str(-1 - i): torch.randn(tokens, width, generator=gen) for i in range(layers)}


def state_cases(name: str, group: dict[str, torch.Tensor], repeats: int) -> None:
    def body(encode: Callable[[torch.Tensor], Any]) -> Callable[[], bytes]:
        return lambda: ENCODER.encode({"hidden_states": {k: encode(t) for k, t in group.items()}})

    lists = {
        "list: tolist + msgspec (old)": body(old_list),
        "list: numpy tolist + msgspec": body(numpy_tolist),
        "list: encode_states, numpy text (new)": lambda: ENCODER.encode(
            {"hidden_states": encode_states(group, "float32", "list")}
        ),
    }
    if importlib.util.find_spec("orjson") is not None:
        lists["list: orjson numpy -> Raw"] = body(orjson_raw)
    report(f"{name}, list", repeats, lists)
    report(
        f"{name}, base64",
        repeats,
        {
            "base64: tobytes + str (old)": body(old_base64),
            "base64: memoryview + str": body(memoryview_base64),
            "base64: encode_states, Raw (new)": lambda: ENCODER.encode(
                {"hidden_states": encode_states(group, "float32", "base64")}
            ),
        },
    )
    names = {f"hidden_states.{k}": t for k, t in group.items()}
    meta = {"loom": json.dumps({"text": "x"})}
    report(
        f"{name}, safetensors",
        repeats,
        {
            "safetensors.torch.save (old)": lambda: save(names, metadata=meta),
            "header + joined memory (new)": lambda: safetensors_bytes(names, "float32", meta),
        },
    )


def embedding_cases(vectors: torch.Tensor, repeats: int) -> None:
    def old_float() -> bytes:
        return ENCODER.encode({"embeddings": vectors.tolist()})

    def new_float() -> bytes:
        return ENCODER.encode({"embeddings": json_raw(vectors)})

    def old_openai_b64() -> bytes:
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
        return ENCODER.encode({"data": [{"embedding": d} for d in data]})

    def new_openai_b64() -> bytes:
        return ENCODER.encode({"data": [{"embedding": b64_raw(v.numpy())} for v in vectors]})

    report(
        "embeddings [16, 384], /embed/batch list",
        repeats,
        {"tolist + msgspec (old)": old_float, "numpy text Raw (new)": new_float},
    )
    report(
        "embeddings [16, 384], /v1/embeddings base64",
        repeats,
        {"astype + tobytes + str (old)": old_openai_b64, "memoryview Raw (new)": new_openai_b64},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, msgspec {msgspec.__version__}")
    state_cases("hidden states [1, 768] x 1 layer", states(1, 1, 768), args.repeats)
    state_cases("hidden states [128, 768] x 13 layers", states(13, 128, 768), args.repeats)
    embedding_cases(torch.nn.functional.normalize(torch.randn(16, 384), dim=-1), args.repeats)


if __name__ == "__main__":
    main()
