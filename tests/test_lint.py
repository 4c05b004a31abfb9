"""The tree stays lint-clean, formatted and strictly typed (ruff check, ruff format, mypy --strict).

They run as tests so that the one test command (README, `.ci/run`) enforces them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_check() -> None:
    result = _run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    # pyproject.toml sets strict = true and the files to check.
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
