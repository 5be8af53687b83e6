"""Latency measurement: every variant timed alone in its own process, in ``latency.sessions`` timing sessions.

A deployed model runs alone in its process, with its runtime's own recommended
settings, so that is how each one is timed here: one process per (session,
variant), holding one model and nothing else. The processes are forked from a
server that has imported this module and run nothing (no model, no thread
pool), which saves each one the seconds of importing torch
(:class:`WorkerServer`);
``python -m pipeline.latency --worker NAME`` times one variant by hand.
In a shared process a runtime's thread pool stays busy after its call
returns and slows whatever runs next (OpenVINO in the rounds: PyTorch's
dense model 1.30 -> 1.65 ms, ONNX Runtime 0.31 -> 0.51 ms), and keeping ONNX
Runtime's threads from spinning to protect the next variant cost ONNX Runtime
itself 1.04-1.38 x at batch 1; alone in its process, it keeps its defaults.

Within a process each (device, threads, batch) setting is timed in a block
(warm-up, then ``latency.iterations`` calls on the test images, iteration i on
the i-th batch). A session runs every variant once; sessions alternate the
order (forward, backward, ...) so a drift of the machine's speed during a
session does not always favour the same variant. This machine's timings move
by 30 % from one hour to the next, so one session is never judged as exact:
per session and setting every speed-up is the ratio to the fastest dense
runtime (chosen by its median over sessions) timed in the same session, and
the reported speed-up is their geometric mean with a Student-t interval on the
log scale over the sessions (:func:`pipeline.stats.t_interval`). The claims read
the per-session speed-ups (``sessions`` in ``results/latency.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline import methods, stats
from pipeline.atomic import write_json
from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, load_config, to_dict
from pipeline.data import load_task
from pipeline.errors import UserError
from pipeline.fold import fold_batchnorm
from pipeline.methods.base import Variant
from pipeline.methods.files import load_any_model
from pipeline.ops.plan import PlannedModel, plan_or_reason
from pipeline.ops import native
from pipeline.paths import repo_root
from pipeline.runtimes import MODEL_COMPILERS, Compiled, compile_dense, export_onnx, max_abs_diff
from pipeline.timing import resolve_threads, time_blocks, torch_threads, tune_malloc
from pipeline.train import Normalizer, evaluate, normalized

CHANNELS_LAST = "channels_last"
# Variant -> the layer that stopped the compiled plan and why (filled by load_variant).
PLAN_STOPPED: dict[str, str] = {}
log = logging.getLogger(__name__)
INTERVAL_LEVEL = 0.95  # of the per-row speed-up intervals shown in the latency table


def variants(cfg: Config) -> list[Variant]:
    """What the methods time: the baseline first, then every method's variants in params order; a variant of a
    stage this pipeline does not run (a search that ``search`` leaves out) is not timed."""
    searched = {f"search@{m.name}" for m in methods.searched(cfg)}
    return [v for method in methods.in_pipeline(cfg) for v in method.latency_variants()
            if not v.stage.startswith("search@") or v.stage in searched]


def job_names(cfg: Config) -> list[str]:
    """One process per name and session: the dense model in PyTorch (NCHW, channels-last) and in every
    runtime of ``latency.runtimes``, then the methods' variants."""
    base = methods.baseline().name
    return [base, f"{base}_{CHANNELS_LAST}", *[f"{base}_{rt}" for rt in cfg.latency.runtimes],
            *[v.name for v in variants(cfg) if v.name != base]]  # fmt: skip


