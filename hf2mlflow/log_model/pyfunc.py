"""The log_pyfunc step: a conversion run's ONNX model -> registered pyfunc chat model."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from hf2mlflow.config import Generation, Target, load_target
from hf2mlflow.builder_graph import long_rope_threshold
from hf2mlflow.contract import (CONVERT_STEP, GENAI_PACKAGE, GENAI_ROUTE, LOG_PYFUNC_STEP, MANIFEST_ARTIFACT,
                                ONNX_ARTIFACT_PATH, ORT_PACKAGE, OPTIMUM_ROUTE, TARGET_ARTIFACT, TORCH_CPU_INDEX,
                                genai_version, onnx_registered_name, route_for_format)
from hf2mlflow.errors import ConfigError, StepError
from hf2mlflow.runtime import RUNTIME_DIR, runtime_code_path
from hf2mlflow.runtime.manifest import verify_manifest
from hf2mlflow.tracking import check_alias, print_model_summary, set_alias, step_run
from hf2mlflow.step_args import LogPyfuncArgs

STEP = LOG_PYFUNC_STEP
# The model is its runtime package: models-from-code, with only hf2mlflow/runtime as its code path.
MODEL_CODE = RUNTIME_DIR / "onnx_chat_pyfunc.py"
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16}
PROMPT_EXAMPLE = {"prompt": "What is the capital of France?"}


def requirements(execution_provider: str, artifact_format: str = GENAI_ROUTE.artifact_format) -> list[str]:
    """What inference needs. The builder's models: no torch, no transformers; on CPU, onnxruntime with the
    Hugging Face tokenizer and Jinja for the chat template (runtime/slot_chat.py), on GPUs onnxruntime-genai.
    Optimum exports: onnxruntime
    through optimum's ORTModelForCausalLM, which speaks torch tensors, and the Hugging Face tokenizer (pinned
    like log_transformers' requirements: no torch local label, the CPU wheel index for CPU targets)."""
    version = importlib.metadata.version
    if artifact_format == OPTIMUM_ROUTE.artifact_format:
        pins = [f"mlflow=={version('mlflow')}", f"optimum=={version('optimum')}",
                f"optimum-onnx=={version('optimum-onnx')}",
                f"{ORT_PACKAGE[execution_provider]}=={version('onnxruntime')}",
                f"transformers=={version('transformers')}", f"tokenizers=={version('tokenizers')}",
                f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}"]
        return ([TORCH_CPU_INDEX] if execution_provider == "cpu" else []) + pins
    if execution_provider == "cpu":
        return [f"mlflow=={version('mlflow')}", f"onnxruntime=={version('onnxruntime')}",
                f"tokenizers=={version('tokenizers')}", f"jinja2=={version('jinja2')}", f"numpy=={version('numpy')}"]
    runtime = GENAI_PACKAGE[execution_provider]
    # onnxruntime-genai-directml has no 0.15 release; 0.14.1 is its newest.
    runtime_version = "0.14.1" if execution_provider == "dml" else genai_version()
    return [f"mlflow=={version('mlflow')}", f"{runtime}=={runtime_version}", f"numpy=={version('numpy')}"]


def signature(interface: str, generation: Generation) -> ModelSignature:
    """The chat schema's, or the seed's `{"prompt": string} -> string`, whose generation settings may come as
    optional columns of a row or as MLflow params (defaulting to the target's; a row's own wins)."""
    if interface == "prompt":
        settings = [("max_tokens", "long", generation.max_new_tokens),
                    ("temperature", "double", generation.temperature), ("top_p", "double", generation.top_p),
                    ("top_k", "long", generation.top_k), ("seed", "long", -1)]
        inputs = Schema([ColSpec("string", "prompt"), *(ColSpec(kind, name, required=False)
                                                        for name, kind, _ in settings),
                         ColSpec(Array(DataType.string), "stop", required=False)])
        params = ParamSchema([*(ParamSpec(name, kind, default) for name, kind, default in settings),
                              ParamSpec("stop", "string", [], shape=(-1,))])
        return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string")]), params=params)
    return ModelSignature(inputs=CHAT_MODEL_INPUT_SCHEMA, outputs=CHAT_MODEL_OUTPUT_SCHEMA,
                          params=ParamSchema([ParamSpec("seed", "long", -1)]))


