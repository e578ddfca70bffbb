"""The `ace` command: one error policy for every sub-command, no silently missing commands, and a
parser that imports no torch (so `ace --help` answers at once)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from ace_model import index as ix
from ace_model.errors import InputError, UserError
from training import cli
from training.cli import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "faiss")


def imported_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport sys\nprint('imported:', *(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout.splitlines()[-1].split()[1:]  # help text comes first


def test_building_the_parser_imports_no_torch() -> None:
    assert imported_after("from training.cli import build_parser\nbuild_parser()") == []


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"], ["index", "build", "--help"],
                                     ["eval", "--help"], ["train-dense", "--help"],
                                     ["data", "phantoms", "--help"], ["serve", "--help"]])
def test_help_imports_no_torch(command: list[str]) -> None:
    code = f"from training.cli import main\ntry:\n    main({command!r})\nexcept SystemExit:\n    pass"
    assert imported_after(code) == []


def test_every_subcommand_is_registered() -> None:
    parser = cli.build_parser()
    actions = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(actions.choices) == {"train", "export", "init-encoder", "train-dense", "data", "eval", "index",
                                    "serve", "demo"}
    index = next(a for a in actions.choices["index"]._actions if isinstance(a, argparse._SubParsersAction))
    assert set(index.choices) == {"build", "merge", "add", "remove", "publish", "rollback", "list"}


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "training.cmd_nonexistent"))
    with pytest.raises(ModuleNotFoundError, match="cmd_nonexistent"):
        cli.build_parser()


@pytest.mark.parametrize("error", [InputError("bad value\nsecond line"), FileNotFoundError("no such file x"),
                                   ix.IndexNotFoundError("no index"), UserError("fix it")])
def test_user_errors_are_one_line_and_exit_2(error: Exception, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(ix, "rollback", fail)
    assert main(["index", "rollback", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ace index rollback: ") and err.count("\n") == 1
    assert " ".join(str(error).split()) in err


def test_other_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(ix, "rollback", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["index", "rollback", "--root", str(tmp_path)])


def test_a_crash_exits_1_with_its_traceback(tmp_path: Path) -> None:
    code = ("import sys\nfrom ace_model import index\nfrom training.cli import main\n"
            "def crash(*a, **k):\n    raise RuntimeError('a bug')\n"
            f"index.rollback = crash\nsys.exit(main(['index', 'rollback', '--root', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


def test_command_names_in_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", "rollback", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("ace index rollback: nothing to roll back to")
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.startswith("ace export: checkpoint ")
    assert main(["data", "phantoms", "--n", "0", "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.startswith("ace data phantoms: need n >= 1")