def load_variant(v: Variant) -> tuple[nn.Module, nn.Module, float]:
    """The timed model of ``v`` (eval mode, BN folded; a method's variant in the compiled whole-model plan
    where the plan supports it, else its PyTorch modules, with the layer that stopped the plan in
    :data:`PLAN_STOPPED` and the log), the model as its stage saved it (what the MAC counters understand), and
    the test accuracy it had in its stage."""
    if not v.file.is_file():
        raise UserError(f"'{v.file}' not found: run the stages before latency (dvc repro)")
    model, record, _ = load_any_model(v.file)
    source = model.eval()
    timed = v.transform(model) if v.transform else model
    folded = fold_batchnorm(timed)[0]
    if v.name != methods.baseline().name:
        folded, reason = plan_or_reason(folded)
        if reason is not None:
            PLAN_STOPPED[v.name] = reason
            log.warning("latency: %s runs as PyTorch modules, the compiled plan stopped at %s", v.name, reason)
    return folded, source, float(record["meta"]["metrics"]["test_acc"])


def build_variants(cfg: Config) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, float]]:
    """:func:`load_variant` of every variant, by name: timed models, saved models, stage test accuracies."""
    models, sources, recorded = {}, {}, {}
    for v in variants(cfg):
        models[v.name], sources[v.name], recorded[v.name] = load_variant(v)
    return models, sources, recorded


def batches(images: torch.Tensor, batch: int, iterations: int, device: torch.device) -> list[torch.Tensor]:
    """``iterations`` batches cycling through the test images, on ``device``."""
    n = len(images)
    return [images[torch.arange(i * batch, (i + 1) * batch) % n].to(device) for i in range(iterations)]


def devices(cfg: Config) -> list[str]:
    """The devices of ``latency.devices`` present here (CUDA only with a GPU)."""
    return [d for d in cfg.latency.devices if d == "cpu" or torch.cuda.is_available()]


# ----------------------------------------------------------------------------- one process, one variant
def time_variant(cfg: Config, name: str) -> dict:
    """Timings of the one variant ``name`` per (device, threads, batch), in this process, which holds nothing
    else; for a dense runtime also its largest deviation from PyTorch's logits on the timed inputs."""
    tune_malloc()
    base = methods.baseline().name
    lcfg = cfg.latency
    by_name = {v.name: v for v in variants(cfg)}
    runtime = name.removeprefix(f"{base}_") if name.startswith(f"{base}_") else None
    if runtime is not None and runtime != CHANNELS_LAST and runtime not in lcfg.runtimes:
        raise UserError(f"latency: {name!r} is no runtime of latency.runtimes ({', '.join(lcfg.runtimes)})")
    if runtime is None and name not in by_name:
        raise UserError(f"latency: unknown variant {name!r}; known: {', '.join(job_names(cfg))}")
    model = load_variant(by_name[base if runtime else name])[0]
    images = normalized(load_task("upstream"), "test")
    rows, check = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx = None
        if runtime not in (None, CHANNELS_LAST, *MODEL_COMPILERS):
            onnx = export_onnx(model, Path(tmp) / f"{base}.onnx", images[:1])
        for device_name in devices(cfg):
            if runtime not in (None, CHANNELS_LAST) and device_name != "cpu":
                continue  # the runtimes run on the CPU
            device = torch.device(device_name)
            on_device = model.to(device)
            for threads in dict.fromkeys(lcfg.threads if device_name == "cpu" else [0]):
                with torch_threads(threads) as used:
                    compiled: Compiled | None = None
                    if runtime not in (None, CHANNELS_LAST):
                        compiled = compile_dense(runtime, onnx, used, on_device)
                    for batch in (1, lcfg.batch_size):
                        xs = batches(images, batch, lcfg.iterations + lcfg.warmup, device)
                        engine = "pytorch"
                        if compiled is not None:
                            arrays = [x.numpy() for x in xs]
                            diff = max_abs_diff(compiled, on_device, xs[:3])
                            check = {"version": compiled.version, **compiled.settings,
                                     "max_abs_diff": max(check.get("max_abs_diff", 0.0), diff)}  # fmt: skip
                            call, engine = (lambda i, run=compiled.run: run(arrays[i])), runtime
                        elif runtime == CHANNELS_LAST:
                            cl = on_device.to(memory_format=torch.channels_last)
                            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
                            call = lambda i, m=cl: m(xs[i])  # noqa: E731
                        else:
                            call = lambda i, m=on_device: m(xs[i])  # noqa: E731
                            engine = "native" if isinstance(on_device, PlannedModel) else "pytorch"
                            if name in PLAN_STOPPED:
                                engine = f"pytorch (plan stopped at {PLAN_STOPPED[name]})"
                        t = time_blocks({name: call}, lcfg.iterations, lcfg.warmup, device)[name]
                        team = (on_device.threads_per_image(xs[0].shape[1:], used, batch)
                                if compiled is None and isinstance(on_device, PlannedModel) else None)
                        rows.append({"variant": name, "device": device_name, "threads": used, "batch": batch,
                                     "runtime": engine, "threads_per_image": team, **t.as_dict()})  # fmt: skip
                    del compiled
            on_device.to("cpu")
    return {"variant": name, "rows": rows, "check": check}


