"""Every step's parameters, one dataclass per entry point (MLproject declares the same names and defaults), and
the parser the step scripts read them with.

Nothing here imports mlflow, torch or transformers: a step script parses (and answers `--help`) in a fraction
of a second, and imports its step only once the arguments are good.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field

from hf2mlflow.contract import CHAIN_ORDER

# What `mlflow run .` converts with no -P: a trained chat model that ships on the package registry, so the first run
# answers (the built-in tiny models have random weights; tests name them).
DEFAULT_MODEL = "smollm2-135m-instruct"
BATCH_FORMATS = ("a .jsonl file, a .parquet file or folder, or a Spark table name (name, schema.name, "
                 "catalog.schema.name)")


@dataclass
class ConvertArgs:
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "configs/models name, model .yaml file, Hugging Face repo id or local model folder"})
    target: str = field(default="cpu-int4", metadata={"help": "configs/targets name or target .yaml file"})
    output_name: str = field(default="", metadata={"help": "run name; default MODEL-TARGET"})
    revision: str = field(default="", metadata={"help": "hub revision (branch, tag or commit); overrides the config"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow code shipped in the model repo to run; overrides the config"})
    cache_dir: str = field(default="", metadata={"help": "Hugging Face download cache; default HF_HOME"})
    exporter: str = field(default="", metadata={
        "help": "genai-builder (onnxruntime-genai's model builder) or optimum (optimum's ONNX export, served with "
                "onnxruntime: architectures the builder does not support); default: the target's, else genai-builder"})
    builder_memory: str = field(default="auto", metadata={
        "help": "genai-builder path: standard (the builder as it is), low (checkpoint dtype, quantized node by "
                "node: a fraction of the memory, the same model), or auto (standard when its estimate fits the "
                "memory budget, else low)"})
    memory_budget_gib: float = field(default=0.0, metadata={
        "help": "memory the conversion may use, in GiB; 0: the memory available when it starts. A conversion "
                "whose estimate exceeds it stops before building, saying what it needs"})


@dataclass
class LogPyfuncArgs:
    convert_run_id: str = field(metadata={"help": "run ID of a FINISHED convert_onnx run"})
    target: str = field(default="", metadata={
        "help": "target config for generation defaults; default: the conversion's target (same provider/precision)"})
    registered_model_name: str = field(default="", metadata={
        "help": "Model Registry name; default MODEL-TARGET-onnx (MODEL-TARGET-optimum-onnx for optimum exports)"})
    alias: str = field(default="candidate", metadata={"help": "alias set on the new registered version"})
    interface: str = field(default="chat", metadata={
        "help": "chat: OpenAI chat-completions schema; prompt: the seed notebook's {prompt: string} -> string"})


@dataclass
class LogTransformersArgs:
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "configs/models name, model .yaml file, Hugging Face repo id or local model folder"})
    target: str = field(default="cpu-fp32", metadata={
        "help": "target config; its `transformers` section sets the device and dtype, `generation` the defaults"})
    registered_model_name: str = field(default="", metadata={
        "help": "Model Registry name; default MODEL-DEVICE-DTYPE-transformers"})
    alias: str = field(default="candidate", metadata={"help": "alias set on the new registered version"})
    save_pretrained: bool = field(default=True, metadata={
        "help": "true: copy the weights into the model (self-contained, servable offline); false: hub models only, "
                "log a reference to the hub checkpoint (small artifact, downloads the weights at load time)"})
    revision: str = field(default="", metadata={"help": "hub revision (branch, tag or commit); overrides the config"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow code shipped in the model repo to run; overrides the config"})
    cache_dir: str = field(default="", metadata={"help": "Hugging Face download cache; default HF_HOME"})


@dataclass
class EvaluateArgs:
    models: str = field(metadata={"help": "comma-separated run IDs (log_pyfunc / log_transformers runs) or model "
                                          "URIs (models:/name@alias, models:/name/version, runs:/id/model)"})
    dataset: str = field(default="capitals-and-facts", metadata={
        "help": "configs/datasets name or dataset .yaml file (JSONL of messages + reference)"})
    max_new_tokens: int = field(default=0, metadata={"help": "new tokens per answer; 0: the dataset's setting"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N examples; 0: all"})
    parity: bool = field(default=True, metadata={
        "help": "compare with the source Hugging Face model in PyTorch: greedy tokens, fp32/fp16 logits, and "
                "teacher-forced KL divergence, top-1 agreement and perplexity on the held-out text"})
    gate: str = field(default="default", metadata={
        "help": "promotion gate: configs/gates name or gate .yaml file; a model that passes gets its alias "
                "(champion), one that fails a `gate` tag saying why; empty: no gate"})


@dataclass
class BatchInferArgs:
    model: str = field(metadata={"help": "a log_pyfunc or log_transformers run ID, or a model URI "
                                         "(models:/name@alias, models:/name/version, runs:/id/model)"})
    input: str = field(metadata={"help": f"the requests: {BATCH_FORMATS}; rows carry messages and optionally id, "
                                         f"max_tokens, temperature (any chat request field)"})
    output: str = field(metadata={"help": "where the answers go: a new .parquet folder or a new Spark table name"})
    max_tokens: int = field(default=0, metadata={
        "help": "new tokens for rows without max_tokens; 0: the model's default"})
    partitions: int = field(default=0, metadata={
        "help": "Spark partitions to score in; 0: the session's default parallelism"})
    spark_master: str = field(default="", metadata={
        "help": "Spark master for a session this step starts (e.g. local[2]); empty: the running session "
                "(Databricks) or Spark's default (local[*])"})
    max_error_share: float = field(default=0.0, metadata={
        "help": "the share of rows that may fail (0 to 1); more failed rows fail the run, after the answers "
                "are written and the failed rows logged. 0: any failed row fails it"})


@dataclass
class MainArgs:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "as convert_onnx's model"})
    target: str = field(default="cpu-int4", metadata={"help": "hardware target of the ONNX model"})
    transformers_target: str = field(default="", metadata={
        "help": "target for log_transformers; default: `target` when it has a transformers section, else cpu-fp32"})
    dataset: str = field(default="capitals-and-facts", metadata={"help": "evaluation dataset config"})
    eval_limit: int = field(default=0, metadata={"help": "evaluate the first N examples only; 0: all"})
    force: bool = field(default=False, metadata={"help": "rerun every step, reusing nothing"})
    rerun_from: str = field(default="", metadata={
        "help": f"rerun this step and every step after it in the order {', '.join(CHAIN_ORDER)}; reuse the ones "
                "before"})


@dataclass
class SweepArgs:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "as convert_onnx's model"})
    sweep: str = field(default="cpu-int4-grid", metadata={
        "help": "configs/sweeps name or sweep .yaml file: the base target, the grid, the quality bound"})
    dataset: str = field(default="capitals-and-facts", metadata={"help": "evaluation dataset config"})
    eval_limit: int = field(default=0, metadata={"help": "evaluate the first N examples only; 0: all"})
    registered_model_name: str = field(default="", metadata={
        "help": "where every point's pyfunc is registered (alias point-KEY); default MODEL-BASE_TARGET-sweep"})
    alias: str = field(default="fastest", metadata={"help": "alias the picked point's version gets"})
    force: bool = field(default=False, metadata={"help": "rerun every step of every point, reusing nothing"})


_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # any case


def _bool(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"got {text} but expected one of yes/no, true/false, t/f, y/n, 1/0")


def step_parser(args_class, prog: str) -> argparse.ArgumentParser:
    """An argument per field: `--name` (and `--name-with-dashes`), typed by the field, required when it has no
    default; a bool takes true/false (MLproject passes one) or stands alone for true."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = {"str": str, "int": int, "float": float, "bool": _bool}
    for f in dataclasses.fields(args_class):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = {"dest": f.name, "type": hints[f.type], "help": f.metadata.get("help")}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if f.type == "bool":
            kwargs.update(nargs="?", const=True)
        parser.add_argument(*names, **kwargs)
    return parser


def parse_step_args(args_class, argv, prog: str):
    """The step's dataclass from argv. An argument it does not have (`mlflow run` passes a misspelled -P name on
    as one) is refused like a bad value, with the allowed ones."""
    parser = step_parser(args_class, prog)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        names = [f.name for f in dataclasses.fields(args_class)]
        flag = next((u for u in unknown if u.startswith("-")), "").lstrip("-").split("=")[0].replace("-", "_")
        hint = difflib.get_close_matches(flag, names, n=1)
        parser.error(f"unknown argument(s) {' '.join(unknown)}; allowed: {', '.join('--' + n for n in names)}"
                     + (f" (did you mean --{hint[0]}?)" if hint else ""))
    return args_class(**vars(namespace))
