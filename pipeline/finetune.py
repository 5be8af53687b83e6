"""Convert the dense model into one method's model, fine-tune it with the one
training engine, measure it (accuracy, MACs from the masks that fired, params
and nonzero params, per-layer sparsity, per-block executed fraction) and record
everything: model file, metrics JSON, per-epoch history, MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, fingerprint, to_dict
from pipeline.convert import backbone_cfg, build_method_model
from pipeline.data import TensorTask, load_task, sha256_file
from pipeline.errors import CheckpointError
from pipeline.methods import (
    block_fractions,
    dynamic_hooks,
    dynamic_layers,
    dynconv_hooks,
    kernel_sparsity,
    temperature_at,
)
from pipeline.metrics import write_history, write_metrics
from pipeline.models import load_model
from pipeline.paths import CHECKPOINTS, MODELS, RESULTS
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Normalizer, evaluate, fit, load_checkpoint, save_atomic, seed_everything


def _pruned_state(model: nn.Module) -> tuple[dict, dict]:
    """State dict with every SD-Conv kernel tensor replaced by its pruned export (a sparse
    tensor holding only the kept weights); thresholds stay, so the masks reload exactly."""
    from pipeline.ops.sd_conv import SDConv2d

    state = model.state_dict()
    pruned = {}
    for name, m in model.named_modules():
        if isinstance(m, SDConv2d):
            pruned[name] = m.export_pruned()["kernels"]
            del state[f"{name}.weight"]
    return state, pruned


def save_method_model(path: Path, model: nn.Module, method: str, cfg: Config, dense_record: dict, **meta) -> None:
    state, pruned = _pruned_state(model)
    save_atomic({
        "method": method,
        "model_cfg": to_dict(cfg.model),
        "method_cfg": to_dict(getattr(cfg.convert, method)),
        "seed": cfg.seed,
        "in_channels": dense_record["in_channels"],
        "num_classes": dense_record["num_classes"],
        "state_dict": state,
        "pruned_kernels": pruned,
        "meta": {**dense_record["meta"], **meta},
    }, path)


def load_method_model(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a converted model (same conversion on a fresh backbone) and load its weights."""
    from pipeline.config import ConvertCfg, ModelCfg

    record = load_checkpoint(path)
    try:
        method = record["method"]
        mcfg = type(getattr(ConvertCfg(), method)).model_validate(record["method_cfg"])
        model, _ = build_method_model(method, ModelCfg.model_validate(record["model_cfg"]), mcfg,
                                      record["in_channels"], record["num_classes"], record["seed"])
        state = dict(record["state_dict"])
        for name, kernels in record.get("pruned_kernels", {}).items():
            state[f"{name}.weight"] = kernels.to_dense()
        model.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not hold a converted model this code can rebuild ({err})") from None
    if method in ("dynet", "sdconv"):
        # The coefficient temperature is not a tensor: restore the one the last trained epoch used.
        t = temperature_at(mcfg, mcfg.train.epochs - 1)
        for _, m in dynamic_layers(model):
            m.set_temperature(t)
    return model, record


def normalized(data: TensorTask, split: str) -> torch.Tensor:
    return Normalizer(data.mean, data.std)(data.splits[split][0])


def measure(model: nn.Module, method: str, test_x: torch.Tensor, mcfg) -> tuple[dict, dict]:
    """Complexity and structure metrics on the (normalised) TEST images, masks as they fire at eval."""
    metrics = {"macs_per_image": count_macs(model, test_x), **count_params(model)}
    layers: dict = {}
    if method in ("dynet", "sdconv"):
        dyn = dynamic_layers(model)
        metrics["converted_layers"] = len(dyn)
        if method == "sdconv":
            metrics["kernel_sparsity"] = kernel_sparsity([m for _, m in dyn])
            layers["kernel_sparsity"] = {n: m.kernel_sparsity() for n, m in dyn}
    else:
        per_block, overall = block_fractions(model, test_x)
        from pipeline.ops.spatial_gate import gated_blocks

        names = [n for n, m in model.named_modules() if m in set(gated_blocks(model))]
        metrics["executed_fraction"] = overall
        metrics["budget"] = mcfg.budget
        metrics["budget_gap"] = abs(overall - mcfg.budget)
        layers["executed_fraction"] = dict(zip(names, per_block))
    metrics["flops_per_image"] = 2 * metrics["macs_per_image"]
    return metrics, layers


