"""Entry point log_pyfunc: a convert_onnx run's model -> registered pyfunc chat model."""

import sys
from pathlib import Path

# Import the package of the project being run (also a `mlflow run <git-url>` clone), not another copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow.errors import run_step  # noqa: E402
from hf2mlflow.step_args import LogPyfuncArgs  # noqa: E402


def main(argv=None) -> str:
    return run_step("log_pyfunc", LogPyfuncArgs, "hf2mlflow.log_model.pyfunc:log_pyfunc", argv)


if __name__ == "__main__":
    main()
