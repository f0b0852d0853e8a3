import contextlib
import os

import mlflow
import pytest

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="session", autouse=True)
def _offline_shared_home(tmp_path_factory):
    """No hub, and one cache of built-in models for the whole session (built once, in seconds)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF2MLFLOW_HOME", str(tmp_path_factory.mktemp("hf2mlflow-home")))
    os.environ.pop("MLFLOW_RUN_ID", None)
    yield


@contextlib.contextmanager
def local_store(root):
    """A local MLflow store in `root`, which is also the working directory (where artifacts land)."""
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
        mlflow.set_tracking_uri(old_uri)


@pytest.fixture
def tracking(tmp_path):
    """A fresh local MLflow store per test."""
    with local_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="session")
def logged(tmp_path_factory):
    """One conversion of tiny-phi3 to cpu-int4 and its registered chat pyfunc, shared by the session."""
    from hf2mlflow.convert import ConvertArgs, convert
    from hf2mlflow.log_pyfunc import LogPyfuncArgs, log_pyfunc

    root = tmp_path_factory.mktemp("pyfunc")
    with local_store(root) as uri:
        convert_run_id = convert(ConvertArgs(model="tiny-phi3", target="cpu-int4"))
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))
    return {"uri": model_uri, "convert_run_id": convert_run_id, "tracking_uri": uri, "root": root}


@pytest.fixture(scope="session")
def logged_transformers(logged):
    """tiny-phi3 logged with the transformers flavor (cpu fp32), registered in the same store as `logged`."""
    from hf2mlflow.log_transformers import LogTransformersArgs, log_transformers

    with local_store(logged["root"]):
        return log_transformers(LogTransformersArgs(model="tiny-phi3", target="cpu-fp32"))


def all_runs(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]



@pytest.fixture(scope="session")
def logged_fp32(logged):
    """tiny-phi3 converted to cpu-fp32 by the builder and its registered chat pyfunc, in the store of `logged`."""
    from hf2mlflow.convert import ConvertArgs, convert
    from hf2mlflow.log_pyfunc import LogPyfuncArgs, log_pyfunc

    with local_store(logged["root"]):
        return log_pyfunc(LogPyfuncArgs(convert_run_id=convert(ConvertArgs(model="tiny-phi3", target="cpu-fp32"))))


@pytest.fixture(scope="session")
def logged_optimum(logged):
    """tiny-gpt2 (an architecture the onnxruntime-genai builder does not support) exported with optimum to
    fp32 ONNX for the CPU and its registered chat pyfunc, in the store of `logged`."""
    from hf2mlflow.convert import ConvertArgs, convert
    from hf2mlflow.log_pyfunc import LogPyfuncArgs, log_pyfunc

    with local_store(logged["root"]):
        convert_run_id = convert(ConvertArgs(model="tiny-gpt2", target="cpu-fp32", exporter="optimum"))
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))
    return {**logged, "uri": model_uri, "convert_run_id": convert_run_id}