def convert_method(cfg: Config, method: str) -> None:
    mcfg = getattr(cfg.convert, method)
    out = RESULTS / "convert" / method
    data = load_task("upstream")
    dense, dense_record = load_model(MODELS / "dense.pt")
    dense.eval()
    seed_everything(cfg.seed)
    model, names = build_method_model(method, cfg.model, mcfg, data.in_channels, data.num_classes, cfg.seed, dense)
    norm = Normalizer(data.mean, data.std)
    start = evaluate(model, *data.splits["val"], norm, mcfg.train.eval_batch_size)
    teacher = dense if mcfg.distill.weight > 0 else None
    if method == "dynconv":
        hooks = dynconv_hooks(model, mcfg, mcfg.train.epochs, normalized(data, "val"), teacher)
    else:
        hooks = dynamic_hooks(model, mcfg, teacher)
    resume_key = fingerprint({"seed": cfg.seed, "model": to_dict(cfg.model), "method": method,
                              "cfg": to_dict(mcfg), "dense": sha256_file(MODELS / "dense.pt")})
    with stage_run(f"convert@{method}", cfg) as run:
        result = fit(model, data, mcfg.train, cfg.seed, CHECKPOINTS / f"convert_{method}.pt", resume_key,
                     on_epoch=lambda e, m: run.log_metrics(m, step=e), hooks=hooks, desc=method)
        test_x = normalized(data, "test")
        measured, layers = measure(model, method, test_x, mcfg)
        dense_macs = count_macs(dense, test_x)
        metrics = {
            **result.final, **measured,
            "start_val_acc": start["acc"],
            "dense_test_acc": float(dense_record["meta"]["metrics"]["test_acc"]),
            "dense_macs_per_image": dense_macs,
            "mac_ratio": measured["macs_per_image"] / dense_macs,
            "width": getattr(mcfg, "width", 1.0) * cfg.model.width,
        }
        metrics["acc_drop"] = metrics["dense_test_acc"] - metrics["test_acc"]
        save_method_model(MODELS / f"{method}.pt", model, method, cfg, dense_record, metrics=metrics, converted=names)
        metrics["model_file_bytes"] = (MODELS / f"{method}.pt").stat().st_size
        write_metrics(out / "metrics.json", metrics)
        write_metrics(out / "timing.json", result.timing)
        write_history(out / "history.csv", result.history)
        (out / "layers.json").write_text(json.dumps(layers, indent=2) + "\n")
        run.log_metrics(metrics, prefix="final.")
        for kind, values in layers.items():
            run.log_metrics(values, prefix=f"layer.{kind}.")
        run.log_metrics(result.timing, prefix="timing.")
        run.set_tags({"method": method, "resumed_from_epoch": result.resumed_from,
                      "backbone_width": backbone_cfg(cfg.model, method, mcfg).width})
        for f in ("metrics.json", "timing.json", "history.csv", "layers.json"):
            run.log_artifact(out / f)
        write_run_info(out / "run.json", run, f"convert@{method}")
    print(f"convert@{method}: test accuracy {metrics['test_acc']:.4f} (dense {metrics['dense_test_acc']:.4f}), "
          f"{metrics['macs_per_image'] / 1e6:.2f} M MACs/image ({metrics['mac_ratio']:.2f} x dense), "
          f"{metrics['nonzero_params']} nonzero params")