# ----------------------------------------------------------------------------- sessions of processes
def session_order(names: list[str], session: int) -> list[str]:
    """Session 0 runs the variants in order, session 1 backwards, and so on."""
    return list(names) if session % 2 == 0 else list(reversed(names))


def run_sessions(cfg: Config, params: Path, names: list[str] | None = None) -> list[dict]:
    """``latency.sessions`` sessions; in each, every variant of ``names`` (default :func:`job_names`) timed
    in a process of its own (:func:`time_variant`, in a process forked by a :class:`WorkerServer`). Returns
    the rows with their session index, and the runtimes' checks."""
    names = names or job_names(cfg)
    k = cfg.latency.sessions
    out = []
    with WorkerServer(params) as server, tqdm(total=k * len(names), desc="latency", unit="process") as bar:
        for session in range(k):
            for name in session_order(names, session):
                bar.set_postfix_str(f"session {session + 1}/{k}: {name}")
                out.append({**server.time(name), "session": session})
                bar.update()
    return out


class WorkerServer:
    """A process (``python -m pipeline.latency --serve``) that imports this module (torch, the operators, the
    runtimes' glue), runs nothing, and forks one process per variant to time: each starts without the
    seconds of imports, yet as fresh as a new interpreter (no model was loaded and no thread pool started
    before the fork; it imports its runtime, loads its model and sets its threads itself), and it exits
    before the next one starts."""

    def __init__(self, params: Path):
        self._tmp = tempfile.TemporaryDirectory(prefix="latency-")
        self._folder = Path(self._tmp.name)
        self._log = (self._folder / "server.log").open("w")
        cmd = [sys.executable, "-m", "pipeline.latency", "--serve", "--params", str(params)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      text=True, cwd=repo_root())  # fmt: skip

    def time(self, name: str) -> dict:
        """:func:`time_variant` of ``name`` in a forked process; a failure names the variant and its cause."""
        result, log = self._folder / "result.json", self._folder / "worker.log"
        result.unlink(missing_ok=True)
        try:
            self._proc.stdin.write(json.dumps({"name": name, "result": str(result), "log": str(log)}) + "\n")
            self._proc.stdin.flush()
            reply = self._proc.stdout.readline()
        except BrokenPipeError:
            reply = ""
        if not reply:  # the server itself is gone
            raise UserError(f"latency: timing {name!r} failed: the timing server stopped: "
                            f"{_last_line(self._folder / 'server.log') or f'exit code {self._proc.poll()}'}")
        code = json.loads(reply)["exit"]
        if code != 0 or not result.is_file():
            raise UserError(f"latency: timing {name!r} in its own process failed: "
                            f"{_last_line(log) or f'exit code {code}'}")
        return json.loads(result.read_text())

    def __enter__(self) -> WorkerServer:
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()  # end of jobs: the server returns
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        self._tmp.cleanup()


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else ""


