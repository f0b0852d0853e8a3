"""Fixtures shared by the tests, and the tiers: tests under tests/unit/ are marked `unit` (pure logic: no model
built or loaded, no server, no subprocess), every other test `integration`. The helpers tests call are in
tests/support.py."""

import os
from pathlib import Path

import pytest

from tests.support import TRAINED_MODEL, free_port, local_store, process, store_uri, wait_for_http

UNIT_DIR = Path(__file__).resolve().parent / "unit"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers, and before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = "unit" if item.path.is_relative_to(UNIT_DIR) else "integration"
        item.add_marker(getattr(pytest.mark, tier))
        # pytest-xdist (--dist loadgroup) gives a group's tests to one worker: a file is a group of its own, so
        # its module fixtures are built once, unless the file names a group it shares session fixtures with.
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


def pytest_ignore_collect(collection_path, config):
    """`-m unit` alone does not import the integration modules at all (their imports take longer than the unit
    tests run); every test they hold is marked `integration`, so the same tests run either way."""
    if (config.getoption("markexpr") == "unit" and collection_path.name.startswith("test_")
            and not collection_path.is_relative_to(UNIT_DIR)):
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """No hub. Models come from the user's cache ($HF2MLFLOW_HOME, default ~/.cache/hf2mlflow), which the set-up
    command has filled: the trained model's package and its dequantized folder are fetched and built once per
    machine, not once per test session; built-in tiny models are built there on first use."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("MLFLOW_RUN_ID", None)
    yield


@pytest.fixture
def tracking(tmp_path):
    """A fresh local MLflow store per test."""
    with local_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """The session's MLflow store, where every shared model is converted, logged and registered once."""
    root = tmp_path_factory.mktemp("pyfunc")
    return {"root": root, "tracking_uri": store_uri(root)}


@pytest.fixture(scope="session")
def converted(shared_store):
    """converted(model, target): the run ID of that model's conversion to that target in the shared store, made
    by the first test that asks for it. Tests read these runs; one that needs its own store logs from them or
    makes a new experiment, not a new conversion."""
    from hf2mlflow.convert.step import ConvertArgs, convert

    runs = {}

    def get(model: str, target: str) -> str:
        if (model, target) not in runs:
            with local_store(shared_store["root"]):
                runs[model, target] = convert(ConvertArgs(model=model, target=target))
        return runs[model, target]

    return get


@pytest.fixture(scope="session")
def logged(shared_store, converted):
    """tiny-phi3 converted to cpu-int4 and its registered chat pyfunc, shared by the session."""
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    convert_run_id = converted("tiny-phi3", "cpu-int4")
    with local_store(shared_store["root"]):
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))
    return {**shared_store, "uri": model_uri, "convert_run_id": convert_run_id}


@pytest.fixture(scope="session")
def logged_transformers(logged):
    """tiny-phi3 logged with the transformers flavor (cpu fp32), registered in the same store as `logged`."""
    from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers

    with local_store(logged["root"]):
        return log_transformers(LogTransformersArgs(model="tiny-phi3", target="cpu-fp32"))


@pytest.fixture(scope="session")
def logged_fp32(logged, converted):
    """tiny-phi3 converted to cpu-fp32 by the builder and its registered chat pyfunc, in the store of `logged`."""
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    convert_run_id = converted("tiny-phi3", "cpu-fp32")
    with local_store(logged["root"]):
        return log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))


@pytest.fixture(scope="session")
def logged_optimum(logged):
    """tiny-gpt2 (an architecture the onnxruntime-genai builder does not support) exported with optimum to
    fp32 ONNX for the CPU and its registered chat pyfunc, in the store of `logged`."""
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    with local_store(logged["root"]):
        convert_run_id = convert(ConvertArgs(model="tiny-gpt2", target="cpu-fp32", exporter="optimum"))
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))
    return {**logged, "uri": model_uri, "convert_run_id": convert_run_id}


@pytest.fixture(scope="session")
def trained_sweep(tmp_path_factory):
    """The trained model's shipped two-point sweep (cpu-int4-small: the cpu-fp32 reference, the cpu-int4 base and
    two points over it) run twice in one store: the first run builds every point, the second reuses them all.
    tests/test_sweep.py checks the sweep; tests/test_trained_model.py takes its cpu-fp32 and cpu-int4
    conversions and models rather than converting the model again (both files are in the xdist group
    "trained-model", so one worker builds this)."""
    import mlflow

    from steps import sweep as sweep_step

    root = tmp_path_factory.mktemp("sweep")
    argv = ["--model", TRAINED_MODEL, "--sweep", "cpu-int4-small", "--eval_limit", "4"]
    with local_store(root) as uri:
        first = sweep_step.main(argv)
        second = sweep_step.main(argv)
        runs = mlflow.MlflowClient().search_runs(["0"], max_results=500)
    return {"root": root, "tracking_uri": uri, "first": first, "second": second, "runs": runs}


@pytest.fixture(scope="session")
def served_model(logged):
    """The `logged` pyfunc behind a real `mlflow models serve` on 127.0.0.1 (pickle deserialization off), one
    for the session: its /invocations URL and the server's process ID."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    command = ["mlflow", "models", "serve", "-m", logged["uri"], "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port), "-w", "1"]
    log = logged["root"] / "serve.log"
    with process(command, log, env=env) as proc:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log, seconds=180)
        yield f"http://127.0.0.1:{port}/invocations", proc.pid
