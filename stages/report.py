"""Stage `report`: build reports/report.{md,html} and figures from MLflow and the stage outputs."""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.paths import RESULTS
from pipeline.report import build_report
from pipeline.tracking import stage_run, write_run_info


def main(cfg: Config) -> None:
    paths = build_report(cfg)
    with stage_run("report", cfg) as run:
        run.log_artifact(paths["markdown"], "report")
        run.log_artifact(paths["html"], "report")
        run.log_artifact(paths["figures"], "report/figures")
        write_run_info(RESULTS / "report" / "run.json", run, "report")
    print(f"report: wrote {paths['markdown']} and {paths['html']}")


if __name__ == "__main__":
    run_stage("report", main, __doc__)
