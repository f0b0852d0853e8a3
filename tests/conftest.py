import os

import mlflow
import pytest


@pytest.fixture(scope="session", autouse=True)
def _offline_shared_home(tmp_path_factory):
    """No hub, and one cache of built-in models for the whole session (built once, in seconds)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF2MLFLOW_HOME", str(tmp_path_factory.mktemp("hf2mlflow-home")))
    os.environ.pop("MLFLOW_RUN_ID", None)
    yield


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh local MLflow store per test; artifacts land under tmp_path too."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def all_runs(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
