"""Per-matrix precision under a size budget (hf2mlflow/convert/sensitivity.py), end to end on tiny-phi3: the
shipped cpu-int4 measures each matrix on the calibration text, logs the table, and the model it serves holds
exactly the matrices the budget chose at 8 bits; a budget of 0 reuses the table and loses quality."""

from pathlib import Path

import mlflow
import onnx
from onnx import helper

from hf2mlflow.convert.step import ConvertArgs, convert
from tests.support import local_store, write_target

OUTPUT_LAYER = "/lm_head/MatMul"


def graph_bits(run_id: str, folder: Path) -> dict:
    """MatMulNBits of the run's ONNX model: builder name -> (bits, accuracy level)."""
    onnx_dir = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(folder))
    bits = {}
    for node in onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            bits[node.name.rsplit("_Q", 1)[0]] = (attrs["bits"], attrs["accuracy_level"])
    return bits


def test_the_served_model_holds_the_matrices_the_budget_chose(converted, shared_store, tmp_path):
    run_id = converted("tiny-phi3", "cpu-int4")
    with local_store(shared_store["root"]):
        run = mlflow.get_run(run_id)
        table = mlflow.artifacts.load_dict(f"runs:/{run_id}/sensitivity.json")
        bits = graph_bits(run_id, tmp_path)
    chosen = {m["name"] for m in table["matrices"] if m["bits"] == 8}
    assert 0 < len(chosen) < len(table["matrices"]) == run.data.metrics["precision.quantized_matrices"]
    assert {name for name, (b, _) in bits.items() if b == 8} == chosen | {OUTPUT_LAYER}
    assert {level for _, level in bits.values()} == {4}  # the fast CPU path for 8-bit matrices
    assert all(m["kld_saved"] > 0 for m in table["matrices"] if m["name"] in chosen)
    metrics = run.data.metrics
    assert metrics["precision.bits_per_weight"] <= metrics["precision.budget_bits_per_weight"]
    assert run.data.params["precision_budget.extra_bits_per_weight"] == "0.8"


def test_a_budget_of_0_reuses_the_table_and_loses_quality(converted, shared_store, tmp_path):
    shipped = converted("tiny-phi3", "cpu-int4")
    target = write_target(tmp_path, """\
        execution_provider: cpu
        precision: int4
        builder_options:
          {algo_config: k_quant, block_size: 32, accuracy_level: 4, matmul_mixed_precision: "last_matmul:int8"}
        precision_budget: {extra_bits_per_weight: 0}
        """)
    with local_store(shared_store["root"]):
        zero = convert(ConvertArgs(model="tiny-phi3", target=target))
        runs = {name: mlflow.get_run(run_id) for name, run_id in (("shipped", shipped), ("zero", zero))}
        tables = {name: mlflow.artifacts.load_dict(f"runs:/{run_id}/sensitivity.json")
                  for name, run_id in (("shipped", shipped), ("zero", zero))}
        bits = graph_bits(zero, tmp_path)
    assert runs["zero"].data.tags["sensitivity_table"] == "reused from the cache"
    saved = {name: [m["kld_saved"] for m in table["matrices"]] for name, table in tables.items()}
    assert saved["zero"] == saved["shipped"]
    assert {name for name, (b, _) in bits.items() if b == 8} == {OUTPUT_LAYER}
    # The held-out text, which the choice never saw, scores the models.
    kld = {name: run.data.metrics["quality.mean_kld"] for name, run in runs.items()}
    assert kld["zero"] > kld["shipped"], kld
