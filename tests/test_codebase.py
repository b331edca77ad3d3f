"""The code stays readable in an afternoon: short functions and lines, no asserts as checks, test modules stand
alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = sorted((ROOT / "flowerfeat").rglob("*.py"))
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
MAX_LINES = 60  # a function a newcomer can hold in their head; split it past this


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _is_cli_command(node) -> bool:
    """typer commands: their signature is the option declarations, which do not count."""
    return any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "command" for d in node.decorator_list)


def test_every_function_is_under_sixty_lines():
    long = []
    for path in PACKAGE + SCRIPTS:
        for node in _functions(path):
            start = node.lineno
            if _is_cli_command(node):  # the body after the help text: the signature is option declarations
                start = node.body[1].lineno if isinstance(node.body[0], ast.Expr) else node.body[0].lineno
            lines = node.end_lineno - start + 1
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_package_lines_fit_the_configured_width():
    import tomllib

    width = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"]
    wide = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > width]  # fmt: skip
    assert not wide, wide


def test_no_assert_in_the_package():
    # asserts vanish under python -O: checks of input must raise
    found = [
        f"{p.name}:{n.lineno}" for p in PACKAGE for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Assert)
    ]
    assert not found, found


def test_no_test_module_imports_another():
    own = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    found = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[0] in own]
    assert not found, found
