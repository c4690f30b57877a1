"""The scripts a GPU session runs, run here on the CPU so that they do not rot before a GPU is lent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cuda_checks_pass_on_the_cpu_against_transformers(tiny_models: dict[str, Path], tiny_root: Path) -> None:
    cases = ["float32", "bfloat16", "8bit", "device_map"]
    args = ["--device", "cpu", "--root", str(tiny_root), "--cases", ",".join(cases), "--archs", "llama,gpt2"]
    result = subprocess.run(
        [sys.executable, "scripts/cuda_checks.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.split(" | ")[0].strip() in cases]
    assert len(rows) == 8 and all(r[-1].strip() == "ok" and r[-2].strip() == "same" for r in rows), result.stdout
    assert "0 case(s) failed" in result.stdout
