"""The dependency direction of ARCHITECTURE.md, enforced by walking every module's imports.

ace_model never imports training, service or the web stack; faiss lives in the ace_model/index/
package only; service never imports training; training never imports service; the modules the
`ace` parser needs import no torch at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ace_model", "training", "service")
WEB_STACK = ("fastapi", "starlette", "uvicorn")
FORBIDDEN = {
    "ace_model": ("training", "service", *WEB_STACK),
    "training": ("service",),
    "service": ("training",),
}
FAISS_HOME = "ace_model/index/"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, path: Path) -> str:
    """Absolute module name of a (possibly relative) `from ... import` statement."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(resolve(node, path))
    return found


def top_level(module: str) -> str:
    return module.split(".")[0]


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_follow_the_dependency_direction(package: str) -> None:
    files = source_files(package)
    assert files, f"no Python files under {package}/"
    violations = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if top_level(module) in FORBIDDEN[package]
    ]
    assert not violations, "dependency direction broken:\n" + "\n".join(violations)


def test_faiss_is_imported_only_by_the_index_package() -> None:
    users = [
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in source_files(package)
        if any(top_level(m) == "faiss" for m in imported_modules(path))
    ]
    outside = [user for user in users if not user.startswith(FAISS_HOME)]
    assert users and not outside, f"faiss imported outside {FAISS_HOME}: {outside}"


def test_relative_imports_are_resolved() -> None:
    """The walker must see `from ..service import x` in ace_model/mod.py as an import of service."""
    tree = ast.parse("from ..service import app\nfrom . import geometry\nfrom .sub.deep import x\n")
    path = ROOT / "ace_model" / "mod.py"
    resolved = [resolve(node, path) for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert resolved == ["service", "ace_model", "ace_model.sub.deep"]
    init = ROOT / "ace_model" / "__init__.py"
    assert resolve(ast.parse("from .geometry import x").body[0], init) == "ace_model.geometry"  # type: ignore[arg-type]


# Modules that building the `ace` parser imports: none may import torch, timm or FAISS at module
# level (tests/test_cli.py checks the whole import graph in a fresh interpreter).
PARSER_MODULES = ("ace_model/errors.py", "ace_model/config.py", "ace_model/geometry.py",
                  "ace_model/index/__init__.py", "ace_model/index/params.py", "training/cli.py",
                  "training/cmd_options.py", "training/run_config.py", "training/dense_config.py",
                  "training/phantom_types.py", "training/landmarks.py",
                  *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "training").glob("cmd_*.py"))))
HEAVY = ("torch", "timm", "faiss")


def is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def module_level_imports(path: Path) -> set[str]:
    """Imports that run when the module is imported: not inside functions or `if TYPE_CHECKING:`."""
    found: set[str] = set()
    pending = list(ast.parse(path.read_text(), filename=str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(resolve(node, path))
        elif isinstance(node, ast.If) and not is_type_checking(node.test):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try | ast.With):
            pending += node.body
    return found


@pytest.mark.parametrize("relative", PARSER_MODULES)
def test_parser_modules_import_nothing_heavy_at_module_level(relative: str) -> None:
    heavy = sorted(m for m in module_level_imports(ROOT / relative) if top_level(m) in HEAVY)
    assert not heavy, f"{relative} imports {heavy} at module level; import it inside the command"


def test_tests_share_helpers_through_helper_modules_only() -> None:
    """A conftest holds fixtures and a test module holds tests: importing either couples tests."""
    coupled = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "tests").rglob("*.py")
        for module in imported_modules(path)
        if module.startswith("tests.") and module.rsplit(".", 1)[-1].startswith(("conftest", "test_"))
    }
    assert not coupled, sorted(coupled)
