"""evaluate's promotion gate, its decisions alone (hf2mlflow/evaluate/gate.py `judge`): figures in, checks out."""

from hf2mlflow.config import GateConfig
from hf2mlflow.config import GateThresholds as T
from hf2mlflow.evaluate.gate import judge
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


def test_thresholds_follow_the_precision_and_missing_figures_are_not_checked():
    fp32 = judge(model("fp32"), {**GOOD, "parity_identical_rate": 0.8}, GATE, None, "contains", 10)
    assert results(fp32) == {"min_tokenizer_agreement": "passed", "min_parity_identical_rate": "failed"}
    alone = judge(model(), GOOD, GATE, None, "contains", 10)  # no reference model evaluated beside it
    assert alone.passed and results(alone)["max_prompts_lost"].startswith("not checked: no reference model")
    no_parity = judge(model(), {"contains": 0.5}, GATE, REFERENCE, "contains", 10)
    assert no_parity.passed and results(no_parity)["max_mean_kld"] == "not checked: evaluate ran without parity"
