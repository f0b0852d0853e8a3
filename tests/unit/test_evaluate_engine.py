"""evaluate reads a logged ONNX model through the engine its pyfunc serves with (hf2mlflow/evaluate/step.py
`_candidate`): the CPU engine on CPU, onnxruntime-genai itself on a GPU provider."""

import mlflow
import pytest

import hf2mlflow.parity
from hf2mlflow.evaluate.step import _candidate
from hf2mlflow.logged_models import EvalModel


class Opened:
    def __init__(self, folder):
        self.folder = folder


@pytest.mark.parametrize("provider", ["cuda", "dml", "webgpu"])
def test_a_gpu_model_is_read_through_onnxruntime_genai_not_the_cpu_engine(provider, tmp_path, monkeypatch):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "genai_config.json").write_text("{}")
    logged = mlflow.models.Model()  # as log_pyfunc writes it
    mlflow.pyfunc.add_to_model(logged, loader_module="unused", model_config={"execution_provider": provider})
    logged.save(str(tmp_path / "MLmodel"))
    monkeypatch.setattr(hf2mlflow.parity, "GenAIModel", Opened)

    def cpu_engine(*args, **kwargs):
        raise AssertionError("the CPU engine was loaded for a GPU model")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", cpu_engine)
    model = EvalModel("ref", "models:/m/1", "m", "onnx", "int4", "run", source=None, execution_provider=provider)
    candidate, genai = _candidate(model, tmp_path)
    assert isinstance(candidate, Opened) and candidate.folder == tmp_path / "onnx" and genai is None


def test_loading_the_cpu_engine_leaves_sys_path_as_it_was(tmp_path, monkeypatch):
    """MLflow puts a loaded model's code/ folder first on sys.path; its partial hf2mlflow package must not be what
    the speed measure's spawned process imports."""
    import sys
    from types import SimpleNamespace

    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "genai_config.json").write_text("{}")
    monkeypatch.setattr(hf2mlflow.parity, "GenAIModel", Opened)
    monkeypatch.setattr(hf2mlflow.parity, "ServedModel", Opened)

    def load_model(path):
        sys.path.insert(0, str(tmp_path / "code"))  # as MLflow's loader does
        return SimpleNamespace(unwrap_python_model=lambda: SimpleNamespace(engine="engine"))

    monkeypatch.setattr(mlflow.pyfunc, "load_model", load_model)
    before = list(sys.path)
    model = EvalModel("ref", "models:/m/1", "m", "onnx", "int4", "run", source=None)
    candidate, genai = _candidate(model, tmp_path)
    assert candidate.folder == "engine" and isinstance(genai, Opened)
    assert sys.path == before
