"""Paper profiles: run a paper's own setting (its data, architecture, recipe and method params) and set the
result beside the numbers it reports (profiles/<name>.yaml; pipeline/profiles.py).

Usage:
  python -m stages.profile list
  python -m stages.profile show NAME
  python -m stages.profile apply NAME [--set key=value ...] [--params params.yaml]

`apply` merges the profile into params.yaml (comments kept; in `convert` and `search` only the profile's
methods stay), then the --set pairs (e.g. `--set data.upstream.root=/datasets/imagenet`), validates the result
and writes it; `dvc repro` then runs the paper's setting end to end. params.yaml that already follows a
profile is refused: `git checkout params.yaml` restores the defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import profiles
from pipeline.errors import UserError
from pipeline.redact import redact


def _list() -> None:
    for name in profiles.names():
        ref = profiles.load_profile(name)["reference"]
        print(f"{name}\n    {ref.get('setting') or ''}".rstrip())


def _show(name: str) -> None:
    profiles.load_profile(name)  # an unknown or malformed profile stops here, naming the known ones
    print((profiles.PROFILES / f"{name}.yaml").read_text())


def _apply(name: str, params: Path, sets: list[str]) -> None:
    applied = profiles.apply(name, params, sets)
    print(f"profile: applied '{name}' to {params}")
    for task, root in profiles.data_roots(applied).items():
        print(f"profile: data.{task}.root = {root}  (put the data there, or pass --set data.{task}.root=PATH)")
    rows = applied["reference"]["rows"]
    print(f"profile: {len(rows)} reported number(s) will stand beside this run's in the report; now run: dvc repro")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the profiles and their settings")
    show = sub.add_parser("show", help="one profile's file")
    show.add_argument("name")
    ap = sub.add_parser("apply", help="merge a profile into params.yaml")
    ap.add_argument("name")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml key after the "
                    "profile (dotted, YAML value), e.g. data.upstream.root=/datasets/cifar; repeatable")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            _list()
        elif args.action == "show":
            _show(args.name)
        else:
            _apply(args.name, args.params, args.set)
    except UserError as err:
        print(f"profile: error: {redact(str(err))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
