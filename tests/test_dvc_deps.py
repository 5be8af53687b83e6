"""dvc.yaml matches the code: each stage depends on exactly the repository files its entry point imports,
and the foreach lists name exactly the methods params.yaml configures."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import methods
from pipeline.config import load_config

from .conftest import REPO, params
from .import_closure import closure, code_files, is_code


def _stages(root=REPO) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (entry point file, deps as written), as DVC resolves dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        out = {}
        for stage in repo.index.stages:
            module = stage.cmd.split()[2]  # python -m stages.<name> [item]
            out[stage.name] = (module.replace(".", "/") + ".py", [d.def_path for d in stage.deps])
    return out


def _with_every_control() -> dict[str, tuple[str, list[str]]]:
    """The stages of dvc.yaml with params.yaml's `controls` listing every control (they are off by default)."""
    import tempfile

    every = [m.name for m in methods.registry().values() if m.control_of]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / ".dvc").mkdir()
        (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        (root / "params.yaml").write_text(yaml.safe_dump(params({"controls": every})))
        return _stages(root)


STAGES = _with_every_control()


def check(entry: str, deps: list[str]) -> tuple[set[str], set[str]]:
    """(imported files no dep covers, code deps that cover a file the entry point does not import)."""
    needed = closure(entry)
    code = [d for d in deps if is_code(d)]
    covered = set().union(*(code_files(d) for d in code)) if code else set()
    return needed - covered, {d for d in code if not code_files(d) <= needed}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_exactly_what_it_imports(name):
    entry, deps = STAGES[name]
    missing, extra = check(entry, deps)
    assert not missing, f"{name}: imports {sorted(missing)} but dvc.yaml does not list them in its deps"
    assert not extra, f"{name}: deps {sorted(extra)} hold code its entry point does not import"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_the_check_fails_when_any_code_dep_is_dropped(name):
    entry, deps = STAGES[name]
    for dep in (d for d in deps if is_code(d)):
        missing, _ = check(entry, [d for d in deps if d != dep])
        assert missing, f"{name}: dropping {dep} went unnoticed"


def test_the_check_reports_a_dep_the_stage_does_not_import():
    entry, deps = STAGES["prepare"]
    assert check(entry, [*deps, "pipeline/search"])[1] == {"pipeline/search"}


def test_registry_imports_every_module_of_its_package():
    # tests/import_closure.py assumes it; a lazier registry would make dvc.yaml over-broad.
    code = ("import sys; from pipeline import methods; methods.registry(); "
            "print(sorted(m for m in sys.modules if m.startswith('pipeline.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = sorted(f"pipeline.methods.{p.stem}" for p in (REPO / "pipeline/methods").glob("*.py") if p.stem != "__init__")
    assert eval(out) == files  # noqa: S307 - our own print of a list of strings


def test_foreach_lists_name_the_methods_of_params():
    cfg = load_config(REPO / "params.yaml")
    items = {}
    for stage in STAGES:
        group, _, item = stage.partition("@")
        if item:
            items.setdefault(group, []).append(item)
    assert sorted(items["convert"]) == sorted(cfg.convert)
    assert sorted(items["control"]) == sorted(m.name for m in methods.registry().values() if m.control_of)
    assert sorted(s.partition("@")[2] for s in _stages() if s.startswith("control@")) == sorted(cfg.controls)
    assert sorted(items["search"]) == sorted(cfg.search.methods)
    assert sorted(items["transfer"]) == sorted(cfg.transfer.models) == sorted(m.name for m in methods.transferred(cfg))
    for m in methods.transferred(cfg):  # wherever the method's transfer starts from, the stage depends on it
        for choice in (False, True):
            c = cfg.model_copy(update={"transfer": cfg.transfer.model_copy(update={"use_searched": choice})})
            source = m.transfer_source(c).as_posix()  # relative to the repository root
            assert any(source == d or source.startswith(d + "/") for d in STAGES[f"transfer@{m.name}"][1]), \
                f"transfer@{m.name} must depend on {source}"


def test_adding_a_method_edits_no_line_of_dvc_yaml():
    """dvc.yaml's per-method stages iterate params groups: a new group is a new stage, a missing one none."""
    import tempfile

    raw = params()
    raw["convert"]["newmethod"] = raw["convert"]["dynet"]
    raw["search"] = {k: v for k, v in raw["search"].items() if k != "dynconv"}
    raw["transfer"]["models"] = [*raw["transfer"]["models"], "newmethod"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / ".dvc").mkdir()
        (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        stages = _stages(root)
    assert {"convert@newmethod", "transfer@newmethod"} <= set(stages) and "search@dynconv" not in stages
    assert "models/newmethod.pt" not in stages["transfer@newmethod"][1]  # the models folder covers it
    # The controls list the outputs of the methods they control (a control reads its method's results).
    text = yaml.safe_dump({k: v for k, v in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()
                           if k != "control"})
    named = [m.name for m in methods.registry().values() if not m.baseline and not m.control_of
             and re.search(rf"(?<![\w/]){m.name}(?![\w])", text)]
    assert named == [], f"dvc.yaml names the methods {named}: iterate a params group instead"
