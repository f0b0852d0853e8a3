"""evaluate's promotion gate: each model's figures against the gate config's thresholds, decided by MLflow's own
validation (`mlflow.validate_evaluation_results` with a `MetricThreshold` per check); a model that passes gets
the gate's alias on its registered version, one that fails a `gate` tag there that says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold

from hf2mlflow.config import GateConfig, GateThresholds
from hf2mlflow.contract import TRANSFORMERS_FLAVOR
from hf2mlflow.logged_models import REGISTERED, EvalModel

# check -> (the figure it reads, whether greater is better)
CHECKS = {"min_tokenizer_agreement": ("tokenizer_agreement_rate", True), "max_mean_kld": ("mean_kld", False),
          "min_top1_agreement": ("top1_agreement", True),
          "min_parity_identical_rate": ("parity_identical_rate", True), "max_prompts_lost": ("prompts_lost", False)}


@dataclass
class Verdict:
    model: str
    passed: bool
    checks: list[dict]  # model, check, figure, value, threshold, result ("passed", "failed", "not checked: why")
    reasons: list[str]
    promoted: str = ""  # models:/name@alias where the alias was set


def prompts_lost(summary: dict, reference: Optional[dict], metric: str, examples: int) -> Optional[float]:
    """How many more prompts the reference model answers right than this one (the metric's mean x prompts)."""
    if reference is None or metric not in summary or metric not in reference:
        return None
    return round((reference[metric] - summary[metric]) * examples, 6)


def judge(model: EvalModel, summary: dict, gate: GateConfig, reference: Optional[dict], metric: str,
          examples: int) -> Verdict:
    thresholds = gate.precisions.get(model.precision, GateThresholds()).model_dump()
    thresholds["min_tokenizer_agreement"] = gate.min_tokenizer_agreement
    figures = {**summary, "prompts_lost": prompts_lost(summary, reference, metric, examples)}
    checks, validated, values = [], {}, {}
    for check, (figure, greater_is_better) in CHECKS.items():
        threshold, value = thresholds.get(check), figures.get(figure)
        if threshold is None:
            continue
        row = {"model": model.name, "check": check, "figure": figure, "value": value, "threshold": threshold}
        if value is None or (isinstance(value, float) and math.isnan(value)):
            why = ("no reference model (a transformers-flavor model evaluated beside it)" if figure == "prompts_lost"
                   else "evaluate ran without parity")
            checks.append({**row, "result": f"not checked: {why}"})
            continue
        validated[figure] = MetricThreshold(threshold=threshold, greater_is_better=greater_is_better)
        values[figure] = float(value)
        checks.append(row)
    reasons = []
    try:
        mlflow.validate_evaluation_results(validated, mlflow.models.EvaluationResult(values, {}))
    except MlflowException as exc:  # ModelValidationFailedException: one line per failed metric
        reasons = [line.strip() for line in str(exc).splitlines() if "failed" in line and line.strip()]
    for row in checks:
        if "result" not in row:
            failed = any(f"Metric {row['figure']} " in reason for reason in reasons)
            row["result"] = "failed" if failed else "passed"
    failures = [f"{r['check']}: {r['figure']} {r['value']:.4g} (threshold {r['threshold']:g})"
                for r in checks if r["result"] == "failed"]
    return Verdict(model.name, not failures, checks, failures)


def registered_version(uri: str, logged_by_run: str):
    """The registered model version of a logged model (by its URI, else by the run that logged it), or None."""
    client = mlflow.MlflowClient()
    registered = REGISTERED.match(uri)
    if registered and not registered.group(1).startswith("m-"):
        name, alias, number = registered.groups()
        try:
            return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        except MlflowException:
            return None
    versions = client.search_model_versions(f"run_id = '{logged_by_run}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def apply(verdict: Verdict, model: EvalModel, gate: GateConfig, run_id: str) -> None:
    """Set the alias on a passing model's registered version; tag a failing one's with why (and take the alias
    off it if an earlier evaluation had set it)."""
    version = registered_version(model.uri, model.logged_by_run)
    if version is None:
        return
    client = mlflow.MlflowClient()
    client.set_model_version_tag(version.name, version.version, "gate_run_id", run_id)
    if verdict.passed:
        client.set_model_version_tag(version.name, version.version, "gate", f"passed {gate.name}")
        client.set_registered_model_alias(version.name, gate.alias, version.version)
        verdict.promoted = f"models:/{version.name}@{gate.alias}"
        return
    client.set_model_version_tag(version.name, version.version, "gate",
                                 f"failed {gate.name}: {'; '.join(verdict.reasons)}"[:5000])
    if gate.alias in (version.aliases or []):
        client.delete_registered_model_alias(version.name, gate.alias)


def reference_summary(models: list[EvalModel], summaries: list[dict]) -> Optional[dict]:
    """The summary of the first transformers-flavor model evaluated: the answers the others are held to."""
    return next((s for m, s in zip(models, summaries) if m.flavor == TRANSFORMERS_FLAVOR), None)