def _conversion_run(run_id: str):
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise StepError(f"convert_run_id '{run_id}': no such run at tracking URI {mlflow.get_tracking_uri()}; give "
                        f"the run ID of a FINISHED {CONVERT_STEP} run there") from None
    step = run.data.tags.get("step") or run.data.tags.get("mlflow.project.entryPoint") or "not a step run"
    if step != CONVERT_STEP:
        raise StepError(f"convert_run_id '{run_id}' is a {step} run, not a {CONVERT_STEP} run")
    if run.info.status != "FINISHED":
        raise StepError(f"convert_run_id '{run_id}' is a {CONVERT_STEP} run in status {run.info.status}; "
                        f"only FINISHED conversions can be logged")
    return run


def log_pyfunc(args: LogPyfuncArgs) -> str:
    """Log and register the pyfunc; returns the `models:/name@alias` URI."""
    if args.interface not in ("chat", "prompt"):
        raise ConfigError(f"interface '{args.interface}' is not allowed; allowed: chat, prompt")
    check_alias(args.alias)
    source = _conversion_run(args.convert_run_id)
    built = Target.model_validate(mlflow.artifacts.load_dict(f"runs:/{args.convert_run_id}/{TARGET_ARTIFACT}"))
    target = load_target(args.target) if args.target else built
    if (target.execution_provider, target.precision) != (built.execution_provider, built.precision):
        raise ConfigError(f"target '{target.name}' is {target.precision} on {target.execution_provider}, but run "
                          f"{args.convert_run_id} built {built.precision} for {built.execution_provider}; "
                          f"convert again for that target")
    model_name = source.data.tags["model"]
    route = route_for_format(source.data.tags.get("artifact_format"))
    artifact_format = route.artifact_format
    registered = args.registered_model_name or onnx_registered_name(model_name, built.name, route)

    with tempfile.TemporaryDirectory(prefix=f"{STEP}-") as work:
        print(f"[{STEP}] 1/2 downloading the ONNX model of run {args.convert_run_id}")
        onnx_dir = mlflow.artifacts.download_artifacts(run_id=args.convert_run_id, artifact_path=ONNX_ARTIFACT_PATH,
                                                       dst_path=work)
        manifest = mlflow.artifacts.download_artifacts(run_id=args.convert_run_id, artifact_path=MANIFEST_ARTIFACT,
                                                       dst_path=work)
        problems = verify_manifest(Path(onnx_dir), json.loads(Path(manifest).read_text()))
        if problems:
            raise StepError(f"run {args.convert_run_id}: artifacts do not match its manifest: {'; '.join(problems)}")

        tags = {"convert_run_id": args.convert_run_id, "model": model_name, "target": target.name,
                "interface": args.interface, "artifact_format": artifact_format}
        params = dataclasses.asdict(args)
        with step_run(STEP, f"{STEP}-{registered}", tags, params) as run:
            print(f"[{STEP}] 2/2 logging the pyfunc model (models-from-code) and registering '{registered}'")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"onnx": onnx_dir, "manifest": manifest},
                code_paths=[runtime_code_path(Path(work))],
                model_config={"model_name": model_name, "interface": args.interface,
                              "generation": target.generation.model_dump(), "batching": target.batching.model_dump(),
                              "session_options": target.session_options.model_dump(exclude_none=True),
                              "artifact_format": artifact_format,
                              "execution_provider": target.execution_provider,
                              "long_rope_threshold": (long_rope_threshold(Path(onnx_dir))
                                                      if route == GENAI_ROUTE else None)},
                signature=signature(args.interface, target.generation),
                input_example=PROMPT_EXAMPLE if args.interface == "prompt" else CHAT_EXAMPLE,
                pip_requirements=requirements(target.execution_provider, artifact_format),
                metadata={"source_run_id": args.convert_run_id, "model": model_name, "target": target.name,
                          "execution_provider": target.execution_provider, "precision": target.precision,
                          "artifact_format": artifact_format},
                registered_model_name=registered,
            )
            uri = set_alias(STEP, info, registered, args.alias)
    print_model_summary(STEP, run, info, uri)
    return uri
