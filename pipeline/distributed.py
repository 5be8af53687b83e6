"""Data-parallel training with ``torch.distributed``: one process per device (``torchrun``), gradients averaged.

- :func:`launch`: a stage whose params ask for ``distributed.nproc_per_node`` > 1
  re-runs itself under ``torchrun --nproc_per_node=N`` (gloo on CPU, NCCL on
  CUDA); under ``torchrun`` already (several nodes: ``--nnodes``,
  ``--rdzv-endpoint``) it joins the process group instead.
- The training engine (:func:`pipeline.train.fit`) wraps the model in DDP and
  gives each rank its share of every global batch; checkpoints, metrics files
  and MLflow runs are written by rank 0 only (:func:`is_main`).
- Loss terms that are not a mean over samples (DynConv's budget term) average
  their inputs across ranks first (:func:`mean_across_ranks`), so every rank
  computes the loss of the global batch.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

from pipeline.errors import UserError

UNDER_TORCHRUN = "LOCAL_RANK"


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launch(nproc_per_node: int, backend: str, argv: list[str]) -> None:
    """Re-run this stage under torchrun when ``nproc_per_node`` > 1; join the process group under torchrun."""
    if UNDER_TORCHRUN in os.environ:
        die_with_launcher()
        setup(backend)
        return
    if nproc_per_node <= 1:
        return
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        raise UserError("distributed.nproc_per_node > 1 needs torchrun (it comes with torch) on PATH")
    module = sys.modules["__main__"].__spec__.name
    os.execv(torchrun, [torchrun, "--standalone", f"--nproc_per_node={nproc_per_node}", "-m", module, *argv])


def die_with_launcher() -> None:
    """Make this worker end when its torchrun agent does (Linux). torchrun starts every worker in a session
    of its own, so a kill -9 of the launcher (or of its process group) would otherwise leave the ranks
    training and writing checkpoints and outputs on their own, racing a rerun."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def setup(backend: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL with CUDA unless told)."""
    if active():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ[UNDER_TORCHRUN]))


def local_threads(threads: int) -> int:
    """Intra-op threads per rank: the configured count, or this host's cores shared by its ranks (0)."""
    if threads:
        return threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local)


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks, differentiable (every rank's gradient reaches every rank)."""
    if not active():
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t) / world_size()


def sum_across_ranks(values: list[float]) -> list[float]:
    """Plain numbers summed over the ranks (bookkeeping, no gradient)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()
