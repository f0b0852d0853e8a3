"""evaluate's promotion gate, its decisions alone (hf2mlflow/evaluate/gate.py `judge`): figures in, checks out."""

import typing

import pytest

from hf2mlflow.config import GateConfig
from hf2mlflow.config import GateThresholds as T
from hf2mlflow.contract import TRANSFORMERS_FLAVOR
from hf2mlflow.evaluate.gate import CHECKS, PARITY_CHECKS, judge, unwaived_parity_checks
from hf2mlflow.logged_models import EvalModel

GATE = GateConfig(name="test", precisions={"int4": T(max_mean_kld=0.3, max_prompts_lost=2),
                                           "fp32": T(min_parity_identical_rate=0.9)})
GOOD = {"tokenizer_agreement_rate": 1.0, "mean_kld": 0.18, "contains": 0.6, "parity_identical_rate": 0.2}
REFERENCE = {"contains": 0.7}


def model(precision="int4"):
    return EvalModel("ref", "models:/m@candidate", "m", "onnx", precision, "run", source=None)


def results(verdict):
    return {c["check"]: c["result"] for c in verdict.checks}


def test_a_model_within_every_threshold_passes():
    verdict = judge(model(), GOOD, GATE, REFERENCE, "contains", 10)
    assert verdict.passed and not verdict.reasons
    assert results(verdict) == {"min_tokenizer_agreement": "passed", "max_mean_kld": "passed",
                                "max_prompts_lost": "passed"}  # 1 prompt lost of 2 allowed


def test_each_failed_check_is_named_with_its_figure_and_threshold():
    verdict = judge(model(), {**GOOD, "tokenizer_agreement_rate": 0.9, "mean_kld": 0.31, "contains": 0.4}, GATE,
                    REFERENCE, "contains", 10)
    assert not verdict.passed
    assert verdict.reasons == ["min_tokenizer_agreement: tokenizer_agreement_rate 0.9 (threshold 1)",
                               "max_mean_kld: mean_kld 0.31 (threshold 0.3)",
                               "max_prompts_lost: prompts_lost 3 (threshold 2)"]


def test_thresholds_follow_the_precision():
    fp32 = judge(model("fp32"), {**GOOD, "parity_identical_rate": 0.8}, GATE, None, "contains", 10)
    assert results(fp32) == {"min_tokenizer_agreement": "passed", "min_parity_identical_rate": "failed"}


@pytest.mark.parametrize("figure, value", [("mean_kld", float("nan")), ("mean_kld", float("inf")),
                                           ("mean_kld", None), ("tokenizer_agreement_rate", float("nan"))])
def test_a_figure_that_is_missing_or_not_finite_fails_its_check(figure, value):
    summary = {k: v for k, v in GOOD.items() if k != figure} if value is None else {**GOOD, figure: value}
    check = "max_mean_kld" if figure == "mean_kld" else "min_tokenizer_agreement"
    verdict = judge(model(), summary, GATE, REFERENCE, "contains", 10)
    assert not verdict.passed
    assert results(verdict)[check].startswith("failed: not measured (")
    assert [r for r in verdict.reasons if r.startswith(f"{check}: ")] == [
        f"{check}: {figure} not measured ({'missing' if value is None else f'not finite: {value}'})"]


def test_without_parity_every_parity_check_fails_as_not_measured():
    verdict = judge(model(), {"contains": 0.5}, GATE, REFERENCE, "contains", 10)
    assert not verdict.passed
    assert results(verdict) == {"min_tokenizer_agreement": "failed: not measured (missing)",
                                "max_mean_kld": "failed: not measured (missing)", "max_prompts_lost": "passed"}


def test_a_missing_reference_fails_prompts_lost():
    alone = judge(model(), GOOD, GATE, None, "contains", 10)  # no transformers model evaluated beside it
    assert not alone.passed
    assert results(alone)["max_prompts_lost"].startswith("failed: not measured (no reference model")
    assert alone.reasons[0].startswith("max_prompts_lost: prompts_lost not measured (no reference model")


def test_waived_checks_are_listed_as_waived_and_the_others_still_count():
    gate = GATE.model_copy(update={"waive": ["min_tokenizer_agreement", "max_mean_kld"]})
    verdict = judge(model(), {"contains": 0.6}, gate, REFERENCE, "contains", 10)
    assert verdict.passed and verdict.waived == ["min_tokenizer_agreement", "max_mean_kld"]
    assert results(verdict) == {"min_tokenizer_agreement": "waived", "max_mean_kld": "waived",
                                "max_prompts_lost": "passed"}
    lost = judge(model(), {"contains": 0.4}, gate, REFERENCE, "contains", 10)
    assert not lost.passed and results(lost)["max_prompts_lost"] == "failed"


def test_the_transformers_flavor_is_the_reference_and_is_held_to_pytorch():
    transformers = EvalModel("tf", "models:/m/1", "m", TRANSFORMERS_FLAVOR, "int4", "run", source=None)
    verdict = judge(transformers, GOOD, GATE, GOOD, "contains", 10)
    assert verdict.passed
    assert results(verdict)["max_prompts_lost"] == "not applicable: this model is the reference"
    no_kld = judge(transformers, {**GOOD, "mean_kld": float("nan")}, GATE, GOOD, "contains", 10)
    assert not no_kld.passed and results(no_kld)["max_mean_kld"] == "failed: not measured (not finite: nan)"


def test_a_gate_needs_parity_unless_it_waives_every_parity_check():
    assert unwaived_parity_checks(GATE) == ["min_tokenizer_agreement", "max_mean_kld", "min_parity_identical_rate"]
    partly = GATE.model_copy(update={"waive": ["min_tokenizer_agreement", "max_mean_kld"]})
    assert unwaived_parity_checks(partly) == ["min_parity_identical_rate"]
    waived = GATE.model_copy(update={"waive": ["min_tokenizer_agreement", "max_mean_kld", "min_top1_agreement",
                                               "min_parity_identical_rate"]})
    assert unwaived_parity_checks(waived) == []
    waivable = typing.get_args(GateConfig.model_fields["waive"].annotation)[0]
    assert set(typing.get_args(waivable)) == set(CHECKS) >= set(PARITY_CHECKS)
