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


def test_no_method_name_appears_in_code_outside_the_methods_package():
    """Nothing outside pipeline/methods/ branches on (or even spells) a method's name."""
    names = [m.name for m in methods.registry().values() if not m.baseline]
    pattern = re.compile(r"(?<![\w-])(" + "|".join(names) + r")(?![\w-])")  # not the project's name dynconv-ablation
    found = []
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("stages/*.py")]:
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("pipeline/methods/"):
            continue
        for node in _string_constants(ast.parse(path.read_text())):
            if pattern.search(node.value):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
        for node in ast.walk(ast.parse(path.read_text())):  # identifiers such as `dynconv_hooks`
            name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
            if isinstance(name, str) and pattern.search(name.replace("_", " ")):
                found.append(f"{rel}:{node.lineno}: {name}")
    assert found == []


def test_the_name_check_sees_a_branch_on_a_name():
    tree = ast.parse('def f(method):\n    """dynconv in a docstring is fine"""\n    return method == "dynconv"\n')
    assert [n.value for n in _string_constants(tree)] == ["dynconv"]
