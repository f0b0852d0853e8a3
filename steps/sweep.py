"""Entry point sweep: a grid of conversion and runtime options over one target, one child run per point; the
fastest point within a quality bound is registered under an alias."""

import sys
from pathlib import Path

# Import the package of the project being run (also a `mlflow run <git-url>` clone), not another copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow.errors import run_step  # noqa: E402
from hf2mlflow.step_args import SweepArgs  # noqa: E402


def main(argv=None) -> dict:
    return run_step("sweep", SweepArgs, "hf2mlflow.workflow.sweep:main", argv)


if __name__ == "__main__":
    main()
