"""Run optimum's ONNX exporter in a subprocess: the route for architectures the onnxruntime-genai builder
does not know (GPT-2, ...).

It writes plain ONNX with a KV cache (model.onnx, config.json, generation_config.json and the tokenizer
files with the chat template) and no genai_config.json: onnxruntime-genai cannot load it, onnxruntime
through optimum's ORTModelForCausalLM can (hf2mlflow/runtime/ort_chat.py). Same subprocess reasons as the builder
(genai_builder.run_tool): its memory stays out of the step, its output streams, a kill becomes an error.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

from hf2mlflow.convert.genai_builder import BuilderError, BuildResult, run_tool

TASK = "text-generation-with-past"
REQUIRED_OUTPUTS = ("model.onnx", "config.json")


def optimum_versions() -> dict[str, str]:
    version = importlib.metadata.version
    return {"optimum_version": version("optimum"), "optimum_onnx_version": version("optimum-onnx"),
            "onnxruntime_version": version("onnxruntime")}


# The ONNX element type of the logits for each precision (onnx.TensorProto.FLOAT, FLOAT16).
LOGITS_TYPE = {"fp32": 1, "fp16": 10}


def export_command(source: Path, output: Path, precision: str, trust_remote_code: bool) -> list[str]:
    # `optimum-cli export onnx`, run as a module of this interpreter. Not `python -m optimum.exporters.onnx`:
    # in optimum-onnx 0.1.0 that entry point drops --dtype and always exports fp32.
    # Exported on the CPU for every target: fp32 and fp16 both export there (checked), and the graph names
    # no execution provider, so the model runs wherever onnxruntime has the provider.
    command = [sys.executable, "-u", "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(source),
               "--task", TASK, "--dtype", precision, "--device", "cpu", str(output)]
    return command + (["--trust-remote-code"] if trust_remote_code else [])


def check_precision(output: Path, precision: str) -> None:
    """The exported graph computes in `precision`: an exporter that ignores --dtype must not pass unnoticed."""
    import onnx

    graph = onnx.load(str(output / "model.onnx"), load_external_data=False).graph
    (logits,) = [o for o in graph.output if o.name == "logits"]
    got = logits.type.tensor_type.elem_type
    if got != LOGITS_TYPE[precision]:
        raise BuilderError(f"{output}/model.onnx: the exporter was asked for {precision}, but its logits are "
                           f"{onnx.TensorProto.DataType.Name(got)}")


def run_export(source: Path, output: Path, precision: str, trust_remote_code: bool = False,
               log=print) -> BuildResult:
    result = run_tool(export_command(source, output, precision, trust_remote_code), output, REQUIRED_OUTPUTS,
                      "the optimum exporter", "optimum", log)
    check_precision(output, precision)
    return result
