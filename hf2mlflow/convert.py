"""The convert_onnx step: Hugging Face model -> ONNX Runtime GenAI model, tracked in MLflow."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from hf2mlflow.config import load_model, load_target
from hf2mlflow.errors import ConfigError
from hf2mlflow.genai_builder import builder_version, check_architecture, run_builder
from hf2mlflow.manifest import build_manifest
from hf2mlflow.sources import resolve_model, source_params
from hf2mlflow.tiny_models import home
from hf2mlflow.tracking import log_params_once, print_run_summary, step_run
from hf2mlflow.validate import check_genai_files, validate_genai_model

STEP = "convert_onnx"
ONNX_ARTIFACT_PATH = "onnx"


@dataclass
class ConvertArgs:
    model: str = field(default="tiny-phi3", metadata={
        "help": "configs/models name, model .yaml file, Hugging Face repo id or local model folder"})
    target: str = field(default="cpu-int4", metadata={"help": "configs/targets name or target .yaml file"})
    output_name: str = field(default="", metadata={"help": "run name; default MODEL-TARGET"})
    revision: str = field(default="", metadata={"help": "hub revision (branch, tag or commit); overrides the config"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow code shipped in the model repo to run; overrides the config"})
    cache_dir: str = field(default="", metadata={"help": "Hugging Face download cache; default HF_HOME"})


def convert(args: ConvertArgs) -> str:
    """Convert, validate and log; returns the run ID. Config errors raise before any run starts."""
    target = load_target(args.target)
    spec = load_model(args.model).with_overrides(args.revision, args.trust_remote_code)
    output_name = args.output_name or f"{spec.name}-{target.name}"

    tags = {"model": spec.name, "target": target.name, "artifact_format": "onnxruntime-genai"}
    params = {"model": args.model, "target": args.target, "output_name": args.output_name,
              "revision": args.revision, "trust_remote_code": args.trust_remote_code, "cache_dir": args.cache_dir}
    with step_run(STEP, output_name, tags, params) as run:
        _convert_in_run(spec, target, args.cache_dir)
    print_run_summary(STEP, run, {"ONNX model": f"runs:/{run.info.run_id}/{ONNX_ARTIFACT_PATH}",
                                  "artifact location": f"{run.info.artifact_uri}/{ONNX_ARTIFACT_PATH}",
                                  "next": f"mlflow run . -e log_pyfunc -P convert_run_id={run.info.run_id}"})
    return run.info.run_id


def _convert_in_run(spec, target, cache_dir: str) -> None:
    print(f"[{STEP}] 1/4 resolving model '{spec.name}' ({spec.source})")
    resolved = resolve_model(spec, cache_dir)
    check_architecture(resolved.architecture, spec.name)
    log_params_once({
        **source_params(resolved),
        "execution_provider": target.execution_provider,
        "precision": target.precision,
        "builder_version": builder_version(),
        **{f"builder_option.{k}": v for k, v in target.builder_options.model_dump(exclude_none=True).items()},
    })
    work_root = home() / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{STEP}-", dir=work_root) as work:
        out = Path(work) / "onnx"
        print(f"[{STEP}] 2/4 building {target.precision} ONNX for {target.execution_provider} "
              f"with onnxruntime-genai {builder_version()}")
        build = run_builder(resolved.path, out, Path(work) / "builder-cache", target, spec.trust_remote_code)
        mlflow.log_metrics({"conversion_seconds": build.seconds, "builder_peak_rss_bytes": build.peak_rss_bytes})
        print(f"[{STEP}] built in {build.seconds:.1f} s, builder peak RSS {build.peak_rss_bytes / 2**20:.0f} MiB")

        print(f"[{STEP}] 3/4 validating: graph and config, then load with onnxruntime-genai and generate")
        check_genai_files(out, target.execution_provider)
        if target.execution_provider == "cpu":
            check = validate_genai_model(out)
            mlflow.log_dict(check.to_dict(), "validation.json")
            mlflow.log_metrics({"validation_seconds": check.seconds,
                                "validation_new_tokens": len(check.new_tokens),
                                "validation_tokenizer_match": float(check.tokenizer_matches_transformers)})
            print(f"[{STEP}] generated {len(check.new_tokens)} tokens: {check.text!r}")
        else:
            # A cpu build of onnxruntime-genai cannot run cuda/dml/webgpu graphs; say so instead of pretending.
            mlflow.set_tag("validation", f"graph checked; generation skipped: needs a {target.execution_provider} device")
            print(f"[{STEP}] graph checked; generation skipped: a {target.execution_provider} model needs that device")

        print(f"[{STEP}] 4/4 logging artifacts")
        manifest = build_manifest(out)
        mlflow.log_metric("artifact_bytes", manifest["total_bytes"])
        genai_config = json.loads((out / "genai_config.json").read_text())
        log_params_once({"context_length": genai_config["model"].get("context_length", "")})
        mlflow.log_dict(manifest, "manifest.json")
        mlflow.log_artifacts(str(out), ONNX_ARTIFACT_PATH)
        shutil.rmtree(out, ignore_errors=True)
