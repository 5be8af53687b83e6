import os
import subprocess
import sys

import pytest
import yaml

from pipeline.config import Config, fingerprint, flatten, load_config, parse_config, to_dict
from pipeline.errors import ConfigError

from .conftest import REPO


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


def test_repository_params_are_valid():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.upstream.source == "digits"


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
    assert "root" in error_of({"data": {"upstream": {"source": "cifar10"}}})
    assert "warmup_epochs" in error_of({"pretrain": {"epochs": 2, "schedule": {"warmup_epochs": 2}}})


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # `dvc exp run -S pretrain.optimizer.weight_decay=1e-5` writes this form.
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  optimizer:\n    weight_decay: 1e-5\n")
    assert load_config(p).pretrain.optimizer.weight_decay == pytest.approx(1e-5)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_flatten_and_fingerprint_are_stable():
    cfg = parse_config({})
    flat = flatten(to_dict(cfg))
    assert flat["pretrain.optimizer.lr"] == 0.1
    assert fingerprint(cfg) == fingerprint(parse_config({}))
    assert fingerprint(cfg) != fingerprint(parse_config({"seed": 1}))


@pytest.mark.parametrize("stage", ["validate", "prepare", "pretrain", "report"])
def test_stage_with_bad_params_prints_one_line_and_keeps_outputs(tmp_path, stage):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrain"]["epochs"] = -3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
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
