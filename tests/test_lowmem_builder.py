"""The low-memory builder path (hf2mlflow/convert/lowmem_builder.py) and the memory budget
(hf2mlflow/convert/memory_plan.py):
the same model as the standard builder's, and a conversion that cannot fit stops before it builds."""

import json

import mlflow
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from hf2mlflow.config import load_target
from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.errors import ConfigError
from hf2mlflow.convert.genai_builder import run_builder
from hf2mlflow.convert.memory_plan import GIB, MemoryBudgetError, checkpoint_size
from hf2mlflow.sources.tiny import tiny_model_path
from hf2mlflow.convert.validate import validate_genai_model
from tests.support import all_runs

# The builder computes these with torch's cos, which is not bitwise reproducible between processes here (about
# one run in three differs by up to 2e-4 at the far positions), whichever path runs it.
ROTARY_CACHES = ("cos_cache", "sin_cache")


def _graph(folder):
    model = onnx.load(str(folder / "model.onnx"))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = sorted(repr((n.op_type, n.name, list(n.input), list(n.output),
                         sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)))
                   for n in model.graph.node)
    return model, initializers, nodes


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cpu-int4", "cpu-int8"])
def test_low_memory_path_builds_the_standard_model(tmp_path, target):
    source, built = tiny_model_path("tiny-phi3"), {}
    for path in ("standard", "low"):
        out = tmp_path / path
        run_builder(source, out, tmp_path / f"cache-{path}", load_target(target), low_memory=path == "low")
        built[path] = out
    (standard, std_inits, std_nodes), (low, low_inits, low_nodes) = _graph(built["standard"]), _graph(built["low"])
    assert any(n.op_type == "MatMulNBits" for n in low.graph.node)
    assert not any(n.op_type == "MatMul" and n.input[1] in low_inits for n in low.graph.node)  # all quantized
    assert std_inits.keys() == low_inits.keys()
    for name, values in std_inits.items():
        assert values.dtype == low_inits[name].dtype, name
        if name in ROTARY_CACHES:
            np.testing.assert_allclose(values, low_inits[name], atol=1e-3)
        else:
            assert (values == low_inits[name]).all(), name
    assert std_nodes == low_nodes
    assert {(o.domain, o.version) for o in standard.opset_import} == {(o.domain, o.version) for o in low.opset_import}
    assert json.loads((built["standard"] / "genai_config.json").read_text()) == json.loads(
        (built["low"] / "genai_config.json").read_text())
    # And what a user sees: the same greedy answer.
    tokens = {path: validate_genai_model(out, max_new_tokens=24).new_tokens for path, out in built.items()}
    assert tokens["standard"] == tokens["low"] and len(tokens["low"]) > 0


def test_checkpoint_size_reads_the_safetensors_headers():
    from transformers import AutoModelForCausalLM

    folder = tiny_model_path("tiny-phi3")
    size = checkpoint_size(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert size.parameters == sum(p.numel() for p in model.parameters())
    assert size.stored_bytes == 4 * size.parameters  # tiny-phi3 is stored in float32


def test_a_conversion_over_budget_fails_before_building(tracking):
    with pytest.raises(MemoryBudgetError, match="more than the memory budget of 0.1 GiB"):
        convert(ConvertArgs(model="tiny-phi3", target="cpu-int4", memory_budget_gib=0.1))
    (run,) = all_runs(tracking)
    assert run.info.status == "FAILED" and "needs about" in run.data.tags["error"]
    assert "builder_peak_rss_bytes" not in run.data.metrics  # the builder never started


def test_auto_takes_the_low_memory_path_when_the_standard_would_not_fit(tracking, monkeypatch):
    import hf2mlflow.convert.memory_plan

    # tiny-phi3 fits either way: give the standard path an estimate over the budget, as Phi-3-mini's is here.
    estimate_of = hf2mlflow.convert.memory_plan.estimate
    monkeypatch.setattr(hf2mlflow.convert.memory_plan, "estimate", lambda size, precision: (
        40 * GIB, estimate_of(size, precision)[1]))
    run = mlflow.get_run(convert(ConvertArgs(model="tiny-phi3", target="cpu-int4", memory_budget_gib=24)))
    assert run.info.status == "FINISHED" and run.data.params["builder_path"] == "low"
    low = estimate_of(checkpoint_size(tiny_model_path("tiny-phi3")), "int4")[1]
    assert run.data.metrics["estimated_peak_rss_bytes"] == low
    assert run.data.metrics["memory_budget_bytes"] == 24 * GIB
    assert 1 <= run.data.metrics["validation_new_tokens"] <= 16


def test_bad_memory_options_start_no_run(tracking):
    with pytest.raises(ConfigError, match="builder_memory 'tiny' is not allowed; allowed: auto, standard, low"):
        convert(ConvertArgs(model="tiny-phi3", target="cpu-int4", builder_memory="tiny"))
    with pytest.raises(ConfigError, match="memory_budget_gib must be 0"):
        convert(ConvertArgs(model="tiny-phi3", target="cpu-int4", memory_budget_gib=-1))
    assert all_runs(tracking) == []
