"""Hugging Face chat models to tracked, evaluated, servable MLflow models.

Shared: config (typed configs), contract (what steps agree on), errors, tracking (step runs), parity,
logged_models. Steps: convert, log_model, evaluate, batch, workflow; sources feeds them; runtime ships inside
logged models; serve and databricks stand beside. Steps import shared modules, sources and runtime, never
each other.
"""

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
CONFIGS_DIR = PACKAGE_ROOT / "configs"
