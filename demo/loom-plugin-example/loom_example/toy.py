"""The toy architecture: a byte-level tokenizer and a tiny residual network, saved as config.json + weights.pt.

A model directory is recognised by ``"model_type": "loom-toy"`` in its config.json; the other keys size the
network, and ``"causal": true`` gives it an LM head (its call on token ids [1, T] then gives logits [1, T, V]).
The module is deliberately small and dependency-free (torch only) so that the template shows the plugin contract,
not a model zoo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_TYPE = "loom-toy"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
BOS_ID = 256  # one id past the 256 byte values: the only special token
VOCAB_SIZE = 257
DEFAULTS: dict[str, Any] = {"hidden_size": 16, "num_layers": 3, "max_position_embeddings": 256}


def toy_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sizes of a loom-toy config.json (defaults filled in) and whether it is causal, or None when the config
    is not ours."""
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        return None
    sizes = {key: int(config.get(key, value)) for key, value in DEFAULTS.items()}
    if min(sizes.values()) < 1:
        raise ValueError(f"{MODEL_TYPE}: sizes must be positive, got {sizes}")
    return {**sizes, "causal": bool(config.get("causal", False))}


class ByteTokenizer:
    """Text <-> UTF-8 byte ids, with an optional BOS id in front (the kernel's ``add_special_tokens``): the two
    calls the kernel makes of any tokenizer, ``tokenizer(text, ...)["input_ids"]`` and ``decode(ids)``."""

    bos_token = "<bos>"

    def __call__(
        self, text: str, add_special_tokens: bool = True, truncation: bool = False, max_length: int | None = None
    ) -> dict[str, list[int]]:
        ids = [BOS_ID, *text.encode("utf-8")] if add_special_tokens else list(text.encode("utf-8"))
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # A multi-byte character cut by a slice of ids decodes to U+FFFD rather than failing, like HF tokenizers.
        text = bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        if ids and ids[0] == BOS_ID and not skip_special_tokens:
            return self.bos_token + text
        return text


class ToyBlock(nn.Module):
    """Pre-norm residual block: a causal running mean over the prefix (token mixing) plus a per-token MLP."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        # Causal, so a right-padded row's real tokens never see its padding: batched rows equal single rows.
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=h.dtype).view(1, -1, 1)
        prefix_mean = h.cumsum(dim=1) / counts
        return x + self.mix(prefix_mean) + self.down(torch.nn.functional.gelu(self.up(h)))


class ToyModel(nn.Module):
    """Embedding (token + position) -> ``num_layers`` ToyBlocks in ``blocks`` -> final LayerNorm (-> LM head).

    The loader declares these parts to the kernel (``ModelParts``): the block list (one ``nn.ModuleList``) gives
    the hidden-state indices, index i being block i's input and index N the final norm's output, the same index
    space as transformers' ``output_hidden_states``.
    """

    def __init__(self, hidden_size: int, num_layers: int, max_position_embeddings: int, causal: bool) -> None:
        super().__init__()
        self.max_position_embeddings = max_position_embeddings
        self.embed = nn.Embedding(VOCAB_SIZE, hidden_size)
        self.positions = nn.Embedding(max_position_embeddings, hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(hidden_size) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, VOCAB_SIZE) if causal else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.positions(steps).unsqueeze(0)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x if self.head is None else self.head(x)


def build(sizes: dict[str, Any]) -> ToyModel:
    return ToyModel(sizes["hidden_size"], sizes["num_layers"], sizes["max_position_embeddings"], sizes["causal"])


def make_toy_model(
    path: str | Path,
    seed: int = 0,
    causal: bool = False,
    hidden_size: int = 16,
    num_layers: int = 3,
    max_position_embeddings: int = 256,
) -> Path:
    """Write a loom-toy model directory (config.json + weights.pt) with random weights from ``seed``; ``causal``
    gives it an LM head."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"hidden_size": hidden_size, "num_layers": num_layers, "max_position_embeddings": max_position_embeddings}
    torch.manual_seed(seed)
    model = build({**sizes, "causal": causal})
    # Non-default LayerNorm parameters, so that a test that forgets a norm (or applies one twice) fails.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    config = {"model_type": MODEL_TYPE, **sizes, "causal": causal}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    return out


def load_toy(path: Path, config: dict[str, Any], device: str, dtype: torch.dtype) -> ToyModel:
    """Build the module from config.json and load weights.pt (tensors only: ``weights_only`` runs no pickle code)."""
    sizes = toy_config(config)
    if sizes is None:
        raise ValueError(f"{path} is not a {MODEL_TYPE} model")
    model = build(sizes)
    state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()
