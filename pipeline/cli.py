"""The one wrapper around every stage entry point: user errors become one line."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable

from pipeline import distributed
from pipeline.atomic import FULL_DISK
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.redact import redact


def run_stage(
    name: str,
    main: Callable[..., None],
    description: str,
    methods: Callable[[], list[str]] | None = None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    data_parallel: bool = False,
) -> None:
    """Parse ``--params`` (and a method name when ``methods`` gives the accepted ones), validate
    the config, then run ``main(cfg)`` or ``main(cfg, method)``; ``options`` adds stage-specific
    flags, passed on as keyword arguments.

    Validation happens before ``main`` touches any output. A :class:`UserError`
    anywhere prints ``<stage>: error: <message>`` and exits 2, as does a full
    disk under any write; anything else is a bug and keeps its traceback
    (exit 1). Both show URLs without credentials.
    ``data_parallel`` stages run themselves under torchrun when params ask
    (``distributed.nproc_per_node`` > 1, :mod:`pipeline.distributed`).
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if methods:
        parser.add_argument("method", help="one of: " + ", ".join(methods()))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if options:
        options(parser)
    args = parser.parse_args()
    extra = {k: v for k, v in vars(args).items() if k not in ("method", "params")}
    label = f"{name}@{args.method}" if methods else name
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if methods and args.method not in methods():
            raise UserError(f"unknown method {args.method!r}; this stage takes one of: {', '.join(methods())}")
        cfg = load_config(args.params)
        if data_parallel:
            distributed.launch(cfg.distributed.nproc_per_node, cfg.distributed.backend, sys.argv[1:])
        main(cfg, args.method, **extra) if methods else main(cfg, **extra)
    except UserError as err:
        print(redact(f"{label}: error: {err}"), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        if err.errno not in FULL_DISK:  # a bug: keep the traceback, without credentials
            print(redact(traceback.format_exc()), file=sys.stderr, end="")
            sys.exit(1)
        # a write outside the project's own writers (pipeline/atomic.py), e.g. a library's cache
        print(redact(f"{label}: error: cannot write {err.filename or 'a file'}: no space left on device"), file=sys.stderr)
        sys.exit(2)
    except Exception:  # a bug: keep the traceback, without credentials
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        sys.exit(1)
    exit_without_teardown(0)


def exit_without_teardown(code: int) -> None:
    """End a finished stage's process without Python's teardown of its modules.

    Finalizing torch, torch._dynamo, MLflow and SQLAlchemy (every module dict cleared, every object freed)
    took 1.3 to 1.9 s after a stage's work was done, in every stage of every run. What must happen at exit
    still does: the atexit handlers (MLflow's end of an active run, logging's flush, temporary folders), the
    flush of stdout and stderr; the stage's files were closed by their writers (:mod:`pipeline.atomic`).
    A non-daemon thread still running means someone expects the normal exit, which then takes place."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
