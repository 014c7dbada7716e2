"""The checks every contributor runs: `make test` lints (ruff check, ruff format --check) before the tests and
stops on a lint error; pre-commit runs the same pinned ruff."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the environment running these tests, as the Makefile's VENV
needs_make = pytest.mark.skipif(
    shutil.which("make") is None or not (VENV / "bin" / "ruff").exists(), reason="needs make and ruff in this venv"
)


def _make(*args: str) -> subprocess.CompletedProcess:
    # -o: never (re)install from inside a test; the environment running the tests is the one to lint with.
    stamp = VENV / ".twigvlm-installed"
    return subprocess.run(
        ["make", "--no-print-directory", "-o", str(stamp), f"VENV={VENV}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_make
def test_make_test_lints_before_it_tests():
    lines = _make("-n", "test").stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if key in line) for key in ("ruff check", "ruff format --check")]
    tests = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert order[0] < tests and order[1] < tests


@needs_make
@pytest.mark.parametrize(
    "source,complaint",
    [
        ("import os\n", "F401"),  # ruff check: an unused import
        ("x=1\n", "would be reformatted"),  # ruff format --check: not formatted
    ],
)
def test_make_lint_fails_on_a_lint_error(tmp_path, source, complaint):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    run = _make("lint", f"LINT_PATHS={bad}")
    assert run.returncode != 0 and complaint in run.stdout + run.stderr
    bad.write_text('"""Clean."""\n\nx = 1\n')
    assert _make("lint", f"LINT_PATHS={bad}").returncode == 0


def test_pre_commit_runs_the_pinned_ruff():
    pinned = re.search(r"^ruff==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    hook = re.search(r"ruff-pre-commit\s+rev:\s*v(\S+)", (ROOT / ".pre-commit-config.yaml").read_text())
    extra = re.search(r'"ruff==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and hook and extra
    assert pinned.group(1) == hook.group(1) == extra.group(1)
