"""What MLflow's system metrics cost a training stage (``tracking.system_metrics_interval``).

    python -m benchmarks.bench_system_metrics [--seconds 40] [--sampling 0.25] [--pairs 6]

Two measurements, both while the backbone of params.yaml trains on random batches on every core (the
load of a training stage), on a fresh SQLite store like the default pipeline's:

1. The CPU time of the monitor's own thread per sample (collect CPU / memory / disk / network, check the
   run, log the sample to the store), read with ``time.thread_time`` in that thread, sampling every
   ``--sampling`` s for ``--seconds``. A stage sampling every ``interval`` s loses at most this cost
   divided by ``interval`` of its time (it cannot lose more CPU than the thread uses); printed for
   params.yaml's interval.
2. Paired wall times of a fixed number of training steps with the monitor on (params.yaml's interval) and
   off, ``--pairs`` pairs in alternating order: the ratio on/off with a 95 % t interval. It checks (1)
   at the load of a real stage but resolves only what this machine's timing noise allows (a few %).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.paths import repo_root
from pipeline.stats import t_interval


class _TimedMonitor:
    """A SystemMetricsMonitor whose thread records its own CPU time and sample count."""

    def __new__(cls, run_id: str, interval: float, uri: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        class Timed(SystemMetricsMonitor):
            samples = 0
            cpu_seconds = 0.0

            def collect_metrics(self):
                Timed.samples += 1
                return super().collect_metrics()

            def monitor(self):
                try:
                    super().monitor()
                finally:
                    Timed.cpu_seconds = time.thread_time()

        Timed.samples, Timed.cpu_seconds = 0, 0.0
        return Timed(run_id, sampling_interval=interval, samples_before_logging=1, tracking_uri=uri)


def _trainer(cfg):
    model = build_model(cfg.model, 1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(cfg.pretrain.batch_size, 1, 32, 32), torch.randint(0, 10, (cfg.pretrain.batch_size,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def _run(client, exp_id: str) -> str:
    return client.create_run(exp_id, run_name="bench").info.run_id


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the per-sample cost measurement")
    parser.add_argument("--sampling", type=float, default=0.25, help="sampling interval (s) of that measurement")
    parser.add_argument("--pairs", type=int, default=6, help="on/off pairs of the paired wall-time measurement")
    parser.add_argument("--steps", type=int, default=0, help="training steps per timed block (0: about 20 s)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.sampling <= 0 or args.pairs < 2:
        parser.error("--seconds and --sampling must be > 0 and --pairs >= 2")
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    cfg = load_config(repo_root() / "params.yaml")
    interval = cfg.tracking.system_metrics_interval
    torch.manual_seed(0)
    step = _trainer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(uri)
        exp_id = client.create_experiment("bench")
        for _ in range(3):
            step()

        monitor = _TimedMonitor(_run(client, exp_id), args.sampling, uri)
        monitor.start()
        deadline, steps = time.monotonic() + args.seconds, 0
        while time.monotonic() < deadline:
            step()
            steps += 1
        monitor.finish()
        per_sample = type(monitor).cpu_seconds / max(type(monitor).samples, 1)
        print(f"{type(monitor).samples} samples every {args.sampling} s over {args.seconds:.0f} s of training "
              f"({steps} steps, {torch.get_num_threads()} threads): the monitor thread used "
              f"{type(monitor).cpu_seconds * 1e3:.1f} ms CPU, {per_sample * 1e3:.2f} ms per sample")
        if interval > 0:
            print(f"at tracking.system_metrics_interval = {interval} s: at most {100 * per_sample / interval:.3f} % "
                  f"of a stage's time")

        block = args.steps or max(1, round(20.0 * steps / args.seconds))
        ratios = []
        for pair in range(args.pairs):
            times = {}
            for on in ((True, False) if pair % 2 == 0 else (False, True)):
                mon = _TimedMonitor(_run(client, exp_id), interval, uri) if on and interval > 0 else None
                if mon is not None:
                    mon.start()
                t0 = time.perf_counter()
                for _ in range(block):
                    step()
                times[on] = time.perf_counter() - t0
                if mon is not None:
                    mon.finish()
            ratios.append(times[True] / times[False])
            print(f"pair {pair + 1}/{args.pairs}: {block} steps, on {times[True]:.2f} s, off {times[False]:.2f} s, "
                  f"ratio {ratios[-1]:.4f}")
        mean, lo, hi = t_interval([math.log(r) for r in ratios])
        print(f"wall time on/off at {interval} s sampling: {math.exp(mean):.4f} x [{math.exp(lo):.4f}, "
              f"{math.exp(hi):.4f}] (95 % t over {args.pairs} pairs; sd of one pair's ratio "
              f"{statistics.stdev(ratios):.4f})")


if __name__ == "__main__":
    main()
