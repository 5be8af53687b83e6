"""The stage wrapper's exit: a finished stage ends without Python's module teardown, yet its atexit
handlers run, its output arrives whole, and a thread that is still working is waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from .conftest import REPO

STAGE = """
import atexit, os, sys, threading, time
from pathlib import Path
from pipeline.cli import run_stage

out = Path(sys.argv[1])

def main(cfg):
    atexit.register(lambda: out.with_suffix(".atexit").write_text("ran"))
    if os.environ.get("PROBE_THREAD"):
        threading.Thread(target=lambda: (time.sleep(0.5), out.with_suffix(".thread").write_text("done"))).start()
    sys.stdout.write("x" * 1000)  # no newline, shorter than the buffer: still buffered when piped

sys.argv = [sys.argv[0], "--params", str(Path(sys.argv[1]).parent / "params.yaml")]
run_stage("probe", main, "probe")
"""


def _run(tmp_path, thread: bool = False):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(STAGE))
    code = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | ({"PROBE_THREAD": "1"} if thread else {})
    return subprocess.run([sys.executable, "-c", code, str(script), str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_finished_stage_runs_its_atexit_handlers_and_flushes_its_output(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "x" * 1000
    assert (tmp_path / "out.atexit").read_text() == "ran"


def test_a_thread_still_working_is_waited_for(tmp_path):
    proc = _run(tmp_path, thread=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out.thread").read_text() == "done"
    assert (tmp_path / "out.atexit").read_text() == "ran"
