"""What ships inside logged models, and only it: the pyfunc chat model, its engines, batching and schema.

Its modules import only each other, the standard library and the logged model's own requirements
(mlflow, numpy, and: onnxruntime, tokenizers and jinja2 for the builder's CPU models; onnxruntime-genai for its
GPU models; onnxruntime, optimum, transformers and torch for optimum exports), which
tests/unit/test_runtime_boundary.py checks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUNTIME_DIR = Path(__file__).resolve().parent


def runtime_code_path(work: Path) -> str:
    """A copy of this package as `hf2mlflow.runtime` under `work`, for a logged model's code_paths: the model
    imports hf2mlflow.runtime.* and nothing else of the project travels with it."""
    package = Path(work) / "code" / "hf2mlflow"
    if not package.exists():
        shutil.copytree(RUNTIME_DIR, package / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
        (package / "__init__.py").write_text('"""The runtime of a logged hf2mlflow model."""\n')
    return str(package)
