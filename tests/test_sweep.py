"""The sweep entry point on the trained model (SmolLM2-135M-Instruct from the registry package): the shipped
two-point sweep over cpu-int4, with cpu-fp32 as the quality reference, run twice in one store. The first run
builds every point; the second reuses every step and only times the points again."""

import json

import mlflow
import pytest
import yaml

from hf2mlflow.config import Target, load_sweep
from tests.support import TRAINED_MODEL, local_store

# The trained model, two sweeps through `mlflow run` steps; they share conftest's `trained_sweep` with
# tests/test_trained_model.py.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained-model")]

MODEL, SWEEP = TRAINED_MODEL, "cpu-int4-small"
REGISTERED = f"{MODEL}-cpu-int4-sweep"


@pytest.fixture(scope="module")
def swept(trained_sweep):
    root, first, second, runs = (trained_sweep[k] for k in ("root", "first", "second", "runs"))
    with local_store(root) as uri:
        client = mlflow.MlflowClient()
        parents = [r for r in runs if r.data.tags.get("step") == "sweep"]
        alias = client.get_model_version_by_alias(REGISTERED, "fastest")
        artifacts = {}
        latest = max(parents, key=lambda r: r.info.start_time)
        for name in ("sweep.md", "sweep.json", "pareto.png", "pick_target.yaml"):
            artifacts[name] = mlflow.artifacts.download_artifacts(run_id=latest.info.run_id, artifact_path=name,
                                                                   dst_path=str(root / "artifacts"))
    return {"root": root, "uri": uri, "first": first, "second": second, "runs": runs, "parents": parents,
            "alias": alias, "artifacts": artifacts, "latest": latest}


def test_each_point_is_a_child_run_of_the_sweep_and_its_steps_are_the_points_children(swept):
    by_id = {r.info.run_id: r for r in swept["runs"]}
    assert len(swept["parents"]) == 2 and all(p.info.status == "FINISHED" for p in swept["parents"])
    for parent, result in zip(sorted(swept["parents"], key=lambda r: r.info.start_time),
                              (swept["first"], swept["second"]), strict=True):
        assert [p["label"] for p in result["points"]] == [
            "reference (cpu-fp32)", "base (cpu-int4)", "extra_bits_per_weight=0.3",
            "intra_op_num_threads=1"]
        for point in result["points"]:
            child = by_id[point["child_run_id"]]
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert child.data.tags["sweep.point"] == point["label"]
            for entry_point, run_id in point["runs"].items():
                step = by_id[run_id]
                assert step.info.status == "FINISHED" and step.data.tags["mlflow.project.entryPoint"] == entry_point
            assert child.data.metrics["decode_tokens_per_s"] > 0


def test_a_runtime_option_shares_the_base_conversion_and_a_builder_option_gets_its_own(swept):
    runs = {p["label"]: p["runs"] for p in swept["first"]["points"]}
    assert runs["intra_op_num_threads=1"]["convert_onnx"] == runs["base (cpu-int4)"]["convert_onnx"]
    assert runs["intra_op_num_threads=1"]["log_pyfunc"] != runs["base (cpu-int4)"]["log_pyfunc"]
    assert runs["extra_bits_per_weight=0.3"]["convert_onnx"] != runs["base (cpu-int4)"]["convert_onnx"]


def test_the_second_sweep_reuses_every_step_of_every_point(swept):
    assert not any(p["reused"] for p in swept["first"]["points"])
    assert all(p["reused"] for p in swept["second"]["points"])
    assert ([p["runs"] for p in swept["second"]["points"]] == [p["runs"] for p in swept["first"]["points"]])


def test_the_parent_logs_the_table_and_the_pareto_chart(swept):
    table = open(swept["artifacts"]["sweep.md"]).read()
    for point in swept["second"]["points"]:
        assert f"| {point['label']} |" in table or f"**{point['label']}** (pick)" in table
    assert "| point | decode tok/s (min-max) |" in table and swept["second"]["reason"] in table
    with open(swept["artifacts"]["pareto.png"], "rb") as chart:
        assert chart.read(8) == b"\x89PNG\r\n\x1a\n"
    recorded = json.load(open(swept["artifacts"]["sweep.json"]))
    assert recorded["pick"] == json.loads(json.dumps(swept["second"]["pick"]))
    assert any(p["pareto"] for p in recorded["points"])


def test_the_pick_is_the_fastest_point_within_the_bound_registered_under_the_alias(swept):
    result, bound = swept["second"], load_sweep(SWEEP).quality
    points = {p["key"]: p for p in result["points"]}
    pick = points[result["pick"]["key"]]
    reference = points["reference"]
    assert pick["key"] != "reference" and pick["within_bound"]
    assert pick["mean_kld"] <= bound.max_mean_kld and reference["mean_kld"] < 1e-3
    assert reference["top1_agreement"] >= 0.99 and 0 < pick["top1_agreement"] <= 1
    eligible = [p for p in result["points"] if p["within_bound"]]
    assert pick["decode_tokens_per_s"]["median"] == max(p["decode_tokens_per_s"]["median"] for p in eligible)
    assert result["pick"]["registered_model_uri"] == f"models:/{REGISTERED}@fastest"
    assert str(swept["alias"].version) == result["pick"]["version"] == pick["version_uri"].rsplit("/", 1)[1]
    assert swept["latest"].data.tags["sweep.pick"] == pick["label"]
    assert "the fastest of" in result["reason"] and "within the quality bound" in result["reason"]
    target = yaml.safe_load(open(swept["artifacts"]["pick_target.yaml"]))
    assert Target.model_validate(target).precision == "int4"


def test_the_picked_model_answers(swept):
    with local_store(swept["root"]):
        model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@fastest")
        (response,) = model.predict({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                     "max_tokens": 24})
    assert "Paris" in response["choices"][0]["message"]["content"]


def test_sweep_report_copies_the_runs_table_and_pick_out_of_the_store(swept, tmp_path):
    from benchmarks import sweep_report

    with local_store(swept["root"]):
        text = sweep_report.main(["--output_dir", str(tmp_path)])  # the newest FINISHED sweep run
    assert swept["latest"].info.run_id in text and swept["second"]["table"] in text
    assert f"**Pick:** {swept['second']['reason']}" in text
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
