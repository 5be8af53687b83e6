"""The dense model in the runtimes a user deploys on a CPU: ONNX Runtime, OpenVINO and the project's own
compiled plan.

A speed-up is only worth reporting against the fastest dense model a user could
run, and on a CPU that is rarely PyTorch eager: both runtimes fuse the folded
conv + ReLU + residual graph and pick their own kernels. Each runtime runs the
ONNX export of the BN-folded dense model (``torch.onnx.export``, the TorchScript
exporter) in f32 with the thread count being measured.

Fairness (the latency stage times every variant alone in its own process, as
it is deployed, ``pipeline/latency.py``):

- ONNX Runtime keeps its defaults for a process of its own: intra-op threads
  that spin between runs (``session.intra_op.allow_spinning``). Stopping the
  spin after each run (``session.force_spinning_stop``) only protects other
  work in the same process and cost ONNX Runtime 1.04-1.38 x at batch 1 here.
  Inter-op parallelism is 1 (one sequential graph).
- OpenVINO picks bf16 on CPUs with bf16/AMX instructions unless
  ``INFERENCE_PRECISION_HINT`` is ``f32``, and bf16 is another function; it is
  set to f32 (and checked), with one stream and the latency hint.
- Every runtime's output on the timed inputs is compared with PyTorch's
  (``max_abs_diff``), so a baseline never computes a different function.
- ``native`` runs the dense model through the same whole-model compiled plan
  (``pipeline/ops/plan``) that runs the dynamic and sparse models, so
  a method's speed-up is never an artefact of the plan beating the runtimes on
  the dense model too: if the plan is the fastest dense runtime, it is the
  baseline. Its threads are torch's intra-op threads (OpenMP, which sleeps
  after a short spin).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError


@dataclass
class Compiled:
    """One dense model compiled by a runtime: ``run(x)`` maps an NCHW float32 array to the logits."""

    runtime: str
    version: str
    threads: int
    run: Callable[[np.ndarray], np.ndarray]
    settings: dict[str, str] = field(default_factory=dict)


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """``model`` (eval mode, BN folded) as an ONNX file with a dynamic batch dimension."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)  # fmt: skip
    return path


def onnxruntime_model(path: Path, threads: int) -> Compiled:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")  # the default, stated
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return Compiled("onnxruntime", ort.__version__, threads, lambda x: session.run(None, {name: x})[0],
                    {"spinning": "default (spins between runs)", "graph_optimization": "all", "provider": "CPUExecutionProvider"})  # fmt: skip


def openvino_model(path: Path, threads: int) -> Compiled:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
              "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    if precision != "f32":
        raise RuntimeError(f"OpenVINO compiled the dense model in {precision}, not f32")
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[0]

    return Compiled("openvino", ov.get_version(), threads, run,
                    {"precision": precision, "streams": "1", "hint": "LATENCY"})  # fmt: skip


def native_model(model: nn.Module, threads: int) -> Compiled:
    """The dense model (eval mode, BN folded) as the compiled whole-model plan; runs with torch's intra-op
    thread count, which the caller sets to ``threads``."""
    from pipeline.ops.plan import PlannedModel, Unsupported, probe_shape
    from pipeline.ops import native

    planned = PlannedModel(model)
    try:
        planned.plan_for(probe_shape(model))
    except Unsupported as err:
        raise UserError(f"latency.runtimes: 'native' cannot run the dense model: {err}") from None

    def run(x: np.ndarray) -> np.ndarray:
        return planned.plan_for(x.shape[1:]).forward(torch.from_numpy(x)).numpy()

    return Compiled("native", native.build_name(), threads, run, {"engine": "pipeline/ops/plan"})


# Runtimes compiled from the ONNX export, and those built from the PyTorch model.
COMPILERS: dict[str, Callable[[Path, int], Compiled]] = {"onnxruntime": onnxruntime_model, "openvino": openvino_model}
MODEL_COMPILERS: dict[str, Callable[[nn.Module, int], Compiled]] = {"native": native_model}


def compile_dense(name: str, path: Path, threads: int, model: nn.Module) -> Compiled:
    """The dense model compiled by runtime ``name`` for ``threads`` intra-op threads: from its ONNX export at
    ``path`` or, for the runtimes of ``MODEL_COMPILERS``, from ``model`` itself."""
    if name in MODEL_COMPILERS:
        return MODEL_COMPILERS[name](model, threads)
    if name not in COMPILERS:
        raise UserError(f"latency.runtimes: unknown runtime {name!r}; known: {', '.join([*COMPILERS, *MODEL_COMPILERS])}")
    return COMPILERS[name](path, threads)


def max_abs_diff(compiled: Compiled, model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest absolute difference of the runtime's logits from PyTorch's on ``inputs``."""
    worst = 0.0
    with torch.inference_mode():
        for x in inputs:
            ref = model(x).numpy()
            worst = max(worst, float(np.abs(compiled.run(x.numpy()) - ref).max()))
    return worst
