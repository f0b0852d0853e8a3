"""The budget's allocation (hf2mlflow/convert/sensitivity.py): 8 bits go by KL divergence saved per extra byte,
each matrix only if it still fits, never to a matrix that saved nothing; and where a table comes from."""

import json
from importlib import resources

import pytest

from hf2mlflow.config import PrecisionBudget
from hf2mlflow.convert.sensitivity import SHIPPED_TABLES, allocate, cached_table, node_key

# 500 weights; every matrix at 4 bits stores 280 bytes: 4.48 bits per weight.
TABLE = {"base_mean_kld": 1.0, "fixed_bytes": 100, "fixed_params": 100, "matrices": [
    {"name": "a", "params": 100, "bytes_4bit": 60, "bytes_8bit": 110, "kld_saved": 0.5},   # 0.010 per byte
    {"name": "b", "params": 100, "bytes_4bit": 60, "bytes_8bit": 110, "kld_saved": 0.1},   # 0.002 per byte
    {"name": "c", "params": 100, "bytes_4bit": 30, "bytes_8bit": 55, "kld_saved": 0.3},    # 0.012 per byte
    {"name": "d", "params": 100, "bytes_4bit": 30, "bytes_8bit": 55, "kld_saved": -0.01},  # worse at 8 bits
]}


@pytest.mark.parametrize("budget, chosen, bits", [
    ({"extra_bits_per_weight": 0.8}, ["c"], 305 * 8 / 500),     # 330 bytes: a no longer fits after c
    ({"bits_per_weight": 6.0}, ["c", "a"], 355 * 8 / 500),      # 375 bytes: b would take 405
    ({"bits_per_weight": 8.0}, ["c", "a", "b"], 405 * 8 / 500),  # room for d too, but it saves nothing
    ({"extra_bits_per_weight": 0.0}, [], 280 * 8 / 500),        # a budget of 0
    ({"bits_per_weight": 4.0}, [], 280 * 8 / 500),              # below the 4-bit model: nothing, and it says so
])
def test_allocation_spends_the_budget_by_saving_per_byte(budget, chosen, bits):
    upgraded, summary = allocate(TABLE, PrecisionBudget(**budget))
    assert upgraded == chosen
    assert summary["bits_per_weight"] == pytest.approx(bits)
    assert summary["upgraded_matrices"] == len(chosen) and summary["quantized_matrices"] == 4
    saved = {m["name"]: m["kld_saved"] for m in TABLE["matrices"]}
    assert summary["calibration_mean_kld_forecast"] == pytest.approx(1.0 - sum(saved[n] for n in chosen))


def test_quantized_node_names_map_back_to_the_builders():
    assert node_key("/model/layers.3/mlp/down_proj/MatMul_Q4") == "/model/layers.3/mlp/down_proj/MatMul"
    assert node_key("/lm_head/MatMul_Q8") == "/lm_head/MatMul"


def test_a_table_comes_from_the_cache_then_the_package_then_a_measure(tmp_path):
    shipped = next(resources.files("hf2mlflow").joinpath(SHIPPED_TABLES).iterdir()).name.removesuffix(".json")

    def measure():
        made.append(1)
        return {"made": True}

    made = []
    table, source = cached_table(tmp_path, shipped, measure)
    assert source == "shipped with hf2mlflow" and table["measured"]["date"] and not made
    assert not (tmp_path / f"{shipped}.json").exists()  # the package's copy is read where it is
    (tmp_path / f"{shipped}.json").write_text(json.dumps({"mine": True}))
    assert cached_table(tmp_path, shipped, measure) == ({"mine": True}, "reused from the cache")
    assert cached_table(tmp_path, "0" * 32, measure) == ({"made": True}, "measured") and made == [1]
    assert json.loads((tmp_path / f"{'0' * 32}.json").read_text()) == {"made": True}
    assert cached_table(tmp_path, "0" * 32, measure) == ({"made": True}, "reused from the cache") and made == [1]
