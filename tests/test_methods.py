"""The method registry: discovery, unknown names, and no method name outside pipeline/methods/."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from pipeline import methods
from pipeline.errors import ConfigError
from pipeline.methods.base import Method

from .conftest import REPO, config


def test_every_method_module_registers_one_method_under_its_name():
    registry = methods.registry()
    modules = {p.stem for p in (REPO / "pipeline/methods").glob("*.py")} - {"__init__", "base", "files"}
    assert set(registry) == modules
    assert all(isinstance(m, Method) and m.name == name for name, m in registry.items())
    assert [m.name for m in registry.values() if m.baseline] == ["dense"]


def test_unknown_method_is_an_error_never_a_fallback():
    with pytest.raises(ConfigError, match=r"unknown method 'dynnet'; registered: .*dynet"):
        methods.get("dynnet")


@pytest.mark.parametrize("stage", ["convert", "search", "transfer"])
def test_stage_with_an_unknown_method_stops_with_one_line(stage, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "dynnet", "--params", str(REPO / "params.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{stage}@dynnet: error: unknown method 'dynnet'; this stage takes one of: "
        + ", ".join(m.name for m in methods.registry().values()
                    if {"convert": m.Params, "search": m.search, "transfer": True}[stage])]


def test_pipeline_order_is_the_baseline_then_params_order():
    cfg = config()
    assert [m.name for m in methods.in_pipeline(cfg)] == ["dense", *cfg.convert]
    assert [m.name for m in methods.searched(cfg)] == list(cfg.search.methods)


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _method_words() -> dict[str, re.Pattern]:
    """What only a method's own files may spell: its name, its label, its report metrics (the values of its
    ``columns``), and the class names of the operators in ``pipeline/ops/`` (each kind with its pattern)."""
    registry = [m for m in methods.registry().values() if not m.baseline]
    import pipeline.ops as ops_pkg

    operators = set()
    for path in (REPO / "pipeline/ops").glob("*.py"):
        operators |= {n.name for n in ast.parse(path.read_text()).body
                      if isinstance(n, ast.ClassDef) and not n.name.startswith("_")}
    assert ops_pkg and operators

    def words(values):  # whole words: `dynconv` but not the project's name `dynconv-ablation`
        return re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, values), key=len, reverse=True)) + r")(?![\w-])")

    labels = {m.label for m in registry if not m.control_of}  # controls' labels are phrases naming their method
    return {"method name": words(m.name for m in registry), "label": words(labels),
            "method metric": words({v for m in registry for v in m.columns.values()}),
            "operator class": words(operators)}


# Files that may spell what _method_words lists: the methods, the operators (and their compiled kernels).
ALLOWED = ("pipeline/methods/", "pipeline/ops/")


def method_words_outside_methods(files: dict[str, str]) -> list[str]:
    """``path:line: kind 'text'`` for every string constant (docstrings aside) and identifier of ``files``
    (path -> source) outside :data:`ALLOWED` that spells a method's name, label, metric or operator class."""
    patterns, found = _method_words(), []
    for rel, source in files.items():
        if rel.startswith(ALLOWED):
            continue
        tree = ast.parse(source)
        texts = [(n.lineno, n.value) for n in _string_constants(tree)]
        for node in ast.walk(tree):  # identifiers such as `dynconv_hooks`
            name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
            if isinstance(name, str):
                texts.append((node.lineno, name.replace("_", " ") if name.islower() else name))
        for line, text in texts:
            for kind, pattern in patterns.items():
                hit = pattern.search(text.replace(" ", "_") if kind == "method metric" else text)
                if hit:
                    found.append(f"{rel}:{line}: {kind} {hit.group(0)!r}")
    return found


def _code() -> dict[str, str]:
    paths = [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/*.py")]
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in paths}


def test_no_method_knowledge_in_code_outside_the_methods_and_their_operators():
    """Nothing outside pipeline/methods/ and pipeline/ops/ branches on (or spells) a method's name, label or
    metric, or an operator's class: the report's prose about a method comes from its module."""
    found = method_words_outside_methods(_code())
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("added", [
    'if method == "odconv":\n    pass\n',
    'TITLE = "SD-Conv masks"\n',
    'x = row["executed_fraction"]\n',
    'from pipeline.ops.odconv import ODConv2d\n',
    'def dynet_hooks():\n    return None\n',
])
@pytest.mark.parametrize("target", ["stages/report.py", "pipeline/report/sections.py", "pipeline/tracking.py"])
def test_the_guard_fails_when_method_knowledge_is_added_outside(added, target):
    files = _code()
    files[target] += "\n" + added
    assert any(f.startswith(target) for f in method_words_outside_methods(files))
    files = {**_code(), "pipeline/methods/newmethod.py": added}
    assert not any(f.startswith("pipeline/methods/") for f in method_words_outside_methods(files))


def test_the_name_check_sees_a_branch_on_a_name():
    tree = ast.parse('def f(method):\n    """dynconv in a docstring is fine"""\n    return method == "dynconv"\n')
    assert [n.value for n in _string_constants(tree)] == ["dynconv"]
