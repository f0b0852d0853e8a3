"""The evaluate step: quality, conversion parity and speed of logged chat models, side by side, in one run."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from hf2mlflow.config import load_gate
from hf2mlflow.datasets import Example, load_dataset
from hf2mlflow.logged_models import EvalModel, resolve_all
from hf2mlflow.measure import SERVED, measure_fresh
from hf2mlflow.quality import SUMMARY_KEYS
from hf2mlflow.errors import ConfigError, StepError
from hf2mlflow.runtime.manifest import folder_bytes
from hf2mlflow.evaluate.scoring import genai_scorers
from hf2mlflow.tracking import check_alias, print_run_summary, step_run
from hf2mlflow.step_args import EvaluateArgs

STEP = "evaluate"
SUMMARY_COLUMNS = ["model", "flavor", "precision", "exact_match", "rouge_l", "contains", "parity_identical_rate",
                   "mean_kld", "top1_agreement", "perplexity",
                   "ttft_ms_p50", "decode_tokens_per_s", "latency_s_p50", "latency_s_p95", "load_s",
                   "peak_rss_mib", "size_mib", "gate", "flag"]


def _measure(model_dir: Path, label: str, requests: list[dict]) -> dict:
    try:
        return measure_fresh(SERVED, str(model_dir), requests, label)
    except RuntimeError as exc:
        raise StepError(str(exc)) from None


def _reference(model: EvalModel, references: dict):
    """The source model in PyTorch float32, and where its teacher-forced logits are cached; loaded once per
    source."""
    from hf2mlflow.parity import TorchModel
    from hf2mlflow.quality import logits_cache
    from hf2mlflow.sources.resolve import resolve_model

    key = model.source.model_dump_json(exclude={"name", "description"})
    if key not in references:
        resolved = resolve_model(model.source)
        reference = TorchModel.from_folder(resolved.path, model.source.trust_remote_code)
        references[key] = (reference, logits_cache(resolved.path, reference))
    return references[key]


def _candidate(model: EvalModel, model_dir: Path):
    """The logged model as parity and the teacher-forced measure read it: through the engine it serves with (on
    CPU the pyfunc's own engine, loaded as `mlflow models serve` loads it), and onnxruntime-genai over the same
    files for the served engine's agreement with it (None where that is the engine itself, or not a builder
    model)."""
    from hf2mlflow.parity import GenAIModel, OptimumModel, ServedModel, TorchModel

    if model.flavor == "onnx":
        (genai_config,) = model_dir.rglob("genai_config.json")
        genai = GenAIModel(genai_config.parent)
        if model.execution_provider != "cpu":  # served by onnxruntime-genai itself
            return genai, None
        paths = list(sys.path)
        engine = mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model().engine
        # MLflow put the model's code/ folder first on sys.path. Its partial hf2mlflow package (the runtime alone)
        # would be what a process spawned later (the speed measure's) imports as hf2mlflow; this process already
        # runs the project's own.
        sys.path[:] = paths
        return ServedModel(engine), genai
    if model.flavor == "optimum-onnx":
        (graph,) = model_dir.rglob("model.onnx")
        return OptimumModel(graph.parent), None
    pipeline = mlflow.transformers.load_model(str(model_dir))
    return TorchModel(pipeline.model, pipeline.tokenizer), None


def _compare_with_source(model: EvalModel, model_dir: Path, examples: list[Example], max_new_tokens: int,
                         references: dict) -> tuple[list, dict]:
    """Greedy parity on the dataset's prompts (alone, and in full batches where the engine batches), and the
    teacher-forced measure on the held-out text."""
    from hf2mlflow.parity import compare
    from hf2mlflow.quality import EVALUATE_WINDOW, held_out_ids, teacher_forced

    reference, cache = _reference(model, references)
    candidate, genai = _candidate(model, model_dir)
    with_logits = model.precision in ("fp32", "fp16")
    results = compare(reference, candidate, [e.messages for e in examples], max_new_tokens, with_logits, genai)
    print(f"[{STEP}] {model.name}: teacher-forced against the source model on the held-out text")
    quality = teacher_forced(reference, candidate, held_out_ids(reference), EVALUATE_WINDOW,
                             cache=cache, bos=reference.bos_id)
    return results, quality


def _quality(model: EvalModel, examples: list[Example], answers: list[str], metrics: list[str]) -> pd.DataFrame:
    """Scores through mlflow.genai.evaluate (per-row assessments in a nested run), one column per metric."""
    data = [{"inputs": {"messages": e.messages}, "outputs": a, "expectations": {"expected_response": e.reference}}
            for e, a in zip(examples, answers)]
    with mlflow.start_run(run_name=f"{STEP}-{model.name}", nested=True):
        mlflow.set_tags({"step": f"{STEP}.quality", "model_uri": model.uri})
        result = mlflow.genai.evaluate(data=data, scorers=genai_scorers(metrics))
    frame = result.result_df
    return pd.DataFrame({m: frame[f"{m}/value"].astype(float).to_numpy() for m in metrics})


def _evaluate_model(model: EvalModel, examples, config, max_new_tokens, parity, references, work):
    model_dir = Path(mlflow.artifacts.download_artifacts(model.uri, dst_path=str(work / model.name)))
    requests = [{"messages": e.messages, "max_tokens": max_new_tokens} for e in examples]
    speed = _measure(model_dir, model.name, requests)
    rows = pd.DataFrame(speed["rows"])
    scores = _quality(model, examples, rows["answer"].tolist(), config.metrics)
    per_prompt = pd.concat([pd.DataFrame({"model": model.name, "id": [e.id for e in examples],
                                          "question": [e.messages[-1]["content"] for e in examples],
                                          "reference": [e.reference for e in examples]}), rows, scores], axis=1)
    summary = {
        "model": model.name, "flavor": model.flavor, "precision": model.precision, "uri": model.uri,
        **{m: float(scores[m].mean()) for m in config.metrics},
        "ttft_ms_p50": 1000 * float(rows["ttft_s"].median()),
        # hf2mlflow/measure.py's definitions; the median over prompts that decoded at least one token after the first
        "decode_tokens_per_s": float(rows["decode_tps"].median()) if rows["decode_tps"].notna().any() else 0.0,
        "latency_s_p50": float(np.percentile(rows["latency_s"], 50)),
        "latency_s_p95": float(np.percentile(rows["latency_s"], 95)),
        "load_s": speed["load_s"], "peak_rss_mib": speed["peak_rss_bytes"] / 2**20,
        "size_mib": folder_bytes(model_dir) / 2**20, "flag": "",
    }
    if parity:
        from hf2mlflow.parity import summarize

        print(f"[{STEP}] {model.name}: parity with the source model in PyTorch float32")
        results, quality = _compare_with_source(model, model_dir, examples, max_new_tokens, references)
        summary.update(summarize(results))
        summary.update({**{k: quality[k] for k in SUMMARY_KEYS}, "kld_positions": quality["positions"]})
        per_prompt["first_divergence"] = [r.first_divergence for r in results]
        per_prompt["tokenizer_agrees"] = [r.tokenizer_agrees for r in results]
    return summary, per_prompt


def _chart(table: pd.DataFrame, quality: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, row in table.iterrows():
        ax.scatter(row["decode_tokens_per_s"], row[quality], s=60)
        ax.annotate(row["model"], (row["decode_tokens_per_s"], row[quality]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")  # flavors and precisions differ by orders of magnitude in speed
    ax.set_xlabel("decode tokens/s, log scale (higher is faster)")
    ax.set_ylabel(f"{quality} (higher is better)")
    ax.set_title("Speed against quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(table: pd.DataFrame) -> None:
    columns = [c for c in SUMMARY_COLUMNS if c in table.columns]
    print(f"\n[{STEP}] summary")
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))


def _print_answers(prompts: pd.DataFrame, shown: int = 5) -> None:
    """The first answers of every model, so the numbers above come with what they measure."""
    print(f"\n[{STEP}] answers (first {shown} prompts; all in per_prompt_outputs.json)")
    for question_id in list(dict.fromkeys(prompts["id"]))[:shown]:
        rows = prompts[prompts["id"] == question_id]
        print(f"  {rows['question'].iloc[0]}  (reference: {rows['reference'].iloc[0]})")
        for _, row in rows.iterrows():
            answer = " ".join(str(row["answer"]).split())
            print(f"    {row['model']}: {answer[:120]}{'...' if len(answer) > 120 else ''}")


def _gate(gate, models, summaries, config, examples: int, run_id: str) -> list:
    """Judge every model by the gate, promote those that pass, and log the verdicts: a `gate_passed` metric and a
    `gate` tag per model, the `promoted` tag, and the table of checks."""
    from hf2mlflow.evaluate.gate import apply, judge, reference_summary

    reference = reference_summary(models, summaries)
    metric = "contains" if "contains" in config.metrics else config.metrics[0]
    verdicts = []
    for model, summary in zip(models, summaries):
        verdict = judge(model, summary, gate, reference, metric, examples)
        apply(verdict, model, gate, run_id)
        summary["gate"] = "passed" if verdict.passed else "failed"
        summary["flag"] = "; ".join(verdict.reasons)
        mlflow.log_metric(f"{model.name}.gate_passed", float(verdict.passed))
        mlflow.set_tag(f"gate.{model.name}", summary["gate"] + (f": {summary['flag']}" if verdict.reasons else ""))
        verdicts.append(verdict)
    mlflow.set_tag("promoted", ", ".join(v.promoted for v in verdicts if v.promoted) or "none")
    mlflow.log_table(pd.DataFrame([c for v in verdicts for c in v.checks]), "gate_checks.json")
    return verdicts


def _print_gate(verdicts: list) -> None:
    for verdict in verdicts:
        for check in verdict.checks:
            value = "" if check["value"] is None else f"{check['value']:.4g}"
            print(f"[{STEP}] gate {verdict.model}: {check['check']} {value} (threshold {check['threshold']:g}): "
                  f"{check['result']}")
        outcome = (f"promoted: {verdict.promoted}" if verdict.promoted else "passed (no registered version to alias)")
        print(f"[{STEP}] gate {verdict.model}: " + (outcome if verdict.passed else
                                                      f"NOT promoted: {'; '.join(verdict.reasons)}"))


def _refuse_gate_without_parity(gate, args: EvaluateArgs) -> None:
    """Without parity the gate's parity checks have no figures and would fail every model, so say so before any
    work, unless the gate waives them."""
    from hf2mlflow.evaluate.gate import unwaived_parity_checks

    unmeasured = [] if args.parity else unwaived_parity_checks(gate)
    if unmeasured:
        raise ConfigError(
            f"parity=false leaves gate '{gate.name}' without the figures of its checks {', '.join(unmeasured)}, so "
            f"no model could pass: run with parity=true, give gate='' (no gate), or use a gate that lists those "
            f"checks under `waive`")


def evaluate(args: EvaluateArgs) -> str:
    """Validate every input, then evaluate each model; returns the evaluation run ID."""
    if args.max_new_tokens < 0 or args.limit < 0:
        raise ConfigError("max_new_tokens and limit must be 0 (the default) or positive")
    config, examples = load_dataset(args.dataset)
    examples = examples[:args.limit] if args.limit else examples
    gate = None
    if args.gate:
        gate = load_gate(args.gate)
        check_alias(gate.alias)
        _refuse_gate_without_parity(gate, args)
    models = resolve_all(args.models)
    max_new_tokens = args.max_new_tokens or config.max_new_tokens
    # The local SQL store's connection pool cannot take mlflow.genai's default 10 threads exporting traces.
    os.environ.setdefault("MLFLOW_GENAI_EVAL_MAX_WORKERS", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")

    tags = {"dataset": config.name, **{f"model.{m.name}.uri": m.uri for m in models},
            **{f"model.{m.name}.run_id": m.logged_by_run for m in models}}
    params = dataclasses.asdict(args)
    with step_run(STEP, f"{STEP}-{config.name}", tags, params) as run:
        mlflow.log_params({"examples": len(examples), "effective_max_new_tokens": max_new_tokens})
        summaries, per_prompt, references = [], [], {}
        with tempfile.TemporaryDirectory(prefix=f"{STEP}-") as work:
            for i, model in enumerate(models, start=1):
                print(f"[{STEP}] {i}/{len(models)} {model.name} ({model.uri})")
                summary, rows = _evaluate_model(model, examples, config, max_new_tokens, args.parity, references,
                                                Path(work))
                summaries.append(summary)
                per_prompt.append(rows)
                mlflow.log_metrics({f"{model.name}.{k}": v for k, v in summary.items()
                                    if isinstance(v, float) and np.isfinite(v)})
        verdicts = _gate(gate, models, summaries, config, len(examples), run.info.run_id) if gate else []
        table = pd.DataFrame(summaries)
        prompts = pd.concat(per_prompt, ignore_index=True)
        with tempfile.TemporaryDirectory() as out:
            out = Path(out)
            table.to_csv(out / "comparison.csv", index=False)
            (out / "comparison.json").write_text(json.dumps(summaries, indent=2))
            _chart(table, "rouge_l" if "rouge_l" in table else config.metrics[0], out / "speed_vs_quality.png")
            mlflow.log_artifacts(str(out))
        mlflow.log_table(table, "comparison_table.json")
        mlflow.log_table(prompts, "per_prompt_outputs.json")
    _print_answers(prompts)
    _print_table(table)
    _print_gate(verdicts)
    print_run_summary(STEP, run, {"comparison": f"{run.info.artifact_uri}/comparison.csv",
                                  "chart": f"{run.info.artifact_uri}/speed_vs_quality.png"})
    return run.info.run_id
