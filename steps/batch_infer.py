"""Entry point batch_infer: answer a JSONL/Parquet file or Spark table of chat requests with a logged model."""

import sys
from pathlib import Path

# Import the package of the project being run (also a `mlflow run <git-url>` clone), not another copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow.errors import run_step  # noqa: E402
from hf2mlflow.step_args import BatchInferArgs  # noqa: E402


def main(argv=None) -> dict:
    return run_step("batch_infer", BatchInferArgs, "hf2mlflow.batch.step:batch_infer", argv)


if __name__ == "__main__":
    main()
