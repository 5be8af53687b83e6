"""Stage `transfer@<method>`: fine-tune a model on the downstream task.

Usage: python -m stages.transfer <method>   (dense or any converted method)

The source is the method's model file (``Method.transfer_source``): the dense
model, the converted one, or for methods with a search the search's final
model (``transfer.use_searched``). The classifier is replaced by a new, seeded
head for the downstream classes.

- ``finetune``: every weight trains, with the method's transfer hooks (e.g. a
  coefficient temperature kept where the conversion ended, a budget loss at
  the budget the source was trained for, masks frozen by ``freeze_masks``).
- ``linear_probe``: only the new head trains; every other module stays in
  eval mode (BN statistics and masks fixed).
"""

from __future__ import annotations

from pipeline import distributed, methods
from pipeline.cli import run_stage
from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, fingerprint, to_dict
from pipeline.data import load_task, read_card, sha256_file
from pipeline.errors import UserError
from pipeline.methods.files import load_any_model
from pipeline.metrics import PER_IMAGE, write_history, write_metrics, write_per_image
from pipeline.models.surgery import new_head
from pipeline.paths import CHECKPOINTS
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Hooks, Normalizer, fit, normalized, seed_everything


def main(cfg: Config, name: str) -> None:
    method = methods.get(name)
    tcfg = cfg.transfer
    out = method.transfer_dir
    source = method.transfer_source(cfg)
    if not source.is_file():
        raise UserError(f"'{source}' not found: run the stage that writes it first (dvc repro)")
    data = load_task("downstream")
    model, record, _ = load_any_model(source)
    seed_everything(cfg.train_seed)
    head = new_head(model, data.num_classes, cfg.train_seed)
    before = method.transfer_setup(model, cfg)
    val_x, test_x = normalized(data, "val"), normalized(data, "test")
    if tcfg.protocol == "linear_probe":
        def probe_mode(_epoch: int) -> None:
            model.eval()
            head.train()

        hooks = Hooks(epoch_start=probe_mode)
        params = list(head.parameters())
    else:
        hooks = method.transfer_hooks(model, cfg, record, val_x)
        params = [p for p in model.parameters() if p.requires_grad]
    resume_key = fingerprint({"seed": cfg.train_seed, "method": name, "transfer": to_dict(tcfg),
                              "source": sha256_file(source), "data": data.mean + data.std})  # fmt: skip
    with stage_run(f"transfer@{name}", cfg) as run:
        state = CHECKPOINTS / f"transfer_{name}.pt"
        result = fit(model, data, tcfg.train, cfg.train_seed, state, resume_key,
                     on_epoch=lambda e, m: run.log_metrics(m, step=e), hooks=hooks, desc=f"transfer {name}",
                     params=params, keep_state=True)  # fmt: skip
        run.after_success(lambda: state.unlink(missing_ok=True))
        if not distributed.is_main():
            return
        model.eval()
        metrics = {**result.final, "macs_per_image": count_macs(model, test_x), **count_params(model)}
        metrics["flops_per_image"] = 2 * metrics["macs_per_image"]
        metrics["upstream_test_acc"] = float(record.get("meta", {}).get("metrics", {}).get("test_acc", float("nan")))
        metrics.update(method.transfer_metrics(model, test_x, before))
        write_metrics(out / "metrics.json", metrics)
        write_per_image(out / PER_IMAGE, "downstream", data.splits["test"][1], {"test_acc": result.test_correct})
        write_metrics(out / "timing.json", result.timing)
        write_history(out / "history.csv", result.history)
        run.log_metrics(metrics, prefix="final.")
        run.log_metrics(result.timing, prefix="timing.")
        run.log_dataset("downstream", read_card(), "training")
        run.log_model(model, test_x[:1], f"{name}-transfer")
        run.set_tags({"method": name, "protocol": tcfg.protocol, "source": str(source),
                      "resumed_from_epoch": result.resumed_from})
        for f in ("metrics.json", "timing.json", "history.csv", PER_IMAGE):
            run.log_artifact(out / f)
        write_run_info(out / "run.json", run, f"transfer@{name}")
    print(f"transfer@{name} ({tcfg.protocol}): downstream test accuracy {metrics['test_acc']:.4f}, "
          f"{metrics['macs_per_image'] / 1e6:.2f} M MACs/image, {metrics['nonzero_params']} nonzero params")


if __name__ == "__main__":
    run_stage("transfer", main, __doc__, methods=methods.names, data_parallel=True)
