"""Lint, format and type checks run with the test suite, so CI enforces them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["features", "training", "serving", "tests", "bench"]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def test_ruff_lint():
    out = subprocess.run(
        [_tool("ruff"), "check", *SOURCES], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format():
    out = subprocess.run(
        [_tool("ruff"), "format", "--check", *SOURCES], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_mypy(tmp_path):
    # mypy cannot follow the editable install's import hook, so give it the namespace layout
    # the wheel has: rapport/<package> links to the top-level folders.
    ns = tmp_path / "rapport"
    ns.mkdir()
    for package in ("features", "training", "serving"):
        (ns / package).symlink_to(ROOT / package)
    out = subprocess.run(
        [_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "-p", "rapport"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_imports_flow_one_way():
    assert not {
        m for m in _imports("features") if m.startswith(("rapport.training", "rapport.serving"))
    }
    assert not {m for m in _imports("training") if m.startswith("rapport.serving")}
