"""The README and the manual, run as a newcomer would run them: every fenced ``curl`` example (and the README's
Python examples) in document order against a real `loom serve` with the shipped models, on a fresh model cache.

Each command must succeed with a 2xx answer; where the page shows an answer (a ``json`` block right after the
example), the real answer has the same fields. A block the manual cannot run here says so in an HTML comment on
the line before it (``<!-- not run: why -->``). The manual itself must build with ``mkdocs build --strict``, so
no link or anchor rots.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverutil import HANG_S, REPO, loom_server

PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<skip><!-- not run: [^>]+-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)


def examples(page: str) -> list[tuple[str, str, dict | None]]:
    """(language, code, the answer shown after it or None) for each runnable fenced block of ``page``."""
    text = (REPO / page).read_text()
    blocks = list(FENCE.finditer(text))
    out = []
    for i, block in enumerate(blocks):
        if block.group("skip") or block.group("lang") not in ("bash", "python"):
            continue
        code = block.group("body")
        if block.group("lang") == "bash" and "curl " not in code:
            continue
        if block.group("lang") == "python" and page != "README.md":
            continue
        shown = None
        follows = blocks[i + 1] if i + 1 < len(blocks) else None
        if (
            follows is not None
            and follows.group("lang") == "json"
            and text[block.end() : follows.start()].strip() == ""
        ):
            shown = json.loads(lenient(follows.group("body")))
        out.append((block.group("lang"), code, shown))
    return out


def lenient(shown: str) -> str:
    """A shown answer as JSON: its elisions (``[[...]]``, ``, ...}``) become empty values or go."""
    shown = re.sub(r",\s*\.\.\.", "", shown)
    return re.sub(r"\.\.\.", "0", shown)


def curl_commands(code: str) -> list[str]:
    """The ``curl`` commands of a bash block, each whole (continuation lines and quoted newlines joined)."""
    commands, current = [], ""
    for line in code.splitlines():
        if not current and not line.lstrip().startswith("curl "):
            continue
        current += line + "\n"
        if current.count("'") % 2 == 0 and not line.rstrip().endswith("\\"):
            commands.append(re.sub(r"\s+#.*$", "", current.rstrip()))
            current = ""
    return commands


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's server: the shipped models by name, an empty model cache (a new HOME, no hub)."""
    home = tmp_path_factory.mktemp("readme-home")
    with loom_server(["--preload", "minilm", "--preload", "pydoc-gpt2"], home) as (base, _log, _proc):
        yield base


def fields(shown: dict, got: dict, where: str = "") -> None:
    for key, value in shown.items():
        assert key in got, f"{where}{key} shown but not answered: {sorted(got)}"
        if isinstance(value, dict) and isinstance(got[key], dict) and value and "data" not in value:
            fields(value, got[key], f"{where}{key}.")


@pytest.mark.parametrize("page", PAGES)
def test_every_example_runs_against_a_real_server(server: str, page: str) -> None:
    port = server.rsplit(":", 1)[1]
    ran = 0
    for lang, code, shown in examples(page):
        if lang == "python":
            script = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace("localhost:8080", f"127.0.0.1:{port}")
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_S)
            assert done.returncode == 0, f"{page}:\n{code}\n{done.stderr[-2000:]}"
            ran += 1
            continue
        for command in curl_commands(code):
            command = command.replace("localhost:8080", f"127.0.0.1:{port}")
            command = re.sub(r"^curl ", "curl --fail-with-body ", command)
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=HANG_S)
            assert done.returncode == 0, f"{page}: {command}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            if shown is not None and done.stdout.lstrip().startswith("{"):
                fields(shown, json.loads(done.stdout), f"{page}: ")
            ran += 1
    assert ran or page != "README.md"


def test_the_manual_builds_strict(tmp_path: Path) -> None:
    """Every link and anchor between the manual's pages resolves (mkdocs.yml turns warnings into errors)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
