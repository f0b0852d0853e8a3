"""Entry point main: the chained workflow (convert_onnx -> log_pyfunc, log_transformers -> evaluate), with reuse."""

import sys
from pathlib import Path

# Import the package of the project being run (also a `mlflow run <git-url>` clone), not another copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow.errors import run_step  # noqa: E402
from hf2mlflow.step_args import MainArgs  # noqa: E402


def main(argv=None) -> str:
    return run_step("main", MainArgs, "hf2mlflow.workflow.main:main", argv)


if __name__ == "__main__":
    main()
