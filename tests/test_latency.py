"""Timing harness, BN folding and the speed-up bookkeeping of the latency stage."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.fold import fold_batchnorm
from pipeline.models import build_model
from pipeline.runtimes import compile_dense, export_onnx, max_abs_diff
from pipeline.timing import resolve_threads, summarize, time_blocks, time_interleaved, torch_threads
from pipeline.latency import add_speedups, aggregate, session_order

from .conftest import build_method, model_cfg


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_summarize_quartiles():
    t = summarize([0.001 * v for v in (5, 1, 3, 2, 4)])
    assert (t.q1_ms, t.median_ms, t.q3_ms) == pytest.approx((2.0, 3.0, 4.0))
    assert t.iqr_ms == pytest.approx(2.0) and t.iterations == 5
    with pytest.raises(ValueError):
        summarize([0.1, 0.2])


def _sleeper(order: list, name: str, seconds: float):
    """A timed call that records its turn and sleeps."""
    def call(i):
        order.append((name, i))
        time.sleep(seconds)
    return call


def test_time_interleaved_takes_turns_and_measures():
    order = []

    out = time_interleaved({"a": _sleeper(order, "a", 0.002), "b": _sleeper(order, "b", 0.006)}, iterations=6, warmup=1,
                           device=torch.device("cpu"))
    assert order[:4] == [("a", 0), ("b", 0), ("a", 0), ("b", 0)]  # warm-up round, then timed rounds in turns
    assert len(order) == 2 * 7
    assert 2.0 < out["b"].median_ms / out["a"].median_ms < 4.0


def test_time_blocks_runs_each_variant_in_its_own_block():
    order = []

    out = time_blocks({"a": _sleeper(order, "a", 0.002), "b": _sleeper(order, "b", 0.006)}, iterations=5, warmup=1,
                      device=torch.device("cpu"))
    assert order == [("a", i) for i in (0, 0, 1, 2, 3, 4)] + [("b", i) for i in (0, 0, 1, 2, 3, 4)]
    assert out["a"].iterations == out["b"].iterations == 5
    assert 2.0 < out["b"].median_ms / out["a"].median_ms < 4.0


def test_threads_are_set_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert resolve_threads(0) >= 1 and resolve_threads(3) == 3


UPDATES = {  # full width (no distillation needed), noisy kernels, half-pruned SD-Conv, gates that vary
    "dynet": {"width": 1.0, "noise_std": 0.05},
    "sdconv": {"width": 1.0, "noise_std": 0.05, "init_sparsity": 0.5},
    "dynconv": {"open_bias": 0.0},
}


@pytest.mark.parametrize("arch", ["cifar_resnet", "cifar_mobilenetv2"])
@pytest.mark.parametrize("method", [None, "dynet", "sdconv", "dynconv"])
def test_folding_keeps_the_function(arch, method):
    torch.manual_seed(0)
    cfg = model_cfg(arch=arch, width=0.5, **({"depth": 8} if arch == "cifar_resnet" else {}))
    dense = randomize_bn(build_model(cfg, 1, 10))
    model = dense
    if method is not None:
        model, _ = build_method(method, cfg, UPDATES[method], dense)
        for m in model.modules():  # routing and gates that vary over positions and samples
            if hasattr(m, "routing"):
                torch.nn.init.normal_(m.routing[-1].weight, std=1.0)
            if hasattr(m, "gate"):
                torch.nn.init.normal_(m.gate.conv.weight, std=0.3)
        randomize_bn(model)
    folded, n = fold_batchnorm(model)
    assert n > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        ref, out = model.eval()(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_linear_coefficients_are_not_folded():
    cfg = model_cfg(arch="cifar_resnet", depth=8)
    model, names = build_method("dynet", cfg, {"width": 1.0, "activation": "linear"}, build_model(cfg, 1, 10))
    _, n = fold_batchnorm(model)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n == bns - len(names)  # the BN after each linear-coefficient dynamic conv stays


def test_speedups_use_the_faster_dense_layout():
    def row(variant, ms):
        return {"variant": variant, "device": "cpu", "threads": 2, "batch": 1, "median_ms": ms}

    complexity = {"dense": {"macs_per_image": 100.0}, "sparse": {"macs_per_image": 25.0}}
    rows = add_speedups([row("dense", 10.0), row("dense_channels_last", 8.0), row("sparse", 4.0)], complexity)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"dense", "dense_pytorch", "sparse"} and by["dense"]["layout"] == "channels_last"
    assert by["sparse"]["speedup_vs_dense"] == pytest.approx(2.0)
    assert by["sparse"]["mac_speedup"] == pytest.approx(4.0)
    assert by["sparse"]["realized_over_ideal"] == pytest.approx(0.5)


def test_speedups_are_against_the_fastest_dense_runtime_and_eager_is_kept():
    def row(variant, ms, batch=1):
        return {"variant": variant, "device": "cpu", "threads": 2, "batch": batch, "median_ms": ms}

    complexity = {"dense": {"macs_per_image": 100.0}, "sparse": {"macs_per_image": 25.0}}
    timed = [row("dense", 10.0), row("dense_channels_last", 8.0), row("dense_onnxruntime", 2.0),
             row("dense_openvino", 4.0), row("sparse", 4.0),
             row("dense", 40.0, 8), row("dense_channels_last", 50.0, 8), row("dense_onnxruntime", 60.0, 8),
             row("dense_openvino", 45.0, 8), row("sparse", 20.0, 8)]
    rows = add_speedups(timed, complexity, ["onnxruntime", "openvino"])
    by = {(r["variant"], r["batch"]): r for r in rows}
    assert by[("dense", 1)]["runtime"] == "onnxruntime" and by[("dense", 1)]["median_ms"] == 2.0
    assert by[("sparse", 1)]["speedup_vs_dense"] == pytest.approx(0.5)  # 2 ms / 4 ms: slower than ORT
    assert by[("sparse", 1)]["speedup_vs_eager"] == pytest.approx(2.0)  # 8 ms (channels-last) / 4 ms
    assert by[("dense_openvino", 1)]["speedup_vs_dense"] == pytest.approx(0.5)
    assert by[("dense", 8)]["runtime"] == "pytorch" and by[("dense", 8)]["layout"] == "nchw"
    assert by[("sparse", 8)]["speedup_vs_dense"] == pytest.approx(2.0)
    assert by[("dense_pytorch", 8)]["macs_per_image"] == 100.0


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "native"])
def test_runtime_runs_the_function_of_the_folded_dense_model(runtime, tmp_path):
    """ONNX export of a BN-folded model in each runtime (the compiled plan: the model itself) against PyTorch,
    random inputs, batch 1 and 5: max abs difference below 1e-4 x the largest logit (f32, not OpenVINO's
    bf16 default)."""
    torch.manual_seed(0)
    model = fold_batchnorm(randomize_bn(build_model(model_cfg(arch="cifar_resnet", depth=8), 1, 10)))[0]
    onnx = export_onnx(model, tmp_path / "dense.onnx", torch.randn(1, 1, 32, 32))
    compiled = compile_dense(runtime, onnx, 1, model)
    inputs = [torch.randn(1, 1, 32, 32), torch.randn(5, 1, 32, 32)]
    with torch.inference_mode():
        scale = max(float(model(x).abs().max()) for x in inputs)
    assert max_abs_diff(compiled, model, inputs) < 1e-4 * scale
    assert compiled.threads == 1 and compiled.version


def test_unknown_runtime_is_an_error(tmp_path):
    with pytest.raises(UserError, match="unknown runtime 'tvm'"):
        compile_dense("tvm", tmp_path / "dense.onnx", 1, torch.nn.Identity())


def test_native_runtime_refuses_a_model_it_cannot_compile(tmp_path):
    model = randomize_bn(build_model(model_cfg(arch="cifar_resnet", depth=8), 1, 10))  # BatchNorm not folded
    with pytest.raises(UserError, match="'native' cannot run the dense model: bn"):
        compile_dense("native", tmp_path / "dense.onnx", 1, model)


def test_speedups_are_session_by_session_with_an_interval_on_the_log_scale():
    """Per session the ratio to the fastest dense runtime of that session; the speed-up is their geometric
    mean, the interval Student's t over sessions on log ratios (scipy's t quantile, computed here)."""
    from scipy import stats as sps

    def row(variant, sessions):
        return {"variant": variant, "device": "cpu", "threads": 2, "batch": 1,
                "median_ms": sorted(sessions)[1], "session_ms": sessions}

    complexity = {"dense": {"macs_per_image": 100.0}, "sparse": {"macs_per_image": 25.0}}
    timed = [row("dense", [10.0, 12.0, 11.0]), row("dense_channels_last", [9.0, 9.5, 9.2]),
             row("dense_onnxruntime", [2.0, 3.0, 2.4]), row("sparse", [1.0, 2.0, 1.5])]
    by = {r["variant"]: r for r in add_speedups(timed, complexity, ["onnxruntime"])}
    assert by["dense"]["runtime"] == "onnxruntime"
    ratios = [2.0 / 1.0, 3.0 / 2.0, 2.4 / 1.5]
    assert by["sparse"]["speedup_sessions"] == pytest.approx(ratios)
    logs = np.log(ratios)
    assert by["sparse"]["speedup_vs_dense"] == pytest.approx(float(np.exp(logs.mean())))
    half = sps.t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    assert by["sparse"]["speedup_lo"] == pytest.approx(float(np.exp(logs.mean() - half)))
    assert by["sparse"]["speedup_hi"] == pytest.approx(float(np.exp(logs.mean() + half)))
    assert by["sparse"]["speedup_vs_eager"] == pytest.approx(float(np.exp(np.log([9.0, 9.5, 9.2]) - np.log([1.0, 2.0, 1.5])).prod() ** (1 / 3)))
    assert by["dense"]["speedup_vs_dense"] == pytest.approx(1.0) and by["dense"]["speedup_lo"] == pytest.approx(1.0)


def test_sessions_alternate_their_order_and_aggregate_to_medians():
    assert session_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert session_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert session_order(["a", "b", "c"], 2) == ["a", "b", "c"]

    def result(session, ms):
        timing = {"median_ms": ms, "q1_ms": ms - 1, "q3_ms": ms + 1, "iqr_ms": 2.0, "iterations": 30.0}
        return {"variant": "v", "session": session, "check": {},
                "rows": [{"variant": "v", "device": "cpu", "threads": 1, "batch": 1, "runtime": "pytorch",
                          "threads_per_image": None, **timing}]}

    rows, checks = aggregate([result(1, 5.0), result(0, 3.0), result(2, 4.0)], 3)
    assert checks == {} and len(rows) == 1
    assert rows[0]["session_ms"] == [3.0, 5.0, 4.0]  # session order, not arrival order
    assert rows[0]["median_ms"] == 4.0 and rows[0]["q1_ms"] == 3.0 and rows[0]["q3_ms"] == 5.0
    with pytest.raises(RuntimeError, match="not timed once in each of 3 sessions"):
        aggregate([result(0, 3.0), result(2, 4.0)], 3)


def test_timing_server_names_a_failed_variant_and_its_own_death(tmp_path):
    """The latency stage's timing processes come from a fork server: a variant that fails in its process is
    named with its cause, a dead server is said to be dead, and the server ends with its context."""
    from pipeline.latency import WorkerServer
    from .conftest import REPO

    with WorkerServer(REPO / "params.yaml") as server:
        with pytest.raises(UserError, match=r"timing 'nosuch' in its own process failed: .*unknown variant 'nosuch'"):
            server.time("nosuch")
        with pytest.raises(UserError, match=r"timing 'nosuch' in its own process failed"):  # it serves on
            server.time("nosuch")
        proc = server._proc
    assert proc.returncode == 0  # stdin closed: the loop ended
    with WorkerServer(REPO / "params.yaml") as server:
        server._proc.kill()
        server._proc.wait()
        with pytest.raises(UserError, match="the timing server stopped"):
            server.time("dense")
