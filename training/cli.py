"""The `ace` command. Each sub-command lives in its own `training/cmd_*.py` module exposing
`register(subparsers)`, which adds its parser and sets `func(args) -> int`; a command with
sub-commands of its own stores their name in `<command>_command`.

Building the parser imports no torch (each module imports its heavy parts inside its commands),
so `ace --help` and `ace <command> --help` answer at once.

Error policy, in one place: a user error (`ace_model.errors.UserError`, or a path that is missing
or not writable) prints one line `ace <command>: <message>` and exits 2; any other exception is a
bug and shows its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ace_model.errors import UserError

COMMAND_MODULES = (
    "training.cmd_train",  # ace train, ace export, ace init-encoder
    "training.cmd_dense",  # ace train-dense
    "training.cmd_data",  # ace data phantoms | demo
    "training.cmd_eval",  # ace eval
    "training.cmd_index",  # ace index build | merge | add | remove | publish | rollback | list
    "training.cmd_serve",  # ace serve, ace demo
)
# Paths the user named that are missing, in the way or not allowed are user errors too.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
USER_ERRORS = (UserError, *PATH_ERRORS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ace", description="ACE anatomical correspondence")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """`ace index build` for the arguments of that command."""
    words = ["ace", args.command]
    sub = getattr(args, f"{args.command}_command", None)
    return " ".join([*words, sub] if sub else words)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"{command_name(args)}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
