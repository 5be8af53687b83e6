"""Stage `pretrain`: train the dense backbone on the upstream task."""

from __future__ import annotations

from pipeline import distributed
from pipeline.cli import run_stage
from pipeline.config import Config, fingerprint, to_dict
from pipeline.data import load_task, read_card
from pipeline.metrics import PER_IMAGE, write_history, write_metrics, write_per_image
from pipeline.complexity import count_params
from pipeline.models import build_model, save_model
from pipeline.paths import CHECKPOINTS, MODELS, RESULTS
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Normalizer, fit, normalized, seed_everything

OUT = RESULTS / "pretrain"


def main(cfg: Config) -> None:
    data = load_task("upstream")
    seed_everything(cfg.train_seed)
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    card = read_card()
    resume_key = fingerprint({"seed": cfg.train_seed, "model": to_dict(cfg.model), "train": to_dict(cfg.pretrain),
                              "data": card["tasks"]["upstream"]["sha256"]})
    with stage_run("pretrain", cfg) as run:
        state = CHECKPOINTS / "pretrain.pt"
        result = fit(
            model, data, cfg.pretrain, cfg.train_seed, state, resume_key,
            on_epoch=lambda epoch, m: run.log_metrics(m, step=epoch), desc="pretrain", keep_state=True,
        )
        run.after_success(lambda: state.unlink(missing_ok=True))
        if not distributed.is_main():
            return
        metrics = {**result.final, "params": count_params(model)["params"]}
        save_model(MODELS / "dense.pt", model, cfg.model, data.in_channels, data.num_classes,
                   mean=data.mean, std=data.std, classes=data.classes, metrics=metrics)
        write_metrics(OUT / "metrics.json", metrics)
        write_per_image(OUT / PER_IMAGE, "upstream", data.splits["test"][1], {"test_acc": result.test_correct})
        write_metrics(OUT / "timing.json", result.timing)
        write_history(OUT / "history.csv", result.history)
        run.log_metrics(metrics, prefix="final.")
        run.log_metrics(result.timing, prefix="timing.")
        run.set_tags({"resumed_from_epoch": result.resumed_from})
        run.log_dataset("upstream", card, "training")
        run.log_model(model, normalized(data, "val")[:1], "dense")
        for f in ("metrics.json", "timing.json", "history.csv", PER_IMAGE):
            run.log_artifact(OUT / f)
        write_run_info(OUT / "run.json", run, "pretrain")
    print(f"pretrain: test accuracy {metrics['test_acc']:.4f} (val {metrics['val_acc']:.4f}), {metrics['params']} params")


if __name__ == "__main__":
    run_stage("pretrain", main, __doc__, data_parallel=True)
