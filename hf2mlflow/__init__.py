"""Hugging Face chat models to tracked, evaluated, servable MLflow models.

Shared: config (typed configs), contract (what steps agree on), errors, tracking (step runs), parity,
logged_models. Steps: convert, log_model, evaluate, batch, workflow; sources feeds them; runtime ships inside
logged models; serve and databricks stand beside. Steps import shared modules, sources and runtime, never
each other.
"""

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
# The shipped configs sit at the project's top level (configs/, beside MLproject); a wheel carries them inside the
# package as hf2mlflow/configs (setup.py maps the one folder to the other).
CONFIGS_DIR = PROJECT_ROOT / "configs" if (PROJECT_ROOT / "MLproject").is_file() else PACKAGE_ROOT / "configs"
