"""evaluate: quality, conversion parity and speed of the tiny model's three logged forms, side by side."""

import json

import matplotlib.image
import mlflow
import pytest

from hf2mlflow.errors import ConfigError
from hf2mlflow.evaluate.step import EvaluateArgs, evaluate
from tests.support import all_runs, local_store

LIMIT = 4


@pytest.fixture(scope="module")
def evaluation(logged, logged_fp32, logged_transformers):
    """cpu-int4 and cpu-fp32 ONNX pyfuncs and the fp32 transformers model of tiny-phi3, evaluated in one run."""
    with local_store(logged["root"]):
        run_id = evaluate(EvaluateArgs(models=",".join([logged["uri"], logged_fp32, logged_transformers]),
                                       limit=LIMIT))
        yield mlflow.get_run(run_id)


NAMES = ["tiny-phi3-cpu-int4-onnx", "tiny-phi3-cpu-fp32-onnx", "tiny-phi3-cpu-fp32-transformers"]


def test_one_run_with_metrics_per_model(evaluation):
    assert evaluation.info.status == "FINISHED" and evaluation.data.tags["step"] == "evaluate"
    metrics, tags = evaluation.data.metrics, evaluation.data.tags
    for name in NAMES:
        assert tags[f"model.{name}.uri"].startswith("models:/")
        for key in ("exact_match", "rouge_l", "contains", "ttft_ms_p50", "decode_tokens_per_s", "latency_s_p50",
                    "latency_s_p95", "load_s", "peak_rss_mib", "size_mib", "parity_identical_rate", "mean_kld",
                    "p99_kld", "top1_agreement", "perplexity"):
            assert f"{name}.{key}" in metrics, f"{name}.{key}"
        assert metrics[f"{name}.decode_tokens_per_s"] > 0 and metrics[f"{name}.peak_rss_mib"] > 50
        assert metrics[f"{name}.latency_s_p95"] >= metrics[f"{name}.latency_s_p50"]


def test_fp32_onnx_and_transformers_agree_with_pytorch(evaluation):
    metrics = evaluation.data.metrics
    # Measured by running both models greedily on every prompt: fp32 ONNX reproduces PyTorch token for token.
    assert metrics["tiny-phi3-cpu-fp32-onnx.parity_identical_rate"] == 1.0
    assert metrics["tiny-phi3-cpu-fp32-onnx.parity_logits_max_abs_diff"] < 1e-3
    assert metrics["tiny-phi3-cpu-fp32-transformers.parity_identical_rate"] == 1.0
    assert "tiny-phi3-cpu-int4-onnx.parity_logits_max_abs_diff" not in metrics  # logits only for fp32/fp16
    # Through the served engine: alone and as rows of one batch, and beside onnxruntime-genai over the same files.
    for name in ("tiny-phi3-cpu-fp32-onnx", "tiny-phi3-cpu-int4-onnx"):
        assert metrics[f"{name}.batch_equals_alone_rate"] == 1.0 and metrics[f"{name}.genai_agreement_rate"] == 1.0
    assert metrics["tiny-phi3-cpu-fp32-onnx.parity_identical_rate_batched"] == 1.0
    assert "tiny-phi3-cpu-fp32-transformers.genai_agreement_rate" not in metrics
    # Teacher-forced on the held-out text: the fp32 models are the source model to float rounding; int4 is not.
    for name in ("tiny-phi3-cpu-fp32-onnx", "tiny-phi3-cpu-fp32-transformers"):
        assert metrics[f"{name}.mean_kld"] < 1e-3 and metrics[f"{name}.top1_agreement"] >= 0.99
    assert metrics["tiny-phi3-cpu-int4-onnx.mean_kld"] > 10 * max(metrics["tiny-phi3-cpu-fp32-onnx.mean_kld"], 1e-9)


def test_models_that_pass_the_gate_are_promoted(evaluation):
    """The default gate: each model's checks in a table, a metric and a tag per model, and the alias `champion` on
    the registered version of every model that passed (all three here: the tiny model's int4 keeps to its bound)."""
    run_id, metrics, tags = evaluation.info.run_id, evaluation.data.metrics, evaluation.data.tags
    checks = mlflow.load_table("gate_checks.json", run_ids=[run_id])
    # The transformers flavor is the reference the others' prompts_lost is counted against, not held to itself.
    reference = (checks["model"] == NAMES[2]) & (checks["check"] == "max_prompts_lost")
    assert set(checks["model"]) == set(NAMES) and set(checks[~reference]["result"]) == {"passed"}
    assert list(checks[reference]["result"]) == ["not applicable: this model is the reference"]
    int4 = checks[checks["model"] == NAMES[0]].set_index("check")
    assert int4.loc["max_mean_kld", "threshold"] == pytest.approx(0.3) and int4.loc["max_prompts_lost", "value"] <= 3
    assert int4.loc["min_tokenizer_agreement", "value"] == 1.0
    client = mlflow.MlflowClient()
    promoted = tags["promoted"].split(", ")
    assert len(promoted) == 3
    for name in NAMES:
        assert metrics[f"{name}.gate_passed"] == 1.0 and tags[f"gate.{name}"] == "passed"
        version = client.get_model_version_by_alias(name, "champion")
        assert f"models:/{name}@champion" in promoted
        assert version.tags["gate"] == "passed default" and version.tags["gate_run_id"] == run_id


