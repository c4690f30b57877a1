"""Fixtures shared by the kernel's and the plugins' tests: tiny offline models and a checked plugin manager."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach a model hub: every model is built here, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_models(tiny_root: Path) -> dict[str, Path]:
    """arch -> directory of a tiny saved model (llama, mistral, qwen2, gpt2, bert), built once per session."""
    from loom_transformers.testing import ARCHITECTURES, build_tiny_model

    return {arch: build_tiny_model(arch, tiny_root) for arch in ARCHITECTURES}


@pytest.fixture
def tiny_model(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    """One tiny model; llama unless parametrized indirectly:

    ``@pytest.mark.parametrize("tiny_model", ["gpt2", "bert"], indirect=True)``
    """
    return tiny_models[getattr(request, "param", "llama")]


@pytest.fixture
def pm():
    from loom_kernel.plugins import create_plugin_manager

    pm = create_plugin_manager()
    pm.check_pending()
    return pm
