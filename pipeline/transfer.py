"""Stage `transfer@<method>`: fine-tune a model on the downstream task.

The source is the dense model, the DyNet model, and for SD-Conv and DynConv
the search's final model (``transfer.use_searched``; else the converted one).
The classifier is replaced by a new, seeded head for the downstream classes.

- ``finetune``: every weight trains. DyNet/SD-Conv keep the coefficient
  temperature they ended at; DynConv keeps its gates training under the budget
  loss at the budget its source was trained for. SD-Conv masks are frozen by
  default (``freeze_masks``): pruned weights are set to exactly 0 and the
  thresholds to 0 and excluded from training, so mask = [|W| > 0] and the
  gradient of a pruned weight is 0: the sparse model is what transfers (the
  SD-Conv paper's claim). The kept-weight count before and after is recorded.
- ``linear_probe``: only the new head trains; every other module stays in
  eval mode (BN statistics and DynConv masks fixed).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, TemperatureCfg, fingerprint, to_dict
from pipeline.data import load_task, sha256_file
from pipeline.errors import UserError
from pipeline.finetune import load_method_model, normalized
from pipeline.methods import block_fractions, dynamic_hooks, dynamic_layers, dynconv_hooks
from pipeline.metrics import write_history, write_metrics
from pipeline.models import classifier, load_model
from pipeline.paths import CHECKPOINTS, MODELS, RESULTS
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Hooks, fit, seed_everything

TRANSFER_METHODS = ("dense", "dynet", "sdconv", "dynconv")


def source_path(cfg: Config, method: str):
    if method == "dense":
        return MODELS / "dense.pt"
    if method in ("sdconv", "dynconv") and cfg.transfer.use_searched:
        return MODELS / f"search_{method}.pt"
    return MODELS / f"{method}.pt"


def load_source(cfg: Config, method: str) -> tuple[nn.Module, dict]:
    path = source_path(cfg, method)
    if not path.is_file():
        raise UserError(f"'{path}' not found: run the stage that writes it first (dvc repro)")
    return load_model(path) if method == "dense" else load_method_model(path)


def new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Linear:
    """Replace the classifier with a fresh ``nn.Linear`` (seeded) for ``num_classes``."""
    old = classifier(model)
    torch.manual_seed(seed)
    head = nn.Linear(old.in_features, num_classes)
    if getattr(model, "fc", None) is old:
        model.fc = head
    else:
        model.classifier[-1] = head
    return head


@torch.no_grad()
def freeze_sd_masks(model: nn.Module) -> int:
    """Zero the pruned SD-Conv weights, set thresholds to 0 and stop training them; returns kept weights."""
    kept = 0
    for _, m in dynamic_layers(model):
        if hasattr(m, "threshold"):
            mask = m.weight.abs() > m.threshold
            m.weight.mul_(mask)
            m.threshold.zero_()
            m.threshold.requires_grad_(False)
            kept += int(mask.sum())
    return kept


def kept_weights(model: nn.Module) -> int:
    return sum(int((m.weight.abs() > m.threshold).sum()) for _, m in dynamic_layers(model) if hasattr(m, "threshold"))


def transfer_hooks(cfg: Config, method: str, model: nn.Module, head: nn.Linear, record: dict, val_x) -> Hooks:
    tcfg = cfg.transfer
    if tcfg.protocol == "linear_probe":
        def probe_mode(_epoch: int) -> None:
            model.eval()
            head.train()

        return Hooks(epoch_start=probe_mode)
    if method in ("dynet", "sdconv"):
        mcfg = getattr(cfg.convert, method)
        end = mcfg.temperature.end
        mcfg = mcfg.model_copy(update={"reg_weight": 0.0, "min_keep": 0.0} if method == "sdconv" else {})
        mcfg = mcfg.model_copy(update={"temperature": TemperatureCfg(start=end, end=end, epochs=0)})
        return dynamic_hooks(model, mcfg, teacher=None)
    if method == "dynconv":
        mcfg = cfg.convert.dynconv
        budget = record.get("meta", {}).get("search_params", {}).get("budget", mcfg.budget)
        mcfg = mcfg.model_copy(update={"budget": budget, "distill": mcfg.distill.model_copy(update={"weight": 0.0})})
        return dynconv_hooks(model, mcfg, tcfg.train.epochs, val_x, teacher=None)
    return Hooks()


def transfer_method(cfg: Config, method: str) -> None:
    tcfg = cfg.transfer
    out = RESULTS / "transfer" / method
    data = load_task("downstream")
    model, record = load_source(cfg, method)
    seed_everything(cfg.seed)
    head = new_head(model, data.num_classes, cfg.seed)
    kept_before = freeze_sd_masks(model) if method == "sdconv" and tcfg.freeze_masks else None
    val_x, test_x = normalized(data, "val"), normalized(data, "test")
    hooks = transfer_hooks(cfg, method, model, head, record, val_x)
    params = list(head.parameters()) if tcfg.protocol == "linear_probe" else [p for p in model.parameters() if p.requires_grad]
    source = source_path(cfg, method)
    resume_key = fingerprint({"seed": cfg.seed, "method": method, "transfer": to_dict(tcfg),
                              "source": sha256_file(source), "data": data.mean + data.std})  # fmt: skip
    with stage_run(f"transfer@{method}", cfg) as run:
        result = fit(model, data, tcfg.train, cfg.seed, CHECKPOINTS / f"transfer_{method}.pt", resume_key,
                     on_epoch=lambda e, m: run.log_metrics(m, step=e), hooks=hooks, desc=f"transfer {method}",
                     params=params)  # fmt: skip
        model.eval()
        metrics = {**result.final, "macs_per_image": count_macs(model, test_x), **count_params(model)}
        metrics["flops_per_image"] = 2 * metrics["macs_per_image"]
        metrics["upstream_test_acc"] = float(record.get("meta", {}).get("metrics", {}).get("test_acc", float("nan")))
        if method == "dynconv":
            metrics["executed_fraction"] = block_fractions(model, test_x)[1]
        if kept_before is not None:
            metrics["kept_weights_before"] = kept_before
            metrics["kept_weights_after"] = kept_weights(model)
            if metrics["kept_weights_after"] > kept_before:
                raise RuntimeError("SD-Conv masks were frozen but gained weights during transfer")
        write_metrics(out / "metrics.json", metrics)
        write_metrics(out / "timing.json", result.timing)
        write_history(out / "history.csv", result.history)
        run.log_metrics(metrics, prefix="final.")
        run.log_metrics(result.timing, prefix="timing.")
        run.set_tags({"method": method, "protocol": tcfg.protocol, "source": str(source),
                      "resumed_from_epoch": result.resumed_from})
        for f in ("metrics.json", "timing.json", "history.csv"):
            run.log_artifact(out / f)
        write_run_info(out / "run.json", run, f"transfer@{method}")
    print(f"transfer@{method} ({tcfg.protocol}): downstream test accuracy {metrics['test_acc']:.4f}, "
          f"{metrics['macs_per_image'] / 1e6:.2f} M MACs/image, {metrics['nonzero_params']} nonzero params")
