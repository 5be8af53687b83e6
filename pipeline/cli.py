"""The one wrapper around every stage entry point: user errors become one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline.config import Config, load_config
from pipeline.errors import UserError


def stage_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser.parse_args()


def run_stage(name: str, main: Callable[[Config], None], description: str) -> None:
    """Parse ``--params``, validate the whole config, then run ``main``.

    Validation happens before ``main`` touches any output. A :class:`UserError`
    anywhere prints ``<stage>: error: <message>`` and exits 2; anything else is
    a bug and keeps its traceback.
    """
    args = stage_args(description)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.params)
        main(cfg)
    except UserError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
