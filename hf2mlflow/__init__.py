"""Shared code for the step scripts: configs, built-in tiny models, conversion, tracking."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = PROJECT_ROOT / "configs"