def serve(params: Path) -> None:
    """The :class:`WorkerServer`'s loop: one JSON job per line of stdin (``name``, ``result`` and ``log``
    paths), each timed in a forked child whose output goes to ``log`` and whose result to ``result``; one
    line ``{"exit": code}`` on stdout per job."""
    cfg = load_config(params)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the timing process
            code = 1
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                write_json(job["result"], time_variant(cfg, job["name"]), indent=None)
                code = 0
            except UserError as err:
                print(worker_error(err), file=sys.stderr)
            except BaseException:  # noqa: BLE001 - its last line reaches the stage's error
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


def aggregate(results: list[dict], sessions: int) -> tuple[list[dict], dict[str, dict]]:
    """One row per (variant, device, threads, batch): ``session_ms`` the medians of the sessions in session
    order, ``median_ms`` / ``q1_ms`` / ``q3_ms`` the medians over sessions; and each runtime's check (its
    largest deviation from PyTorch over every session)."""
    groups: dict[tuple, list[dict]] = {}
    checks: dict[str, dict] = {}
    for res in results:
        for r in res["rows"]:
            groups.setdefault((r["variant"], r["device"], r["threads"], r["batch"]), []).append({**r, "session": res["session"]})
        if res["check"]:
            rt = res["rows"][0]["runtime"]
            prev = checks.get(rt, {}).get("max_abs_diff", 0.0)
            checks[rt] = {**res["check"], "max_abs_diff": max(prev, res["check"]["max_abs_diff"])}
    rows = []
    for group in groups.values():
        group.sort(key=lambda r: r["session"])
        if [r["session"] for r in group] != list(range(sessions)):
            raise RuntimeError(f"latency: {group[0]['variant']} was not timed once in each of {sessions} sessions")
        first = group[0]
        row = {k: first[k] for k in ("variant", "device", "threads", "batch", "runtime", "threads_per_image")}
        for q in ("median_ms", "q1_ms", "q3_ms"):
            row[q] = statistics.median(r[q] for r in group)
        row.update(iqr_ms=row["q3_ms"] - row["q1_ms"], iterations=first["iterations"],
                   session_ms=[r["median_ms"] for r in group], per_image_ms=row["median_ms"] / row["batch"])
        rows.append(row)
    return rows, checks


def _ratio(num: list[float], den: list[float]) -> tuple[float, list[float], float | None, float | None]:
    """Per-session ratios num/den, their geometric mean and its interval over the sessions (log scale)."""
    ratios = [a / b for a, b in zip(num, den)]
    logs = [math.log(r) for r in ratios]
    mean = math.exp(statistics.fmean(logs))
    if len(logs) < 2:
        return mean, ratios, None, None
    _, lo, hi = stats.t_interval(logs, INTERVAL_LEVEL)
    return mean, ratios, math.exp(lo), math.exp(hi)


