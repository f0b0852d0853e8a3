"""evaluate's promotion gate: each model's figures against the gate config's thresholds, decided by MLflow's own
validation (`mlflow.validate_evaluation_results` with a `MetricThreshold` per check); a model that passes gets
the gate's alias on its registered version, one that fails a `gate` tag there that says why. The gate fails
closed: every check it names needs a finite figure, unless the gate waives that check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold

from hf2mlflow.config import GateConfig, GateThresholds
from hf2mlflow.contract import TRANSFORMERS_FLAVOR
from hf2mlflow.logged_models import REGISTERED, EvalModel
from hf2mlflow.thresholds import not_measured

# check -> (the figure it reads, whether greater is better)
CHECKS = {"min_tokenizer_agreement": ("tokenizer_agreement_rate", True), "max_mean_kld": ("mean_kld", False),
          "min_top1_agreement": ("top1_agreement", True),
          "min_parity_identical_rate": ("parity_identical_rate", True), "max_prompts_lost": ("prompts_lost", False)}
# The checks whose figures only evaluate's comparison with the source model (parity=true) measures.
PARITY_CHECKS = ("min_tokenizer_agreement", "max_mean_kld", "min_top1_agreement", "min_parity_identical_rate")
NOT_APPLICABLE = "not applicable: this model is the reference"


@dataclass
class Verdict:
    model: str
    passed: bool
    # model, check, figure, value, threshold, result: "passed", "failed", "failed: not measured (why)", "waived"
    # or NOT_APPLICABLE
    checks: list[dict]
    reasons: list[str]
    promoted: str = ""  # models:/name@alias where the alias was set
    waived: list[str] = field(default_factory=list)  # the gate's checks this model was not held to


def prompts_lost(summary: dict, reference: Optional[dict], metric: str, examples: int) -> Optional[float]:
    """How many more prompts the reference model answers right than this one (the metric's mean x prompts)."""
    if reference is None or metric not in summary or metric not in reference:
        return None
    return round((reference[metric] - summary[metric]) * examples, 6)


def unwaived_parity_checks(gate: GateConfig) -> list[str]:
    """The checks the gate names that need parity's figures and that it does not waive: evaluate with
    parity=false cannot pass them."""
    named = {"min_tokenizer_agreement"} | {check for thresholds in gate.precisions.values()
                                           for check, value in thresholds.model_dump().items() if value is not None}
    return [check for check in PARITY_CHECKS if check in named and check not in gate.waive]


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
        if check in gate.waive:
            checks.append({**row, "result": "waived"})
            continue
        # The transformers flavor is the reference the others' answers are counted against (its own count is 0
        # by construction); it is held to PyTorch by its other checks.
        if check == "max_prompts_lost" and model.flavor == TRANSFORMERS_FLAVOR:
            checks.append({**row, "value": None, "result": NOT_APPLICABLE})
            continue
        why = not_measured(value)
        if why:  # unmeasured is not passed: the gate fails closed
            if figure == "prompts_lost" and reference is None:
                why = "no reference model: evaluate a transformers-flavor model beside it"
            checks.append({**row, "result": f"failed: not measured ({why})"})
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
    failures = [f"{r['check']}: {r['figure']} {r['result'].removeprefix('failed: ')}"
                if r["result"].startswith("failed: ") else
                f"{r['check']}: {r['figure']} {r['value']:.4g} (threshold {r['threshold']:g})"
                for r in checks if r["result"].startswith("failed")]
    waived = [r["check"] for r in checks if r["result"] == "waived"]
    return Verdict(model.name, not failures, checks, failures, waived=waived)


def registered_version(uri: str, logged_by_run: str):
    """The registered model version of a logged model (by its URI, else by the run that logged it), or None."""
    client = mlflow.MlflowClient()
    registered = REGISTERED.match(uri)
    if registered and not registered.group(1).startswith("m-"):
        name, alias, number = registered.groups()
        if alias:  # read again now, it may name another version than the one evaluated
            raise ValueError(f"'{uri}': the gate takes a version, not an alias (logged_models.resolve turns an "
                             f"alias into the version it names)")
        try:
            return client.get_model_version(name, number)
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
    waived = f" (waived: {', '.join(verdict.waived)})" if verdict.waived else ""
    if verdict.passed:
        client.set_model_version_tag(version.name, version.version, "gate", f"passed {gate.name}{waived}")
        client.set_registered_model_alias(version.name, gate.alias, version.version)
        verdict.promoted = f"models:/{version.name}@{gate.alias}"
        return
    client.set_model_version_tag(version.name, version.version, "gate",
                                 f"failed {gate.name}{waived}: {'; '.join(verdict.reasons)}"[:5000])
    if gate.alias in (version.aliases or []):
        client.delete_registered_model_alias(version.name, gate.alias)


def reference_summary(models: list[EvalModel], summaries: list[dict]) -> Optional[dict]:
    """The summary of the first transformers-flavor model evaluated: the answers the other flavors are held to
    (`max_prompts_lost`; it does not apply to a transformers-flavor model)."""
    return next((s for m, s in zip(models, summaries) if m.flavor == TRANSFORMERS_FLAVOR), None)
