"""The tree is lint-clean under the rules pyproject.toml's [tool.ruff] chooses."""

import subprocess
import sys

from hf2mlflow import PROJECT_ROOT


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
