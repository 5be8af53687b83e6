"""Generated report: MLflow runs + DVC outputs -> reports/report.md and a self-contained report.html."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.config import Config
from pipeline.paths import REPORTS
from pipeline.report.collect import collect
from pipeline.report.document import to_html, to_markdown
from pipeline.report.sections import SECTIONS, Context
from pipeline.report import latency_section, reference_section, search_sections  # noqa: F401  (register their sections)

TITLE = "Dynamic convolution ablation report"


def build_report(cfg: Config, out: Path = REPORTS) -> dict[str, Path]:
    """Build every section whose inputs exist; write Markdown, HTML and figures."""
    started = time.time_ns()
    evidence = collect(cfg.tracking.experiment)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    before = {f for f in figs.iterdir() if f.is_file()}
    ctx = Context(cfg, evidence, out, figs)
    sections = [s for s in (build(ctx) for build in SECTIONS) if s is not None]
    md, page = out / "report.md", out / "report.html"
    write_text(md, to_markdown(TITLE, sections, out.resolve()))
    write_text(page, to_html(TITLE, sections, out.resolve()))
    # Each figure replaced atomically; only once the new pages are written do the old figures they no longer
    # show go, so a failed build (a full disk) leaves the previous report whole.
    shown = {f for f in figs.iterdir() if f.is_file() and f.stat().st_mtime_ns >= started - 50_000_000}  # coarse file clocks
    for stale in before - shown:
        stale.unlink(missing_ok=True)
    return {"markdown": md, "html": page, "figures": figs}
