"""Model files of every method: self-describing, atomic, loadable with ``weights_only=True``.

A method's model file records the method name, the backbone params, the
method params and the seed; loading runs the same conversion on a fresh
backbone (through the registry) and loads the stored state. The dense model
file (written by ``pretrain``, :func:`pipeline.models.save_model`) carries no
method name and loads as the baseline.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from torch import nn

from pipeline.checkpoint import load_checkpoint, save_atomic
from pipeline.config import Config, to_dict
from pipeline.errors import CheckpointError
from pipeline.methods import baseline, get
from pipeline.methods.base import Method
from pipeline.models import model_cfg, model_from_record


def save_method_model(path: Path, model: nn.Module, method: Method, p, cfg: Config, dense_record: dict,
                      **meta) -> None:
    """Write ``model`` (built by ``method`` with params ``p``) with what rebuilding it needs."""
    state, extra = method.pack(model)
    save_atomic({
        "method": method.name,
        "model_cfg": to_dict(cfg.model),
        "method_cfg": to_dict(p),
        "seed": cfg.train_seed,
        "in_channels": dense_record["in_channels"],
        "num_classes": dense_record["num_classes"],
        "state_dict": state,
        "extra": extra,
        "meta": {**dense_record["meta"], **meta},
    }, path)


def load_any_model(path: Path) -> tuple[nn.Module, dict, Method]:
    """(model, record, method) of a model file of any method, the dense one included."""
    record = load_checkpoint(path)
    if "method" not in record:
        return model_from_record(record, path), record, baseline()
    try:
        method = get(record["method"], f"model file '{path}'")
        p = method.Params.model_validate(record["method_cfg"])
        model, _ = method.build(model_cfg(record["model_cfg"]), p, record["in_channels"], record["num_classes"],
                                record["seed"])
        model.load_state_dict(method.unpack(record["state_dict"], record.get("extra", {})))
    except (KeyError, RuntimeError, ValueError, ValidationError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not hold a model this code can rebuild ({err})") from None
    method.restore(model, p)
    return model, record, method
