"""Generated report: MLflow runs + DVC outputs -> reports/report.md and a self-contained report.html."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.config import Config
from pipeline.paths import REPORTS
from pipeline.report.collect import collect
from pipeline.report.document import to_html, to_markdown
from pipeline.report.sections import SECTIONS, Context
from pipeline.report import latency_section, search_sections  # noqa: F401  (register their sections)

TITLE = "Dynamic convolution ablation report"


def build_report(cfg: Config, out: Path = REPORTS) -> dict[str, Path]:
    """Build every section whose inputs exist; write Markdown, HTML and figures."""
    evidence = collect(cfg.tracking.experiment)
    figs = out / "figures"
    if figs.exists():
        shutil.rmtree(figs)
    figs.mkdir(parents=True)
    ctx = Context(cfg, evidence, out, figs)
    sections = [s for s in (build(ctx) for build in SECTIONS) if s is not None]
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(TITLE, sections, out.resolve()))
    page.write_text(to_html(TITLE, sections, out.resolve()))
    return {"markdown": md, "html": page, "figures": figs}
