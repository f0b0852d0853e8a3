"""Entry point log_transformers: a Hugging Face model -> registered transformers chat model (llm/v1/chat)."""

import sys
from pathlib import Path

# Import the package of the project being run (also a `mlflow run <git-url>` clone), not another copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow.errors import run_step  # noqa: E402
from hf2mlflow.step_args import LogTransformersArgs  # noqa: E402


def main(argv=None) -> str:
    return run_step("log_transformers", LogTransformersArgs,
                    "hf2mlflow.log_model.transformers_flavor:log_transformers", argv)


if __name__ == "__main__":
    main()
