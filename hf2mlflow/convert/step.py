"""The convert_onnx step: Hugging Face model -> ONNX model, tracked in MLflow.

Two routes: onnxruntime-genai's model builder (the default; an ONNX Runtime GenAI model) and optimum's ONNX
exporter (plain ONNX with a KV cache, served with onnxruntime) for architectures the builder does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path

import mlflow

from hf2mlflow.config import load_model, load_target
from hf2mlflow.contract import CONVERT_STEP, ONNX_ARTIFACT_PATH, TARGET_ARTIFACT, conversion_name, route_for_exporter
from hf2mlflow.convert.genai_builder import builder_version, check_architecture, run_builder
from hf2mlflow.runtime.manifest import build_manifest
from hf2mlflow.convert.memory_plan import GIB, check_options, checkpoint_size, plan
from hf2mlflow.sources.resolve import resolve_model, source_params, source_tags
from hf2mlflow.sources.tiny import home
from hf2mlflow.tracking import log_params_once, print_run_summary, step_run
from hf2mlflow.convert.validate import builder_candidate, check_genai_files, check_quality, \
    validate_genai_model, validate_optimum_model
from hf2mlflow.step_args import ConvertArgs

STEP = CONVERT_STEP


def convert(args: ConvertArgs) -> str:
    """Convert, validate and log; returns the run ID. Config errors raise before any run starts."""
    target = load_target(args.target).with_exporter(args.exporter)
    check_options(args.builder_memory, args.memory_budget_gib)
    spec = load_model(args.model).with_overrides(args.revision, args.trust_remote_code)
    route = route_for_exporter(target.exporter)
    output_name = args.output_name or conversion_name(spec.name, target.name, route)

    tags = {"model": spec.name, "target": target.name, "exporter": target.exporter,
            "artifact_format": route.artifact_format}
    params = dataclasses.asdict(args)
    with step_run(STEP, output_name, tags, params) as run:
        # The target as built, so later steps need not find its YAML file again (it may be a path of its own).
        mlflow.log_dict(target.model_dump(mode="json"), TARGET_ARTIFACT)
        if target.exporter == "optimum":
            _export_optimum_in_run(spec, target, args.cache_dir)
        else:
            _convert_in_run(spec, target, args.cache_dir, args.builder_memory, args.memory_budget_gib)
    print_run_summary(STEP, run, {"ONNX model": f"runs:/{run.info.run_id}/{ONNX_ARTIFACT_PATH}",
                                  "artifact location": f"{run.info.artifact_uri}/{ONNX_ARTIFACT_PATH}",
                                  "next": f"mlflow run . -e log_pyfunc -P convert_run_id={run.info.run_id}"})
    return run.info.run_id


def _convert_in_run(spec, target, cache_dir: str, builder_memory: str, memory_budget_gib: float) -> None:
    print(f"[{STEP}] 1/4 resolving model '{spec.name}' ({spec.source})")
    resolved = resolve_model(spec, cache_dir)
    mlflow.set_tags(source_tags(resolved))
    check_architecture(resolved.architecture, spec.name)
    memory = plan(checkpoint_size(resolved.path), target.precision, builder_memory, memory_budget_gib)
    log_params_once(memory.params())
    mlflow.log_metrics(memory.metrics())
    print(f"[{STEP}] memory: {memory.path} builder, estimated peak {memory.estimated_bytes / GIB:.1f} GiB "
          f"(standard {memory.standard_bytes / GIB:.1f}, low {memory.low_bytes / GIB:.1f}) within a budget of "
          f"{memory.budget_bytes / GIB:.1f} GiB")
    log_params_once({
        **source_params(resolved),
        "execution_provider": target.execution_provider,
        "precision": target.precision,
        "builder_version": builder_version(),
        **{f"builder_option.{k}": v for k, v in target.builder_options.model_dump(exclude_none=True).items()},
    })
    with _work_dir() as work:
        out = work / "onnx"
        reference = _source_in_pytorch(resolved.path, spec.trust_remote_code)
        node_bits = _choose_precision(resolved.path, target, reference(), spec.trust_remote_code, work,
                                      memory.path == "low") if target.precision_budget else None
        print(f"[{STEP}] 2/4 building {target.precision} ONNX for {target.execution_provider} "
              f"with onnxruntime-genai {builder_version()}")
        build = run_builder(resolved.path, out, work / "builder-cache", target, spec.trust_remote_code,
                            low_memory=memory.path == "low", node_bits=node_bits)
        mlflow.log_metrics({"conversion_seconds": build.seconds, "builder_peak_rss_bytes": build.peak_rss_bytes})
        print(f"[{STEP}] built in {build.seconds:.1f} s, builder peak RSS {build.peak_rss_bytes / 2**20:.0f} MiB")

        print(f"[{STEP}] 3/4 validating: graph and config, then load with the engine the model serves with "
              f"and generate")
        check_genai_files(out, target.execution_provider)
        skipped = generation_skipped(target.execution_provider)
        if skipped:
            # Without its device a model cannot generate; say so instead of pretending.
            mlflow.set_tag("validation", f"graph checked; generation skipped: {skipped}")
            print(f"[{STEP}] graph checked; generation skipped: {skipped}")
        else:
            candidate = builder_candidate(out, target.execution_provider,
                                          target.session_options.model_dump(exclude_none=True))
            # fp32 must reproduce PyTorch's greedy answer; quantized or fp16 weights may rightly part from it.
            check = validate_genai_model(out, source_dir=resolved.path, compare_greedy=target.precision == "fp32",
                                         candidate=candidate)
            _log_validation(check)
            mlflow.set_tag("validation", f"graph checked; generated on {target.execution_provider} through "
                                         f"{check.engine}")
            print(f"[{STEP}] generated on {target.execution_provider} through {check.engine}: {check.text[:80]!r}")
            _check_quality(candidate, resolved.path, target, spec.trust_remote_code, reference())

        genai_config = json.loads((out / "genai_config.json").read_text())
        _log_model_folder(out, genai_config["model"].get("context_length", ""))


def _source_in_pytorch(source_dir: Path, trust_remote_code: bool):
    """The source model in PyTorch float32, loaded when first asked for: the precision choice and the quality
    check read the same one."""
    @functools.cache
    def load():
        from hf2mlflow.parity import TorchModel

        return TorchModel.from_folder(source_dir, trust_remote_code)

    return load


def _choose_precision(source_dir: Path, target, reference, trust_remote_code: bool, work: Path,
                      low_memory: bool) -> Path:
    """The target's precision_budget spent where it keeps the most quality (hf2mlflow/convert/sensitivity.py);
    the node-bits file the builder takes."""
    from hf2mlflow.convert.sensitivity import SENSITIVITY_ARTIFACT, choose

    budget = target.precision_budget
    print(f"[{STEP}] precision: choosing the 8-bit matrices within {budget.describe()}, by "
          f"the KL divergence each saves on {budget.calibration_tokens} tokens of the calibration text")
    choice = choose(source_dir, target, reference, trust_remote_code, work, low_memory)
    log_params_once({f"precision_budget.{k}": v for k, v in budget.model_dump(exclude_none=True).items()})
    mlflow.log_metrics({f"precision.{k}": v for k, v in choice.summary.items()})
    measured = choice.table.get("measured", {})
    mlflow.set_tag("sensitivity_table", choice.source + (f" (measured {measured['date']} on {measured['machine']})"
                                                         if choice.source == "shipped with hf2mlflow" else ""))
    mlflow.log_dict(choice.artifact(), SENSITIVITY_ARTIFACT)
    summary = choice.summary
    print(f"[{STEP}] precision: {len(choice.upgraded)} of {summary['quantized_matrices']} matrices at 8 bits, "
          f"{summary['bits_per_weight']:.2f} bits per weight within {summary['budget_bits_per_weight']:.2f} "
          f"(sensitivity table {choice.source}; {SENSITIVITY_ARTIFACT} in the run)")
    path = work / "node-bits.json"
    path.write_text(json.dumps(choice.node_bits()))
    return path


def generation_skipped(execution_provider: str) -> str:
    """Why a model for this provider cannot generate here ('' where it can): cuda needs a GPU and
    onnxruntime-genai-cuda; dml and webgpu are never checked here."""
    if execution_provider == "cpu":
        return ""
    if execution_provider == "cuda":
        from hf2mlflow.cuda import genai_cuda_problem

        problem = genai_cuda_problem()
        return f"needs a cuda device: {problem}" if problem else ""
    return f"needs a {execution_provider} device"


def _export_optimum_in_run(spec, target, cache_dir: str) -> None:
    from transformers import AutoConfig

    from hf2mlflow.convert.optimum_export import TASK, optimum_versions, run_export
    from hf2mlflow.runtime.ort_chat import context_length

    print(f"[{STEP}] 1/4 resolving model '{spec.name}' ({spec.source})")
    resolved = resolve_model(spec, cache_dir)
    mlflow.set_tags(source_tags(resolved))
    versions = optimum_versions()
    log_params_once({
        **source_params(resolved),
        "execution_provider": target.execution_provider,
        "precision": target.precision,
        "export_task": TASK,
        **versions,
    })
    with _work_dir() as work:
        out = work / "onnx"
        print(f"[{STEP}] 2/4 exporting {target.precision} ONNX ({TASK}) with optimum {versions['optimum_version']} "
              f"/ optimum-onnx {versions['optimum_onnx_version']}")
        export = run_export(resolved.path, out, target.precision, spec.trust_remote_code)
        mlflow.log_metrics({"conversion_seconds": export.seconds, "export_peak_rss_bytes": export.peak_rss_bytes})
        print(f"[{STEP}] exported in {export.seconds:.1f} s, exporter peak RSS {export.peak_rss_bytes / 2**20:.0f} MiB")

        # The graph names no execution provider, so the CPU can check a model meant for a GPU as well.
        print(f"[{STEP}] 3/4 validating: load with onnxruntime (optimum's ORTModelForCausalLM, CPU) and generate")
        _log_validation(validate_optimum_model(out, resolved.path))
        from hf2mlflow.parity import OptimumModel

        _check_quality(OptimumModel(out), resolved.path, target, spec.trust_remote_code)
        _log_model_folder(out, context_length(AutoConfig.from_pretrained(out,
                                                                         trust_remote_code=spec.trust_remote_code)))


@contextlib.contextmanager
def _work_dir():
    """A scratch folder beside the built-in models (the same disk as the cache), removed afterwards."""
    root = home() / "work"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{STEP}-", dir=root) as work:
        yield Path(work)


def _log_validation(check) -> None:
    mlflow.log_dict(check.to_dict(), "validation.json")
    metrics = {"validation_seconds": check.seconds, "validation_new_tokens": len(check.new_tokens),
               "validation_tokenizer_match": float(check.tokenizer_matches_transformers),
               "validation_batch_rows": check.batch_rows}
    if check.genai_agrees is not None:
        metrics["validation_genai_agreement"] = float(check.genai_agrees)
    mlflow.log_metrics(metrics)
    print(f"[{STEP}] {check.engine}: tokenizer agrees with transformers; generated {len(check.new_tokens)} tokens: "
          f"{check.text!r}" + (" (the same greedy tokens as PyTorch)" if check.reference_tokens is not None else "")
          + (f"; the same answers alone and as rows of a batch of {check.batch_rows}" if check.batch_rows > 1 else "")
          + ("" if check.genai_agrees is None else "; onnxruntime-genai over the same files gives "
             + ("the same greedy tokens" if check.genai_agrees else "other greedy tokens (reported, not an error "
                                                                      "for a quantized model)")))


def _check_quality(candidate, source_dir: Path, target, trust_remote_code: bool, reference=None) -> None:
    from hf2mlflow.quality import SLICE_TOKENS

    print(f"[{STEP}] quality: teacher-forced against the source model in PyTorch float32 on the first "
          f"{SLICE_TOKENS} tokens of the held-out text")
    summary = check_quality(candidate, source_dir, target.quality_floor, trust_remote_code, reference)
    mlflow.log_metrics({f"quality.{k}": v for k, v in summary.items()})
    floor = target.quality_floor.model_dump(exclude_none=True)
    print(f"[{STEP}] quality: mean KLD {summary['mean_kld']:.4g}, 99th pct {summary['p99_kld']:.4g}, top-1 "
          f"agreement {summary['top1_agreement']:.1%}, perplexity {summary['perplexity']:.2f} (source "
          f"{summary['reference_perplexity']:.2f}) on {summary['positions']} positions; "
          + (f"floor {floor} kept" if floor else "the target states no floor"))


def _log_model_folder(out: Path, context_length) -> None:
    print(f"[{STEP}] 4/4 logging artifacts")
    manifest = build_manifest(out)
    mlflow.log_metric("artifact_bytes", manifest["total_bytes"])
    log_params_once({"context_length": context_length})
    mlflow.log_dict(manifest, "manifest.json")
    mlflow.log_artifacts(str(out), ONNX_ARTIFACT_PATH)
    shutil.rmtree(out, ignore_errors=True)
