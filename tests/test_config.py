import os
import subprocess
import sys

import pytest
import yaml

from pydantic import BaseModel

from pipeline import methods
from pipeline.config import Config, fingerprint, flatten, load_config, parse_config, to_dict
from pipeline.errors import ConfigError

from .conftest import REPO, config, params


def error_of(overrides) -> str:
    """The error of params.yaml with ``overrides`` merged in, method groups included."""
    with pytest.raises(ConfigError) as info:
        methods.validate(config(overrides))
    return str(info.value)


def test_repository_params_are_valid():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.upstream.source == "digits"
    methods.validate(cfg)


def test_unknown_key_names_its_path():
    msg = error_of({"pretrain": {"optimizer": {"lrr": 0.1}}})
    assert msg == "params.yaml: unknown key 'pretrain.optimizer.lrr'"


def test_unknown_top_level_group():
    assert "unknown key 'pretrian'" in error_of({"pretrian": {}})


def test_wrong_type_names_key_and_expectation():
    msg = error_of({"pretrain": {"epochs": "ten"}})
    assert "'pretrain.epochs'" in msg and "integer" in msg and "'ten'" in msg


def test_bool_and_numeric_string_are_not_numbers():
    assert "'pretrain.optimizer.lr'" in error_of({"pretrain": {"optimizer": {"lr": True}}})
    assert "'pretrain.optimizer.lr'" in error_of({"pretrain": {"optimizer": {"lr": "0.1"}}})


def test_out_of_range():
    msg = error_of({"pretrain": {"optimizer": {"lr": -1}}})
    assert "'pretrain.optimizer.lr'" in msg and "greater than 0" in msg


def test_cross_field_rules():
    assert "6n+2" in error_of({"model": {"depth": 15}})
    assert "sum to 1" in error_of({"data": {"digit_pools": {"train": 0.5, "val": 0.2, "test": 0.2}}})
    assert "min <= max" in error_of({"data": {"upstream": {"style": {"clutter": [5, 2]}}}})
    assert "'data.upstream.root': missing" in error_of({"data": {"upstream": {"source": "cifar10"}}})
    assert "warmup_epochs" in error_of({"pretrain": {"epochs": 2, "schedule": {"warmup_epochs": 2}}})


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # `dvc exp run -S pretrain.optimizer.weight_decay=1e-5` writes this form.
    p = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    p.write_text(text.replace("weight_decay: 5.0e-4}", "weight_decay: 1e-5}", 1))
    assert load_config(p).pretrain.optimizer.weight_decay == pytest.approx(1e-5)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flatten_and_fingerprint_are_stable():
    cfg = config()
    flat = flatten(to_dict(cfg))
    assert flat["pretrain.optimizer.lr"] == 0.1
    assert flat["convert.dynet.num_kernels"] == 4
    assert fingerprint(cfg) == fingerprint(config())
    assert fingerprint(cfg) != fingerprint(config({"train_seed": 1}))


def _schemas() -> list[type[BaseModel]]:
    """Every pydantic model the params are validated with: the core schema and every method's."""
    roots = [Config]
    for m in methods.registry().values():
        roots += [m.Params] if m.Params else []
        roots += [m.search.Params] if m.search else []
    seen: list[type[BaseModel]] = []

    def visit(t) -> None:
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in seen:
                seen.append(t)
                for f in t.model_fields.values():
                    visit(f.annotation)
        for arg in getattr(t, "__args__", ()) or ():
            visit(arg)
        for meta in getattr(t, "__metadata__", ()) or ():
            visit(meta)
        origin = getattr(t, "__origin__", None)
        if origin is not None and origin is not t:
            visit(origin)

    for root in roots:
        visit(root)
    return seen


def test_no_schema_field_has_a_default():
    """params.yaml is the only home of every value: the schema sets none."""
    schemas = _schemas()
    assert len(schemas) > 20
    with_default = [f"{s.__name__}.{n}" for s in schemas for n, f in s.model_fields.items() if not f.is_required()]
    assert with_default == []


def _leaf_paths(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out += _leaf_paths(v, (*prefix, k)) if isinstance(v, dict) and v else [(*prefix, k)]
    return out


def test_every_key_of_params_yaml_is_required():
    """Deleting any key stops validation with one line naming it (instead of a silently different run)."""
    raw = params()
    paths = _leaf_paths(raw)
    assert len(paths) > 150
    for path in paths:
        broken = params()
        node = broken
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        with pytest.raises(ConfigError) as info:
            methods.validate(parse_config(broken))
        dotted = ".".join(path)
        if path[-1] == "source" or path[-1] in ("name", "arch"):  # a union's tag: the error names the group
            assert f"'{'.'.join(path[:-1])}" in str(info.value), (dotted, str(info.value))
        else:
            assert f"'{dotted}'" in str(info.value) and "missing" in str(info.value), (dotted, str(info.value))


def test_unknown_method_group_is_an_error_naming_it():
    msg = error_of({"convert": {"dynnet": {}}})
    assert msg.startswith("params.yaml: 'convert.dynnet': unknown method 'dynnet'") and "dynet" in msg
    assert "'search.dynet'" in error_of({"search": {"dynet": params()["search"]["sdconv"]}})


def test_method_group_errors_name_the_key_path():
    assert error_of({"convert": {"dynet": {"num_kernels": 0}}}).startswith(
        "params.yaml: 'convert.dynet.num_kernels': Input should be greater than or equal to 1")
    assert "unknown key 'convert.sdconv.treshold_init'" in error_of({"convert": {"sdconv": {"treshold_init": 0.1}}})
    assert "'search.dynconv.space': budget: must lie in (0, 1]" in error_of({"search": {"dynconv": {"space": {"budget": {"low": 0.0}}}}})


def test_a_choice_asks_for_its_own_keys():
    step = error_of({"pretrain": {"schedule": {"name": "step", "warmup_epochs": 0}}})
    assert "'pretrain.schedule.milestones': missing" in step
    assert "unknown key 'data.upstream.root'" in error_of({"data": {"upstream": {"root": "/data"}}})
    assert "'model.arch': expected one of" in error_of({"model": {"arch": "vgg"}})


@pytest.mark.parametrize("stage", ["validate", "prepare", "pretrain", "report"])
def test_stage_with_bad_params_prints_one_line_and_keeps_outputs(tmp_path, stage):
    raw = params({"pretrain": {"epochs": -3}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    old = tmp_path / "models" / "dense.pt"
    old.parent.mkdir()
    old.write_bytes(b"earlier output")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{stage}: error: params.yaml: 'pretrain.epochs'")
    assert "Traceback" not in proc.stderr
    assert old.read_bytes() == b"earlier output"
    assert not (tmp_path / "m.db").exists()
