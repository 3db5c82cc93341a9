"""The code base stays `ruff check` clean (configuration in ruff.toml)."""

import importlib.util
import subprocess
import sys

import pytest

from tests.procs import ROOT


def test_ruff_is_clean() -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in requirements-dev.txt)")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
