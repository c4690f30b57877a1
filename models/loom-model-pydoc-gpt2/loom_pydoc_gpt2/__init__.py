"""pydoc-gpt2, shipped: the model's directory inside this package, offered to The Loom by the ``model_sources`` hook."""

from __future__ import annotations

from pathlib import Path

from loom_kernel import hookimpl

NAME = "pydoc-gpt2"


def get_model_path() -> Path:
    """The directory holding config.json, the float16 weights and the tokenizer."""
    return Path(__file__).parent / "weights"


@hookimpl
def model_sources() -> dict[str, str]:
    return {NAME: str(get_model_path())}
