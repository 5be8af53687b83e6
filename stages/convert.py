"""Stage `convert@<method>` (and `control@<control>`): dense model -> the method's model, fine-tuned and measured.

Usage: python -m stages.convert <method>   (a method with a convert.<method> group, or a control)

Builds the method's model from models/dense.pt (weights carried over), fine-tunes
it with the one training engine and the method's hooks, measures it on the test
split (accuracy, MACs from the masks that fire, params and nonzero params, the
method's own metrics) and records everything: models/<method>.pt,
results/convert/<method>/{metrics.json,timing.json,history.csv,layers.json},
one MLflow run.
"""

from __future__ import annotations

from pipeline import distributed, methods
from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.complexity import count_macs
from pipeline.config import Config, fingerprint, to_dict
from pipeline.data import load_task, read_card, sha256_file
from pipeline.methods.files import load_any_model, save_method_model
from pipeline.metrics import PER_IMAGE, write_history, write_metrics, write_per_image
from pipeline.paths import CHECKPOINTS
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Normalizer, evaluate, fit, normalized, seed_everything


def main(cfg: Config, name: str) -> None:
    method = methods.get(name)
    p = method.params(cfg)
    out = method.results_dir
    data = load_task("upstream")
    dense_file = methods.baseline().model_file
    dense, dense_record, _ = load_any_model(dense_file)
    dense.eval()
    seed_everything(cfg.train_seed)
    model, names = method.build(cfg.model, p, data.in_channels, data.num_classes, cfg.train_seed, dense)
    method.warm_start(model, p, cfg, normalized(data, "train")[: p.train.batch_size])
    start = evaluate(model, *data.splits["val"], Normalizer(data.mean, data.std), p.train.eval_batch_size)
    teacher = dense if p.distill.weight > 0 else None
    hooks = method.hooks(model, p, teacher=teacher, val_x=normalized(data, "val"))
    resume_key = fingerprint({"seed": cfg.train_seed, "model": to_dict(cfg.model), "method": name,
                              "cfg": to_dict(p), "dense": sha256_file(dense_file)})
    with stage_run(method.stage, cfg) as run:
        state = CHECKPOINTS / f"convert_{name}.pt"
        result = fit(model, data, p.train, cfg.train_seed, state, resume_key,
                     on_epoch=lambda e, m: run.log_metrics(m, step=e), hooks=hooks, desc=name, keep_state=True)
        run.after_success(lambda: state.unlink(missing_ok=True))
        if not distributed.is_main():
            return
        if result.resumed_from == p.train.epochs:  # trained by an execution that failed later: as when loaded
            method.restore(model, p)
        test_x = normalized(data, "test")
        measured, layers = method.measure_all(model, test_x, p)
        dense_macs = count_macs(dense, test_x)
        model_width = getattr(cfg.model, "width", 1.0)
        metrics = {
            **result.final, **measured,
            "start_val_acc": start["acc"],
            "dense_test_acc": float(dense_record["meta"]["metrics"]["test_acc"]),
            "dense_macs_per_image": dense_macs,
            "mac_ratio": measured["macs_per_image"] / dense_macs,
            "width": method.width(p) * model_width,
        }
        metrics["acc_drop"] = metrics["dense_test_acc"] - metrics["test_acc"]
        save_method_model(method.model_file, model, method, p, cfg, dense_record, metrics=metrics, converted=names)
        metrics["model_file_bytes"] = method.model_file.stat().st_size
        write_metrics(out / "metrics.json", metrics)
        write_per_image(out / PER_IMAGE, "upstream", data.splits["test"][1],
                        {"test_acc": result.test_correct, **method.per_image(model, test_x, p)})
        write_metrics(out / "timing.json", result.timing)
        write_history(out / "history.csv", result.history)
        write_json(out / "layers.json", layers)
        run.log_metrics(metrics, prefix="final.")
        for kind, values in layers.items():
            run.log_metrics(values, prefix=f"layer.{kind}.")
        run.log_metrics(result.timing, prefix="timing.")
        run.log_dataset("upstream", read_card(), "training")
        run.log_model(model, test_x[:1], name)
        run.set_tags({"method": name, "control_of": method.control_of or "", "resumed_from_epoch": result.resumed_from,
                      "backbone_width": method.width(p) * model_width})
        for f in ("metrics.json", "timing.json", "history.csv", "layers.json", PER_IMAGE):
            run.log_artifact(out / f)
        write_run_info(out / "run.json", run, method.stage)
    print(f"{method.stage}: test accuracy {metrics['test_acc']:.4f} (dense {metrics['dense_test_acc']:.4f}), "
          f"{metrics['macs_per_image'] / 1e6:.2f} M MACs/image ({metrics['mac_ratio']:.2f} x dense), "
          f"{metrics['nonzero_params']} nonzero params")


if __name__ == "__main__":
    run_stage("convert", main, __doc__, methods=lambda: [m.name for m in methods.registry().values() if m.Params],
              data_parallel=True)
