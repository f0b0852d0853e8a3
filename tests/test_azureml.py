"""Tracking to an Azure ML workspace with our pins (mlflow 3.17, no azureml-mlflow plugin), emulated: a real
`mlflow server` under the workspace's path prefix, behind a small front that does what the workspace does that
MLflow's server does not: it refuses requests without a bearer token and answers 404 to MLflow 3's logged-models
API. The run's artifact root is an azureml:// URI, as a workspace's runs carry. Nothing here reaches Azure.

The front's answers are givens: the tests assert what our client sends (the front records every request) and what
it does with those answers, never the answers themselves."""

import contextlib
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from hf2mlflow.azureml import workspace_tracking_uri
from tests.support import free_port, process, wait_for_http

SUB, RG, WS = "00000000-0000-0000-0000-000000000000", "my-rg", "my-ws"
PREFIX = (f"/mlflow/v2.0/subscriptions/{SUB}/resourceGroups/{RG}"
          f"/providers/Microsoft.MachineLearningServices/workspaces/{WS}")
TOKEN = "eyJ0eXAiOiJKV1QifQ.eyJleHAiOjQxMDI0NDQ4MDB9.c2lnbmF0dXJl"  # the shape of `az account get-access-token`'s
API = f"{PREFIX}/api/2.0/mlflow"


class Request(NamedTuple):
    method: str
    path: str
    authorization: str | None
    body: dict


class WorkspaceFront(BaseHTTPRequestHandler):
    upstream = ""
    seen: list = []

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(Request(self.command, self.path, self.headers.get("Authorization"),
                                 json.loads(body) if body else {}))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, b'{"error": {"code": "Unauthorized"}}')
        if "/api/2.0/mlflow/logged-models" in self.path:  # azure-sdk-for-python issue 44896
            return self._reply(404, b'{"error": {"code": "NotFound"}}')
        request = urllib.request.Request(self.upstream + self.path, data=body or None, method=self.command,
                                         headers={"Content-Type": self.headers.get("Content-Type", "")})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                self._reply(response.status, response.read())
        except urllib.error.HTTPError as err:
            self._reply(err.code, err.read())

    def _reply(self, status, payload):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def front(upstream: str):
    handler = type("Front", (WorkspaceFront,), {"upstream": upstream, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The emulated workspace, and MLflow pointed at it with a token; one server for the file (it takes ~20 s to
    start)."""
    tmp_path = tmp_path_factory.mktemp("workspace")
    port = free_port()
    command = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-serve-artifacts",
               "--default-artifact-root", f"azureml://westeurope.api.azureml.ms{PREFIX}/artifacts",
               "--static-prefix", PREFIX, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "server.log"
    with process(command, log) as proc:
        wait_for_http(f"http://127.0.0.1:{port}{PREFIX}/health", proc, log)
        with front(f"http://127.0.0.1:{port}") as (host, seen), pytest.MonkeyPatch.context() as monkeypatch:
            uri = workspace_tracking_uri("westeurope", SUB, RG, WS, host=host)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
            monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            mlflow.set_tracking_uri(uri)
            try:
                yield uri, seen
            finally:
                while mlflow.active_run():
                    mlflow.end_run()
                mlflow.set_tracking_uri(None)


def test_runs_params_metrics_and_tags_log_through_mlflows_rest_client_with_a_bearer_token(workspace):
    uri, seen = workspace
    # An explicit experiment: mlflow.set_experiment would export MLFLOW_EXPERIMENT_ID to every later test.
    experiment = mlflow.MlflowClient(uri).create_experiment("hf2mlflow-azure")
    with mlflow.start_run(experiment_id=experiment, run_name="convert_onnx") as run:
        mlflow.log_params({"model": "smollm2-135m-instruct", "target": "cpu-int4"})
        mlflow.log_metrics({"decode_tokens_per_s": 148.5, "mean_kld": 0.179})
        mlflow.set_tags({"step": "convert_onnx", "cache_key": "abc123"})
    got = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"model": "smollm2-135m-instruct", "target": "cpu-int4"}
    assert got.data.metrics == {"decode_tokens_per_s": 148.5, "mean_kld": 0.179}
    assert got.data.tags["step"] == "convert_onnx" and got.data.tags["cache_key"] == "abc123"
    found = mlflow.search_runs(experiment_names=["hf2mlflow-azure"], filter_string="tags.step = 'convert_onnx'")
    assert list(found["run_id"]) == [run.info.run_id]

    # Every call went to the workspace's MLflow REST API, with the token as a bearer token.
    assert seen and all(request.path.startswith(f"{API}/") for request in seen), seen
    assert {request.authorization for request in seen} == {f"Bearer {TOKEN}"}


def test_without_the_plugin_artifacts_fail_and_a_model_is_sent_to_the_logged_models_api_whose_404_fails_it(
        workspace, tmp_path):
    uri, seen = workspace
    experiment = mlflow.MlflowClient(uri).create_experiment("hf2mlflow-azure-artifacts")
    with mlflow.start_run(experiment_id=experiment) as run:
        # Artifacts go to azureml:// storage, which only azureml-mlflow can write.
        assert run.info.artifact_uri.startswith("azureml://")
        (tmp_path / "note.txt").write_text("hello")
        with pytest.raises(MlflowException, match="Could not find a registered artifact repository for: azureml:"):
            mlflow.log_artifact(str(tmp_path / "note.txt"))
        before = len(seen)
        with pytest.raises(MlflowException):
            mlflow.initialize_logged_model(name="model")
        # One request, to the API a workspace does not serve; then no retry and no other route for the model.
        [request] = seen[before:]
    assert (request.method, request.path, request.authorization) == ("POST", f"{API}/logged-models",
                                                                      f"Bearer {TOKEN}")
    assert {k: request.body.get(k) for k in ("experiment_id", "source_run_id", "name")} == {
        "experiment_id": experiment, "source_run_id": run.info.run_id, "name": "model"}


def test_without_a_token_no_authorization_is_sent_and_the_401_fails_the_call(workspace, monkeypatch):
    uri, seen = workspace
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")  # this test's own monkeypatch: the token comes back after it
    before = len(seen)
    with pytest.raises(MlflowException):
        mlflow.MlflowClient(uri).search_experiments()
    [request] = seen[before:]
    assert (request.method, request.path, request.authorization) == ("POST", f"{API}/experiments/search", None)