def add_speedups(rows: list[dict], complexity: dict[str, dict], runtimes: list[str] = ()) -> list[dict]:
    """Per (device, threads, batch): the fastest dense runtime (lowest median over sessions) becomes the
    ``dense`` row (``runtime`` and ``layout`` name it) and every speed-up is against it, session by session
    (``speedup_sessions``; ``speedup_vs_dense`` their geometric mean, ``speedup_lo``/``speedup_hi`` its
    interval); ``dense_pytorch`` (PyTorch eager in its faster layout) and ``dense_<runtime>`` stay as rows,
    and ``speedup_vs_eager`` is the speed-up against PyTorch eager. A row without ``session_ms`` is one
    session."""
    name = methods.baseline().name
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r = {**r, "session_ms": r.get("session_ms") or [r["median_ms"]]}
        groups.setdefault((r["device"], r["threads"], r["batch"]), []).append(r)
    for group in groups.values():
        nchw = next(r for r in group if r["variant"] == name)
        cl = next(r for r in group if r["variant"] == f"{name}_{CHANNELS_LAST}")
        eager = min((nchw, cl), key=lambda r: r["median_ms"])
        layout = CHANNELS_LAST if eager is cl else "nchw"
        dense = [{**eager, "variant": f"{name}_pytorch", "runtime": "pytorch", "layout": layout}]
        for rt in runtimes:
            found = next((r for r in group if r["variant"] == f"{name}_{rt}"), None)
            if found is not None:
                dense.append({**found, "runtime": rt, "layout": "nchw"})
        best = min(dense, key=lambda r: r["median_ms"])
        baseline = {**best, "variant": name}
        timed_dense = {r["variant"] for r in dense} | {name, f"{name}_{CHANNELS_LAST}"}
        methods_rows = [{"runtime": "pytorch", **r, "layout": "nchw"} for r in group if r["variant"] not in timed_dense]
        for r in [baseline, *dense, *methods_rows]:
            c = complexity[name if r["variant"] in timed_dense else r["variant"]]
            mac_speedup = complexity[name]["macs_per_image"] / c["macs_per_image"]
            speedup, per_session, lo, hi = _ratio(best["session_ms"], r["session_ms"])
            out.append({**r, **c, "speedup_vs_dense": speedup, "speedup_sessions": per_session,
                        "speedup_lo": lo, "speedup_hi": hi,
                        "speedup_vs_eager": _ratio(eager["session_ms"], r["session_ms"])[0],
                        "mac_speedup": mac_speedup, "realized_over_ideal": speedup / mac_speedup,
                        "best_dense": best["runtime"], "dense_nchw_ms": nchw["median_ms"],
                        "dense_channels_last_ms": cl["median_ms"],
                        **{f"dense_{d['runtime']}_ms": d["median_ms"] for d in dense}})  # fmt: skip
    return out