def test_tables_chart_and_flags(evaluation):
    run_id = evaluation.info.run_id
    comparison = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                     artifact_path="comparison.json")).read())
    assert [row["model"] for row in comparison] == NAMES
    for row in comparison:  # the flag says why a model failed the gate; these all passed
        assert row["gate"] == "passed" and row["flag"] == ""
    table = mlflow.load_table("comparison_table.json", run_ids=[run_id])
    assert list(table["model"]) == NAMES
    prompts = mlflow.load_table("per_prompt_outputs.json", run_ids=[run_id])
    assert len(prompts) == LIMIT * len(NAMES)
    assert set(prompts.columns) >= {"model", "question", "reference", "answer", "rouge_l", "first_divergence"}
    chart = matplotlib.image.imread(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                                        artifact_path="speed_vs_quality.png"))
    assert chart.ndim == 3 and chart.shape[0] > 100 and chart.shape[1] > 100
    children = [r for r in all_runs(mlflow.get_tracking_uri())
                if r.data.tags.get("mlflow.parentRunId") == run_id]
    assert sorted(r.data.tags["model_uri"] for r in children) == sorted(
        evaluation.data.tags[f"model.{n}.uri"] for n in NAMES)


def write_dataset(tmp_path, lines, **config):
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "qa.yaml").write_text(json.dumps({"path": config.pop("path", "qa.jsonl"), **config}))
    return str(tmp_path / "qa.yaml")


GOOD = '{"messages": [{"role": "user", "content": "Capital of France?"}], "reference": "Paris"}'


@pytest.mark.parametrize("lines, config, expected", [
    ([GOOD, '{"reference": "Paris"}'], {}, "line 2: 'messages' is missing"),
    ([GOOD, '{"messages": [{"role": "user", "content": "Hi"}]}'], {}, "line 2: 'reference' must be a non-empty"),
    (['{"messages": [{"role": "robot", "content": "Hi"}], "reference": "x"}'], {}, "line 1: messages[0].role"),
    ([GOOD, "{not json"], {}, "line 2: not valid JSON"),
    ([GOOD.replace('"reference"', '"answer"')], {}, "unknown key(s) answer; allowed: id, messages, reference"),
    (["", "  "], {}, "has no examples"),
    ([GOOD], {"path": "../outside.jsonl"}, "points outside"),
    ([GOOD], {"metrics": ["bleu"]}, "key 'metrics.0'"),
])
def test_bad_dataset_fails_before_any_run(tracking, tmp_path, logged, lines, config, expected):
    with pytest.raises(ConfigError) as err:
        evaluate(EvaluateArgs(models=logged["uri"], dataset=write_dataset(tmp_path, lines, **config)))
    assert expected in str(err.value)
    assert all_runs(tracking) == []


def test_a_gate_without_parity_is_refused_before_any_model_is_read(tracking):
    # The store is empty: the refusal comes before the model is resolved, else this would say it does not load.
    with pytest.raises(ConfigError) as err:
        evaluate(EvaluateArgs(models="models:/tiny-phi3-cpu-int4-onnx@candidate", parity=False))
    message = str(err.value)
    assert "parity" in message and "gate 'default'" in message and "waive" in message
    assert "max_mean_kld" in message and "min_tokenizer_agreement" in message
    assert all_runs(tracking) == []


def test_the_version_evaluated_is_the_one_promoted_though_the_alias_moved_meanwhile(logged):
    """An alias is resolved to a version once, when evaluate reads its inputs; the gate promotes that version."""
    from hf2mlflow.config import GateConfig
    from hf2mlflow.evaluate.gate import Verdict, apply
    from hf2mlflow.logged_models import resolve

    name = "tiny-phi3-moved-alias"
    with local_store(logged["root"]):
        client = mlflow.MlflowClient()
        source = client.get_model_version_by_alias(*logged["uri"].removeprefix("models:/").split("@")).source
        a, b = mlflow.register_model(source, name), mlflow.register_model(source, name)
        client.set_registered_model_alias(name, "review", a.version)
        model = resolve(f"models:/{name}@review")
        assert model.uri == f"models:/{name}/{a.version}" and model.ref == f"models:/{name}@review"
        client.set_registered_model_alias(name, "review", b.version)  # moved while the model was evaluated
        verdict = Verdict(model.name, True, [], [])
        apply(verdict, model, GateConfig(name="test"), "run")
        assert verdict.promoted == f"models:/{name}@champion"
        assert client.get_model_version_by_alias(name, "champion").version == a.version
        assert client.get_model_version(name, a.version).tags["gate"] == "passed test"
        assert "gate" not in client.get_model_version(name, b.version).tags


def test_bad_models_fail_before_any_run(converted, shared_store):
    convert_run = converted("tiny-phi3", "cpu-int4")
    with local_store(shared_store["root"]) as uri:
        before = len(all_runs(uri))
        for models, expected in [
            (convert_run, f"run ID '{convert_run}' (convert_onnx run) holds no logged model"),
            ("models:/no-such-model@candidate", "'models:/no-such-model@candidate' does not load"),
            ("0" * 32, "no such run"),
            ("my-model", "neither a run ID"),
            (" , ", "at least one run ID or model URI"),
        ]:
            with pytest.raises(ConfigError) as err:
                evaluate(EvaluateArgs(models=models))
            assert expected in str(err.value)
        assert len(all_runs(uri)) == before  # no evaluate run was started
