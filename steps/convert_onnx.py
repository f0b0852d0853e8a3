"""Entry point convert_onnx: a Hugging Face causal LM -> ONNX for one target (onnxruntime-genai builder or optimum)."""

import sys
from pathlib import Path

# Import the package of the project being run (also a `mlflow run <git-url>` clone), not another copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow.errors import run_step  # noqa: E402
from hf2mlflow.step_args import ConvertArgs  # noqa: E402


def main(argv=None) -> str:
    return run_step("convert_onnx", ConvertArgs, "hf2mlflow.convert.step:convert", argv)


if __name__ == "__main__":
    main()
