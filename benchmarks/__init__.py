"""Micro-benchmarks of the operators."""


def timing_args(parser, min_reps: int, default_reps: int):
    """The options every benchmark shares: --threads, --reps (median over them), --warmup."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=default_reps,
                        help=f"timed repetitions per measurement, >= {min_reps} (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions before timing")


def apply_timing_args(parser, args, min_reps: int) -> None:
    """Validate the shared options and set the thread count."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.reps < min_reps or args.warmup < 0:
        parser.error(f"--reps must be >= {min_reps} and --warmup >= 0")
