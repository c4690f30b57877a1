"""The public plugin API is the top-level ``loom_kernel`` package: every bundled plugin, the shipped model and the
example third-party plugin import ``loom_kernel`` (names of its ``__all__``), their own package and third-party
libraries, never a private kernel module and never another plugin's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from serverutil import REPO

import loom_kernel

PACKAGES = {
    pkg.name: pkg
    for pkg in [
        *REPO.glob("plugins/*/loom_*"),
        *REPO.glob("models/*/loom_*"),
        *REPO.glob("demo/loom-plugin-example/loom_*"),
    ]
    if (pkg / "__init__.py").is_file()  # not the .egg-info an editable install leaves beside it
}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in ``path`` (names empty for ``import x``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def test_the_plugins_are_found():
    assert {"loom_transformers", "loom_interp", "loom_openai", "loom_embeddings", "loom_example"} <= set(PACKAGES)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_plugin_imports_only_the_public_kernel_and_itself(package: str):
    wrong = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        for line, module, names in imports(path):
            where = f"{path.relative_to(REPO)}:{line}"
            top = module.split(".")[0]
            if top == "loom_kernel":
                if module != "loom_kernel":
                    wrong.append(f"{where}: imports the private {module}")
                wrong += [f"{where}: loom_kernel has no public {n}" for n in names if n not in loom_kernel.__all__]
            elif top in PACKAGES and top != package:
                wrong.append(f"{where}: imports another plugin's {module}")
    assert not wrong, "\n".join(wrong)


def test_every_public_name_resolves():
    missing = [name for name in loom_kernel.__all__ if getattr(loom_kernel, name, None) is None]
    assert not missing


def kernel_imports() -> dict[str, set[str]]:
    """Each kernel module's imports of other kernel modules: every import, in functions and under
    ``TYPE_CHECKING`` too (a type-only circle still means two modules that cannot be read apart)."""
    root = REPO / "loom_kernel"
    names = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in names}
    for name, path in names.items():
        for _, module, imported in imports(path):
            subs = {f"{module}.{n}" for n in imported if f"{module}.{n}" in names}
            targets = subs | ({module} if len(subs) < len(imported) or not imported else set())
            graph[name] |= {t for t in targets if t in names and t != name}
    return graph


def test_the_kernel_has_no_import_circle():
    graph = kernel_imports()
    assert "loom_kernel.entry" in graph["loom_kernel.admission"]  # it reads type-only imports too
    circles = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circles.append(" -> ".join([*path[path.index(name) :], name]))
            return
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not circles, "\n".join(circles)
