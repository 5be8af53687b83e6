"""End to end: copy the repository, commit it, shrink params, run `dvc repro` against a real MLflow
tracking server (PostgreSQL backend store, artifacts served by the server, on 127.0.0.1), then check every
stage ran, the metrics, the MLflow runs, datasets and models, and the report built from the server."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import mlflow
import mlflow.models
import mlflow.pytorch
import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend

from . import browser
from .e2e_project import (CFG, METHODS, N_TRIALS, SEARCHED, STAGES, TRANSFERRED, VARIANTS, _runs, _sh, project,
                          tracking_server)

pytestmark = pytest.mark.e2e
__all__ = ["project", "tracking_server"]  # fixtures, used by name


@pytest.fixture(scope="module")
def repro(project):
    root, env = project
    t0 = time.perf_counter()
    proc = _sh(["dvc", "repro"], root, env)
    return root, env, proc.stdout, time.perf_counter() - t0


def test_every_stage_ran(repro):
    root, _, out, seconds = repro
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(STAGES) <= set(lock["stages"])
    print(f"tiny dvc repro: {seconds:.1f}s")


def test_metrics_are_sane(repro):
    root = repro[0]
    m = json.loads((root / "results/pretrain/metrics.json").read_text())
    assert 0.2 < m["test_acc"] <= 1.0  # chance is 0.1
    assert m["epochs"] == 5 and m["params"] > 1000
    card = json.loads((root / "data/prepared/card.json").read_text())
    assert card["tasks"]["downstream"]["counts"]["train"] == 200
    assert (root / "models/dense.pt").stat().st_size > 10_000
    rows = (root / "results/pretrain/history.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 6
    for method in METHODS:
        c = json.loads((root / f"results/convert/{method}/metrics.json").read_text())
        assert 0.0 <= c["test_acc"] <= 1.0 and 0.0 < c["mac_ratio"] < 1.2
        assert c["nonzero_params"] <= c["params"]
        assert (root / f"models/{method}.pt").is_file()



def test_per_image_outputs_average_to_the_stage_metrics(repro):
    """What a single run's verdicts bootstrap over: per-image correctness whose mean is the stage's
    test accuracy, on the test set of the stage's task."""
    root = repro[0]
    files = sorted(root.glob("results/**/per_image.json"))
    assert {f.parent.name for f in files} >= {"pretrain", *METHODS}
    for f in files:
        body = json.loads(f.read_text())
        metrics = json.loads((f.parent / "metrics.json").read_text())
        acc = body["values"]["test_acc"]
        assert len(acc) == body["images"] and set(acc) <= {0.0, 1.0}
        assert sum(acc) / len(acc) == pytest.approx(metrics["test_acc"], abs=1e-6), f
        if "executed_fraction" in body["values"]:
            fractions = body["values"]["executed_fraction"]
            assert sum(fractions) / len(fractions) == pytest.approx(metrics["executed_fraction"], abs=1e-5), f


