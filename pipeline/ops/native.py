"""Compiled CPU kernels (``pipeline/ops/csrc``), built on first use.

At batch 1 the operators of this package are small enough that every Python
operator call (a few microseconds each) is a visible share of their time. The
C++ plans compute the same functions as the modules' eval-mode forwards in one
call each, for float32 CPU tensors; the Python code stays the reference (tests
compare both) and the path for every other device and dtype. The dynamic 3x3
conv also trains through them (``dynamic_conv3x3`` and its backward, wrapped
as an autograd function in ``pipeline/ops/dynamic_conv.py``): per-sample
kernels as a grouped conv cost about twice the static conv's training step.

The extension is compiled with the machine's C++ compiler the first time it is
needed (about two minutes on 2 cores) into
``$TORCH_EXTENSIONS_DIR/pipeline_native/`` (default
``~/.cache/torch_extensions``) and loaded from there afterwards. Its name
carries a hash of the sources, the flags, the CPU and torch's version, so a
changed source or a different machine builds anew, and every checkout with the
same sources shares one build. Set ``PIPELINE_NATIVE=0`` to run the Python
paths only; when the build fails the modules fall back to them with one warning.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCES = (
    "module.cpp", "dynamic_conv.cpp", "dynamic_conv_grad.cpp", "plan_build.cpp", "plan_rows.cpp",
    "plan_exec.cpp",
)
HEADERS = ("native.h", "simd.h", "row_gemm.h", "direct_conv.h", "model_plan.h", "plan_kernels.h")
STALE_LOCK_SECONDS = 15 * 60  # a build takes about 2 minutes; a lock this old belongs to a dead build
CSRC = Path(__file__).resolve().parent / "csrc"
CFLAGS = ("-O3", "-march=native", "-fopenmp")

_state: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """Whether the compiled kernels may be used (``PIPELINE_NATIVE`` is not ``0``)."""
    return os.environ.get("PIPELINE_NATIVE", "1") != "0"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(lines[:2])


def build_name() -> str:
    """Extension name: a hash of the sources, the header, the flags, the CPU and torch's version."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(_cpu_signature().encode())
    digest.update(torch.__version__.encode())
    return f"pipeline_native_{digest.hexdigest()[:12]}"


def load() -> ModuleType | None:
    """The compiled module, building it on first use; ``None`` if disabled or the build failed."""
    if not enabled():
        return None
    if "module" not in _state:
        _state["module"] = _build()
    return _state["module"]


def build_root() -> Path:
    """Where builds go: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, in ``pipeline_native/``."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(base) / "pipeline_native"


def _build() -> ModuleType | None:
    name = build_name()
    build_dir = build_root() / name
    library = build_dir / f"{name}.so"
    try:
        if not library.is_file():
            _compile(name, build_dir)
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as err:  # no compiler, no headers, a compile error: run the Python paths
        text = str(err).strip()
        errors = [line.strip() for line in text.splitlines() if "error" in line.lower() and "#error" not in line]
        warnings.warn(f"native CPU kernels unavailable ({type(err).__name__}: {(errors or [text])[-1][:300]}); "
                      "running the PyTorch implementations", RuntimeWarning, stacklevel=3)
        return None


def _compile(name: str, build_dir: Path) -> None:
    """Build into ``build_dir`` from a copy of the sources kept there: every checkout with the same sources
    (a ``dvc exp`` temp copy, say) then shares one build instead of rebuilding for its own paths."""
    # The extension helpers log a CUDA warning when imported on a machine without CUDA; not ours to show.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    source_dir = build_dir / "src"
    source_dir.mkdir(parents=True, exist_ok=True)
    for file in (*SOURCES, *HEADERS):
        target = source_dir / file
        if not target.is_file() or target.read_bytes() != (CSRC / file).read_bytes():
            partial = source_dir / f".{file}.{os.getpid()}"
            shutil.copyfile(CSRC / file, partial)
            os.replace(partial, target)  # atomic: a concurrent build sees the old or the new file
    # torch's build lock; a build killed midway leaves it behind and every later build would wait on it.
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    print(f"Compiling the native CPU kernels ({name}, once per machine, about two minutes) ...",
          file=sys.stderr, flush=True)
    cpp_extension.load(name=name, sources=[str(source_dir / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


def conv3x3_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A [C_out, C_in, 3, 3] kernel as the [(ky, kx, c_in), c_out] matrix ``conv3x3_direct`` takes."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def usable(x: torch.Tensor) -> bool:
    """Whether the compiled kernels handle ``x``: a float32 CPU tensor and an available build."""
    if x.dtype is not torch.float32 or not x.is_cpu:
        return False
    module = _state.get("module", False)
    return (load() if module is False else module) is not None