def headline(rows: list[dict], accuracy: dict[str, dict]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The numbers the claims are checked on: CPU, all cores, batch 1 (and the batch size), against the
    fastest dense runtime (``_speedup_``, the geometric mean over sessions) and against PyTorch eager
    (``_speedup_vs_eager_``); and the per-session speed-ups behind each ``_speedup_``."""
    base = methods.baseline().name
    cpu = [r for r in rows if r["device"] == "cpu"]
    most = max(r["threads"] for r in cpu)
    out, sessions = {}, {}
    for r in cpu:
        if r["threads"] == most and r["variant"] != base and not r["variant"].startswith(f"{base}_"):
            key = f"{r['variant']}_speedup_b{r['batch']}"
            out[key] = r["speedup_vs_dense"]
            sessions[key] = r["speedup_sessions"]
            out[f"{r['variant']}_speedup_vs_eager_b{r['batch']}"] = r["speedup_vs_eager"]
    out.update({f"{name}_acc_change": a["acc_change"] for name, a in accuracy.items() if name != base})
    out["threads"] = float(most)
    return out, sessions


def runtime_accuracy(model: Compiled, split: tuple[torch.Tensor, torch.Tensor], norm: Normalizer,
                     batch_size: int) -> float:
    """Test accuracy of the dense model as a runtime computes it."""
    images, labels = split
    correct = 0
    for i in range(0, len(images), batch_size):
        x = norm(images[i : i + batch_size]).contiguous().numpy()
        correct += int((torch.from_numpy(model.run(x)).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def measure(cfg: Config, malloc_tuned: bool) -> tuple[dict, dict[str, float], dict[str, float]]:
    """The whole measurement of the latency stage: every variant's MACs, parameters and test accuracy, the
    dense runtimes' accuracy on the ONNX export (outputs checked against PyTorch), then the timing sessions
    and the speed-ups. Returns (``latency.json``'s record, the headline metrics, every row flattened into
    MLflow metric names)."""
    data = load_task("upstream")
    test_x = normalized(data, "test")
    models, sources, recorded = build_variants(cfg)
    norm = Normalizer(data.mean, data.std)
    complexity, accuracy = {}, {}
    for name, m in models.items():
        complexity[name] = {"macs_per_image": count_macs(sources[name], test_x), **count_params(sources[name])}
        acc = evaluate(m, *data.splits["test"], norm, cfg.latency.eval_batch_size)["acc"]
        accuracy[name] = {"test_acc": acc, "stage_test_acc": recorded[name], "acc_change": acc - recorded[name]}
    compiled = native.load()  # the CPU inference kernels the timed modules use (None: PyTorch paths)
    base = methods.baseline().name
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.latency.runtimes and "cpu" in cfg.latency.devices:
            onnx = export_onnx(models[base], Path(tmp) / f"{base}.onnx", test_x[:1])
            for rt in cfg.latency.runtimes:
                runtime_model = compile_dense(rt, onnx, resolve_threads(0), models[base])
                acc = runtime_accuracy(runtime_model, data.splits["test"], norm, cfg.latency.eval_batch_size)
                accuracy[f"{base}_{rt}"] = {"test_acc": acc, "stage_test_acc": recorded[base],
                                            "acc_change": acc - recorded[base]}  # fmt: skip
                del runtime_model  # its threads must not spin while the timing processes run
        accuracy[f"{base}_pytorch"] = accuracy[base]
        for name in [f"{base}_pytorch", *[f"{base}_{rt}" for rt in cfg.latency.runtimes]]:
            complexity[name] = complexity[base]
        params = Path(tmp) / "params.json"  # the validated params, for the timing processes
        params.write_text(json.dumps(to_dict(cfg)))
        timed, checks = aggregate(run_sessions(cfg, params), cfg.latency.sessions)
    rows = add_speedups(timed, complexity, cfg.latency.runtimes)
    result = {
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": resolve_threads(0),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "iterations": cfg.latency.iterations, "warmup": cfg.latency.warmup, "sessions": None,
        "timing_sessions": cfg.latency.sessions, "malloc_tuned": malloc_tuned,
        "native_kernels": compiled.__name__ if compiled is not None else None,
        "runtimes": checks, "rows": rows, "accuracy": accuracy, "complexity": complexity,
    }  # fmt: skip
    summary, result["sessions"] = headline(rows, accuracy)
    return result, summary, flat_metrics(result)


def flat_metrics(result: dict) -> dict[str, float]:
    """Every row, accuracy and runtime check of a ``latency.json`` record under one MLflow metric name each
    (``<variant>.<device>.t<threads>.b<batch>.median_ms``, ``<variant>.test_acc``, ...)."""
    flat = {}
    for r in result["rows"]:
        key = f"{r['variant']}.{r['device']}.t{r['threads']}.b{r['batch']}"
        flat.update({f"{key}.median_ms": r["median_ms"], f"{key}.iqr_ms": r["iqr_ms"],
                     f"{key}.speedup_vs_dense": r["speedup_vs_dense"],
                     f"{key}.speedup_vs_eager": r["speedup_vs_eager"]})  # fmt: skip
        if r["speedup_lo"] is not None:
            flat.update({f"{key}.speedup_lo": r["speedup_lo"], f"{key}.speedup_hi": r["speedup_hi"]})
    for name, a in result["accuracy"].items():
        flat.update({f"{name}.test_acc": a["test_acc"], f"{name}.acc_change": a["acc_change"],
                     f"{name}.macs_per_image": result["complexity"][name]["macs_per_image"]})  # fmt: skip
    flat.update({f"{rt}.max_abs_diff": c["max_abs_diff"] for rt, c in result["runtimes"].items()})
    return flat


def worker_error(err: UserError) -> str:
    """The one line a timing process ends with when its variant cannot be timed."""
    return f"latency worker: error: {err}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Time one latency variant alone in this process (JSON on stdout), "
                                                 "or serve the latency stage's timing processes.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--worker", metavar="NAME", help="variant name (see job_names)")
    group.add_argument("--serve", action="store_true", help="fork a timing process per job read on stdin")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.params))
        return
    try:
        result = time_variant(load_config(Path(args.params)), args.worker)
    except UserError as err:
        sys.exit(worker_error(err))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
