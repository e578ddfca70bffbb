"""The dependency direction of ARCHITECTURE.md, enforced by walking every module's imports.

ace_model never imports training, service or the web stack; faiss lives in ace_model/index.py
only; service never imports training; training never imports service.
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
FAISS_HOME = "ace_model/index.py"


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


def test_faiss_is_imported_only_by_the_index_module() -> None:
    users = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in source_files(package)
        if any(top_level(m) == "faiss" for m in imported_modules(path))
    ]
    assert users in ([], [FAISS_HOME]), f"faiss imported outside {FAISS_HOME}: {users}"


def test_relative_imports_are_resolved() -> None:
    """The walker must see `from ..service import x` in ace_model/mod.py as an import of service."""
    tree = ast.parse("from ..service import app\nfrom . import geometry\nfrom .sub.deep import x\n")
    path = ROOT / "ace_model" / "mod.py"
    resolved = [resolve(node, path) for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert resolved == ["service", "ace_model", "ace_model.sub.deep"]
    init = ROOT / "ace_model" / "__init__.py"
    assert resolve(ast.parse("from .geometry import x").body[0], init) == "ace_model.geometry"  # type: ignore[arg-type]
