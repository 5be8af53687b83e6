"""The repository files a stage's entry point imports, transitively, read from the source (no import runs).

Every ``import`` / ``from ... import`` statement counts, also those inside
functions (they run when the function does). Importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py`` too. Two rules cover what a static
reading cannot see:

- ``pipeline/methods/__init__.py`` (the registry) imports every module of its
  package on first use (``pkgutil`` discovery).
- ``pipeline/ops/native.py`` compiles the sources under ``pipeline/ops/csrc``.

``python -m tests.import_closure <stage>`` prints the code deps a stage needs.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
REGISTRY = "pipeline/methods/__init__.py"
NATIVE = ("pipeline/ops/native.py", "pipeline/ops/csrc")


def _module_file(module: str) -> str | None:
    """Repository path of a dotted module name, or None when it is not a repository module."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(REPO).as_posix()
    return None


def _with_parents(module: str) -> set[str]:
    """The files that ``import module`` runs: the module and every package above it."""
    parts = module.split(".")
    out = set()
    for i in range(1, len(parts) + 1):
        f = _module_file(".".join(parts[:i]))
        if f:
            out.add(f)
    return out


def _package_of(path: str) -> str:
    mod = path.removesuffix(".py").replace("/", ".")
    return mod.removesuffix(".__init__") if path.endswith("__init__.py") else mod.rpartition(".")[0]


@cache
def direct_imports(path: str) -> frozenset[str]:
    """Repository files one file imports (statically)."""
    tree = ast.parse((REPO / path).read_text(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out |= _with_parents(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out |= _with_parents(module)
            for alias in node.names:  # `from pkg import submodule`
                f = _module_file(f"{module}.{alias.name}")
                if f:
                    out |= _with_parents(f"{module}.{alias.name}")
    if path == REGISTRY:
        out |= {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline/methods").glob("*.py")}
    if path == NATIVE[0]:
        out.add(NATIVE[1])
    out.discard(path)
    return frozenset(out)


def closure(entry: str) -> set[str]:
    """``entry`` and every repository file it imports, transitively (``pipeline/ops/csrc`` as one folder)."""
    seen: set[str] = set()
    todo = [entry, *_with_parents(entry.removesuffix(".py").replace("/", "."))]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.endswith(".py"):
            todo.extend(direct_imports(path) - seen)
    return seen


def code_files(dep: str) -> set[str]:
    """The code a dep path stands for: itself (a file, or the csrc folder), or every .py under a folder."""
    path = REPO / dep
    if path.is_dir() and dep != NATIVE[1]:
        found = {p.relative_to(REPO).as_posix() for p in path.rglob("*.py")}
        if (REPO / NATIVE[1]).is_relative_to(path):
            found.add(NATIVE[1])
        return found
    return {dep}


def is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


if __name__ == "__main__":
    stage = sys.argv[1]
    for f in sorted(closure(f"stages/{stage}.py")):
        print(f)
