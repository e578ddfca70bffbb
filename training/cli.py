"""The `ace` command. Each sub-command lives in its own `training/cmd_*.py` module exposing
`register(subparsers)`, which adds its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "training.cmd_train",  # ace train, ace export, ace init-encoder
    "training.cmd_dense",  # ace train-dense
    "training.cmd_data",  # ace data phantoms | demo
    "training.cmd_eval",  # ace eval
    "training.cmd_index",  # ace index build | add | remove | publish | rollback | list
    "training.cmd_serve",  # ace serve, ace demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ace", description="ACE anatomical correspondence")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue  # command not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