def test_mlflow_holds_the_runs(repro):
    root = repro[0]
    runs = _runs(repro[1])
    stages = runs[runs["tags.kind"] == "stage"]
    assert sorted(stages["tags.stage"]) == sorted(set(STAGES) - {"validate"})
    assert stages["tags.pipeline_id"].nunique() == 1
    assert (stages["status"] == "FINISHED").all()
    pre = stages[stages["tags.stage"] == "pretrain"].iloc[0]
    assert 0.0 < pre["metrics.system/cpu_utilization_percentage"] <= 100.0  # MLflow's system metrics
    assert pre["metrics.system/system_memory_usage_megabytes"] > 0
    metrics = json.loads((root / "results/pretrain/metrics.json").read_text())
    assert pre["metrics.final.test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert pre["params.model.depth"] == "8"
    assert json.loads((root / "results/pretrain/run.json").read_text())["run_id"] == pre["run_id"]


def test_runs_show_their_datasets_and_models_in_the_tracking_server(repro):
    """What the MLflow UI's runs table shows in its Dataset and Model columns, through the client API."""
    from mlflow.tracking import MlflowClient

    env = repro[1]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("dynconv-ablation")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the training runs
    runs = _runs(env)
    stages = runs[runs["tags.kind"] == "stage"].set_index("tags.stage")
    card = json.loads((repro[0] / "data/prepared/card.json").read_text())
    trained = ["pretrain", *[f"convert@{m}" for m in METHODS], *[f"control@{c}" for c in CFG.controls],
               *[f"search@{m}" for m in SEARCHED], *[f"transfer@{m}" for m in TRANSFERRED]]
    for stage in [*trained, "prepare", "latency"]:
        run = client.get_run(stages.loc[stage, "run_id"])
        names = {d.dataset.name for d in run.inputs.dataset_inputs}
        task = "downstream" if stage.startswith("transfer@") else "upstream"
        assert task in names, stage
        ds = next(d.dataset for d in run.inputs.dataset_inputs if d.dataset.name == task)
        assert task in json.loads(ds.source)["uri"] and json.loads(ds.profile)["counts"] == card["tasks"][task]["counts"]
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    by_run = {m.source_run_id: m for m in models}
    for stage in trained:
        model = by_run[stages.loc[stage, "run_id"]]
        info = mlflow.models.get_model_info(model.model_uri)
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"])[1:] == [1, 32, 32], stage
    registered = {m.name for m in client.search_registered_models()}
    assert {"dense", *METHODS, *CFG.controls, *[f"{m}-transfer" for m in TRANSFERRED]} <= registered
    # Each logged model carries its registered name (the Models tab tells them apart); each version the
    # commit and params hash of the run that made it; one name per model, one version per stage run.
    assert {m.name for m in models} == registered and len(models) == len(registered)
    for m in models:
        run_tags = client.get_run(m.source_run_id).data.tags
        (version,) = client.search_model_versions(f"name = '{m.name}'")
        assert version.run_id == m.source_run_id, m.name
        for key in ("git_commit", "params_hash", "stage"):
            assert version.tags[key] == run_tags[key] == m.tags[key], (m.name, key)
    loaded = mlflow.pytorch.load_model(by_run[stages.loc["convert@dynconv", "run_id"]].model_uri)
    assert sum(1 for _ in loaded.modules()) > 10


def test_search_outputs_and_trial_runs(repro):
    root = repro[0]
    runs = _runs(repro[1])
    for method in SEARCHED:
        out = root / "results/search" / method
        best = json.loads((out / "best.json").read_text())
        trials = (out / "trials.csv").read_text().strip().splitlines()
        assert len(trials) == 1 + N_TRIALS and all(",COMPLETE," in t for t in trials[1:])
        pareto = (out / "pareto.csv").read_text().strip().splitlines()
        assert 2 <= len(pareto) <= 1 + N_TRIALS
        assert str(best["trial"]) in [row.split(",")[0] for row in pareto[1:]]
        assert (root / "models" / f"search_{method}.pt").is_file()
        journal = root / "optuna" / method / "journal.log"
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        (summary,) = optuna.get_all_study_summaries(storage)  # optuna-dashboard shows the objectives by name
        names = optuna.load_study(study_name=summary.study_name, storage=storage).metric_names
        assert names == trials[0].split(",")[2 : 2 + len(names)] and names[0] == "val_acc" and len(names) >= 2
        assert 0.0 <= best["final"]["test_acc"] <= 1.0
        # MLflow: one study run, one finished child run per trial with the objectives.
        study = runs[(runs["tags.kind"] == "study") & (runs["tags.study_name"] == best["study_name"])]
        assert len(study) == 1 and study.iloc[0]["run_id"] == best["study_run_id"]
        children = runs[(runs["tags.kind"] == "trial") & (runs["tags.study_name"] == best["study_name"])]
        assert len(children) == N_TRIALS and (children["status"] == "FINISHED").all()
        assert (children["tags.mlflow.parentRunId"] == best["study_run_id"]).all()
        assert children["metrics.val_acc"].notna().all() and children["metrics.macs_per_image"].notna().all()
    for method in TRANSFERRED:
        t = json.loads((root / "results/transfer" / method / "metrics.json").read_text())
        assert 0.0 <= t["test_acc"] <= 1.0 and t["macs_per_image"] > 0
        if method == "sdconv":
            assert t["kept_weights_after"] == t["kept_weights_before"]  # masks frozen


def test_latency_times_every_variant(repro):
    root = repro[0]
    result = json.loads((root / "results/latency.json").read_text())
    dense = {"dense_pytorch", *[f"dense_{rt}" for rt in CFG.latency.runtimes]}
    assert {(r["variant"], r["batch"]) for r in result["rows"]} == {(v, b) for v in VARIANTS | dense for b in (1, 4)}
    assert set(result["runtimes"]) == set(CFG.latency.runtimes)
    assert all(c["max_abs_diff"] < 1e-3 for c in result["runtimes"].values())
    for r in result["rows"]:  # against the fastest dense runtime of its setting, session by session
        fastest = min((d for d in result["rows"] if d["variant"] in dense and d["batch"] == r["batch"]),
                      key=lambda d: d["median_ms"])
        assert len(r["session_ms"]) == 2 and r["median_ms"] == pytest.approx(sum(r["session_ms"]) / 2)
        ratios = [a / b for a, b in zip(fastest["session_ms"], r["session_ms"])]
        assert r["speedup_sessions"] == pytest.approx(ratios)
        assert r["speedup_vs_dense"] == pytest.approx(math.sqrt(ratios[0] * ratios[1]))
        assert r["speedup_lo"] <= r["speedup_vs_dense"] <= r["speedup_hi"]
    metrics = json.loads((root / "results/latency/metrics.json").read_text())
    assert result["sessions"]["dynconv_sparse_speedup_b1"] == pytest.approx(
        next(r["speedup_sessions"] for r in result["rows"] if r["variant"] == "dynconv_sparse" and r["batch"] == 1))
    assert set(result["sessions"]) == {k for k in metrics if "_speedup_b" in k}
    assert result["runtimes"]["onnxruntime"]["spinning"].startswith("default")
    assert all(r["iterations"] == 30 and 0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in result["rows"])
    assert abs(result["accuracy"]["dynconv_sparse"]["acc_change"]) < 0.01  # same masks, same function
    engines = {r["variant"]: r["runtime"] for r in result["rows"] if r["variant"] != "dense"}  # `dense`: the fastest
    # The compiled whole-model plan runs every model it supports, with the accuracy of the model's stage.
    assert {v for v, e in engines.items() if e == "native"} == {"dense_native", "dynet", "sdconv", "dynconv_sparse",
                                                              "dynconv_searched_sparse", "odconv"} & (VARIANTS | dense)
    # A model the plan cannot take whole names the layer that stopped it.
    assert engines["dynconv_masked"] == "pytorch (plan stopped at layer1.0: GatedBasicBlock has no compiled plan)"
    assert engines["kernelwarehouse"].startswith("pytorch (plan stopped at layer1.0.conv1: KWConv2d")
    planned = {"dynet", "sdconv", "dynconv_sparse", "dynconv_searched_sparse", "odconv"} & VARIANTS  # one thread
    assert all(r["threads_per_image"] == 1 for r in result["rows"] if r["variant"] in planned)
    for v in ("dynet", "sdconv", "dynconv_searched_sparse"):  # BN folded and summed in another order: no flips
        assert abs(result["accuracy"][v]["acc_change"]) < 0.01
    macs = result["complexity"]
    assert macs["dynconv_sparse"]["macs_per_image"] == macs["dynconv_masked"]["macs_per_image"]


def test_report_has_its_figures_and_run_ids(repro):
    root = repro[0]
    md = (root / "reports/report.md").read_text()
    html = (root / "reports/report.html").read_text()
    for fig in ("samples.png", "pretrain_curves.png", "acc_vs_macs.png", "acc_vs_params.png", "dynconv_masks.png",
                "pareto_sdconv.png", "pareto_dynconv.png", "latency_vs_macs.png"):
        assert (root / "reports/figures" / fig).stat().st_size > 5_000
        assert f"figures/{fig}" in md
    assert html.count("data:image/png;base64,") >= 5
    run_id = json.loads((root / "results/pretrain/run.json").read_text())["run_id"]
    assert run_id in md and run_id in html
    assert md.index("## Verdicts") < md.index("## Runs")  # the lead
    assert "(single seed)" in md.split("## Runs")[0] and "arXiv 2004.10694" in md
    assert "## Data" in md and "## Dense pretraining" in md and "## Dynamic and sparse models" in md
    assert "## Threshold and budget search" in md and "## Downstream transfer" in md and "## Latency" in md
    stages = [f"convert/{m}" for m in METHODS] + [f"search/{m}" for m in SEARCHED] + [f"transfer/{m}" for m in TRANSFERRED]
    stages.append("latency")
    for stage in stages:
        assert json.loads((root / f"results/{stage}/run.json").read_text())["run_id"] in md
    table = f"/#/experiments/{_runs(repro[1])['experiment_id'].iloc[0]}/runs)"  # the runs table, beside run links
    verdicts, runs_section = md.split("## Runs")[0], md.split("## Runs")[1].split("\n## ")[0]
    linked = [line for line in verdicts.splitlines() if "/runs/" in line]
    assert linked and all(table in line for line in linked) and table in runs_section
    header = next(line for line in runs_section.splitlines() if line.startswith("| stage"))
    cpu = header.split(" | ").index("mean CPU (%)")
    row = next(line for line in runs_section.splitlines() if line.startswith("| pretrain "))
    assert 0 < float(row.split(" | ")[cpu]) <= 100  # each stage's mean CPU utilisation beside its duration


def test_report_and_runs_table_open_in_a_browser(repro):
    """What a user opens: the report in headless Chromium shows every figure it references, and its
    runs-table link opens the tracking server's table, which lists every stage run under the pipeline run."""
    root = repro[0]
    figures = re.findall(r"!\[[^]]*\]\((figures/[^)]+)\)", (root / "reports/report.md").read_text())
    assert len(figures) >= 8
    with browser.page() as tab:
        tab.goto((root / "reports/report.html").as_uri())
        assert tab.locator("img").count() == len(figures)
        assert browser.broken_images(tab) == []
        link = tab.locator("a", has_text="runs table").first.get_attribute("href")
        assert link.startswith(repro[1]["MLFLOW_TRACKING_URI"]) and link.endswith("/runs")
        names = browser.expanded_run_names(tab, link, "pipeline ")
    missing = set(STAGES) - {"validate"} - set(names)
    assert not missing, f"the runs table does not list {sorted(missing)}; it lists {names}"


def test_dvc_metrics_and_plots_read_the_outputs(repro):
    root, env = repro[0], repro[1]
    shown = json.loads(_sh(["dvc", "metrics", "show", "--json"], root, env).stdout)
    assert "test_acc" in json.dumps(shown)
    _sh(["dvc", "plots", "show", "-o", str(root / "plots_out")], root, env)
    assert (root / "plots_out" / "index.html").is_file()


def test_second_repro_does_nothing(repro):
    root, env = repro[0], repro[1]
    t0 = time.perf_counter()
    out = _sh(["dvc", "repro"], root, env).stdout
    assert "Running stage" not in out
    assert time.perf_counter() - t0 < 15


def test_more_trials_continue_the_persisted_study(repro):
    root, env = repro[0], repro[1]
    before = (root / "results/search/dynconv/trials.csv").read_text().strip().splitlines()
    text = (root / "params.yaml").read_text()
    params = yaml.safe_load(text)
    params["search"]["dynconv"]["n_trials"] = N_TRIALS + 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _sh(["dvc", "repro", "search@dynconv"], root, env).stdout
    finally:
        (root / "params.yaml").write_text(text)
    after = (root / "results/search/dynconv/trials.csv").read_text().strip().splitlines()
    assert "resuming study" in out
    assert len(after) == len(before) + 1
    key = lambda row: row.split(",")[:4]  # number, state, objectives  # noqa: E731
    assert [key(r) for r in after[1 : len(before)]] == [key(r) for r in before[1:]]  # the old trials were kept
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])  # the rerun added a version, not a name
    versions = client.search_model_versions("name = 'dynconv-searched'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert len({v.tags["params_hash"] for v in versions}) == 2  # n_trials differs


def test_invalid_param_stops_at_validate_and_keeps_outputs(repro):
    root, env = repro[0], repro[1]
    before = (root / "models/dense.pt").read_bytes()
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("  epochs: 5\n", "  epochs: five\n"))
    try:
        proc = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    finally:
        (root / "params.yaml").write_text(text)
    assert proc.returncode != 0
    assert "validate: error: params.yaml: 'pretrain.epochs'" in proc.stderr + proc.stdout
    assert (root / "models/dense.pt").read_bytes() == before
