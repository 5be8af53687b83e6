"""Stage `search@<method>`: run or resume the method's Optuna study, pick a configuration,
fine-tune it to a final model and measure its test accuracy once.

Usage: python -m stages.search <method> [--worker]   (every method with a search.<method> group)

With --worker the process only adds trials to the study on the configured
storage (same params.yaml): start it next to a running `dvc repro` to search
with more processes.

MLflow: one parent run per study (``kind=study``, tag ``study_name``), nested
under the pipeline run that created it, and one child run per trial
(params, objectives, duration, state). Extra workers started by hand
(``python -m stages.search <method> --worker``) log their trials under the
same study run.

Outputs (``results/search/<method>/``): ``trials.csv`` (every trial),
``pareto.csv`` (the Pareto-optimal ones), ``best.json`` (the chosen trial,
the rule, the final model's numbers), ``metrics.json``, ``run.json``; the
final model ``models/search_<method>.pt``.
"""

from __future__ import annotations

from pipeline import methods
from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.data import read_card
from pipeline.methods.files import save_method_model
from pipeline.metrics import write_metrics
from pipeline.search.study import (STORE_OUT, best_record, close_study_run, extra_worker, final_model, search,
                                   write_tables)
from pipeline.search.trials import load_context
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import normalized


def main(cfg: Config, name: str, worker: bool = False) -> None:
    ctx = load_context(cfg, methods.get(name))
    if worker:
        return extra_worker(ctx)
    out = ctx.method.search_dir
    with stage_run(f"search@{name}", cfg) as run:
        s = search(ctx, run)
        write_tables(out, s, ctx.objectives)
        model, final, layers, dense_record = final_model(ctx, s)
        # Wall-clock numbers stay out of the model file: same params, same bytes.
        stable = {k: v for k, v in final.items() if k != "search_seconds"}
        save_method_model(ctx.method.searched_file, model, ctx.method, ctx.p, cfg, dense_record,
                          metrics=stable, search_params=dict(s.chosen.params), study=s.study.study_name)
        best = best_record(ctx, s, final, layers)
        write_json(out / "best.json", best)
        # The stage's declared store folder; in a `dvc exp` temporary copy the
        # journal itself lives in the repository's folder, this file says where.
        pointer = STORE_OUT / name / "study.json"
        write_json(pointer, {"study_name": s.study.study_name, "storage": best["storage"],
                             "complete_trials": s.counts["complete"]})
        write_metrics(out / "metrics.json", final)
        run.log_metrics(final, prefix="final.")
        close_study_run(run, s, best)
        for f in ("trials.csv", "pareto.csv", "best.json", "metrics.json"):
            run.log_artifact(out / f)
        run.log_dataset("upstream", read_card(), "training")
        run.log_model(model, normalized(ctx.data, "test")[:1], f"{name}-searched")
        write_run_info(out / "run.json", run, f"search@{name}")
    print(f"search@{name}: {s.counts['complete']} complete trials ({s.counts['fail']} failed) in {s.seconds:.0f}s, "
          f"{len(s.pareto)} Pareto-optimal; chose trial {s.chosen.number} {dict(s.chosen.params)}; final model: "
          f"test accuracy {final['test_acc']:.4f}, {final['macs_per_image'] / 1e6:.2f} M MACs/image "
          f"({final['mac_ratio']:.3f} x dense), {final['nonzero_params']:.0f} nonzero params")


def main_options(parser) -> None:
    parser.add_argument("--worker", action="store_true",
                        help="only add trials to the study on the configured storage (run next to `dvc repro`)")


if __name__ == "__main__":
    run_stage("search", main, __doc__, methods=lambda: [m.name for m in methods.registry().values() if m.search],
              options=main_options)
