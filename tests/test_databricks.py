"""`mlflow run -b databricks` end to end, offline: the real MLflow CLI against an emulated workspace
(tests/databricks_emulator.py: the REST calls MLflow's databricks backend makes, checked against the documented
shapes, and the submitted job run as a local process) and a real `mlflow server`. Both routes: the classic one
(this repository's MLproject, a shell command running `mlflow run` on the driver) and the databricks_spark_job
one (the project written by `python -m hf2mlflow.databricks.project`, a spark_python_task logging to `databricks`).
This proves what MLflow sends and that the project runs from what it uploads; it is not a cluster."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import mlflow
import pytest

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.databricks.project import python_libraries, write_spark_job_project
from tests.databricks_emulator import MLFLOW_BACKEND_KEYS, Workspace
from tests.support import copy_working_tree, tracking_server as mlflow_server

TOKEN = "dapi-emulated-token"
CPU_SPEC = PROJECT_ROOT / "configs" / "databricks" / "cpu.json"
STEP = ["-e", "convert_onnx", "-P", "model=tiny-phi3", "-P", "target=cpu-int4"]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    with mlflow_server(f"sqlite:///{root}/mlflow.db", root) as uri:
        yield uri


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """What a clone would hold, plus the uncommitted work under test (no .git, no local stores)."""
    work = tmp_path_factory.mktemp("project") / "hf2mlflow"
    return copy_working_tree(work)


def mlflow_run_databricks(project_uri, host, tracking_uri, experiment, *args, backend_config=str(CPU_SPEC)):
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, DATABRICKS_HOST=host, DATABRICKS_TOKEN=TOKEN)
    command = ["mlflow", "run", str(project_uri), "-b", "databricks", "--backend-config", backend_config,
               "--experiment-name", experiment, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def finished_job(workspace: Workspace, proc):
    """`mlflow run -b databricks` returns once the job is submitted; wait for the emulated job to end."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert workspace.problems == [], workspace.problems
    (run_id,) = workspace.runs
    job = workspace.wait(run_id, 300)
    assert job.result_state == "SUCCESS", workspace.driver_log(run_id)[-4000:]
    return job


def check_step_run(client, experiment: str, host: str, backend: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    tags = run.data.tags
    assert run.info.status == "FINISHED", tags.get("error")
    assert tags["step"] == "convert_onnx" and tags["mlflow.project.backend"] == backend
    assert tags["mlflow.databricks.runURL"].startswith(host) and tags["mlflow.databricks.webappURL"] == host
    assert run.data.metrics["conversion_seconds"] > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"onnx", "manifest.json", "validation.json"} <= names
    assert "model.onnx" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "onnx")}
    return run


def cluster_fields(new_cluster: dict) -> dict:
    return {k: v for k, v in new_cluster.items() if k not in MLFLOW_BACKEND_KEYS}


@pytest.mark.slow
def test_classic_route_uploads_the_project_and_runs_mlflow_on_the_driver(tmp_path, tracking_server, project):
    workspace = Workspace(tmp_path / "workspace", TOKEN)
    with workspace.serving() as host:
        proc = mlflow_run_databricks(project, host, tracking_server, "databricks-classic", *STEP,
                                     "--env-manager", "local")
        job = finished_job(workspace, proc)
    calls = [c for c in workspace.requests if c[1] != "/.well-known/databricks-config"]
    assert [c[1].split("/projects-code/")[0] for c in calls] == [
        "/api/2.0/dbfs/get-status", "/dbfs/mlflow-experiments/1", "/api/2.0/jobs/runs/submit",
        "/api/2.0/jobs/runs/get"]

    (tarball,) = workspace.uploads
    with tarfile.open(workspace.local_path(tarball)) as archive:
        members = set(archive.getnames())
    assert {"mlflow-project/MLproject", "mlflow-project/steps/convert_onnx.py",
            "mlflow-project/hf2mlflow/convert/step.py"} <= members

    request = job.request
    assert job.task == "shell_command_task" and request["libraries"] == [{"pypi": {"package": "mlflow==3.17.2"}}]
    assert cluster_fields(request["new_cluster"]) == json.loads(CPU_SPEC.read_text())
    task = request["shell_command_task"]
    assert task["env_vars"]["MLFLOW_TRACKING_URI"] == tracking_server
    script = task["command"][-1]
    assert "mlflow run /databricks/mlflow/projects/" in script and "--entry-point convert_onnx" in script
    assert "-P model=tiny-phi3 -P target=cpu-int4" in script

    # The driver's own `mlflow run` (local backend) attaches to the run and retags its backend.
    run = check_step_run(mlflow.MlflowClient(tracking_server), "databricks-classic", host, backend="local")
    assert run.data.tags["mlflow.databricks.shellJobRunID"] == str(job.run_id)


@pytest.mark.slow
def test_spark_job_route_for_current_runtimes(tmp_path, tracking_server, project):
    spark_project = write_spark_job_project(tmp_path / "databricks-project")
    # The workspace's tracking server keeps artifacts where the driver can write them (DBFS on Databricks): a
    # `databricks` tracking URI cannot resolve mlflow-artifacts:/ URIs, so the experiment gets a file location.
    client = mlflow.MlflowClient(tracking_server)
    client.create_experiment("databricks-spark-job", artifact_location=(tmp_path / "dbfs-artifacts").as_uri())
    workspace = Workspace(tmp_path / "workspace", TOKEN, tracking_server=tracking_server)
    with workspace.serving() as host:
        proc = mlflow_run_databricks(spark_project, host, "databricks", "databricks-spark-job", *STEP)
        job = finished_job(workspace, proc)

    request = job.request
    assert job.task == "spark_python_task"
    assert request["libraries"] == [{"pypi": {"package": p}} for p in python_libraries()]
    assert not any(p.startswith("pyspark") for p in python_libraries())
    assert cluster_fields(request["new_cluster"]) == json.loads(CPU_SPEC.read_text())
    assert set(job.ignored_cluster_fields) == MLFLOW_BACKEND_KEYS  # MLflow's options, sent on this route
    task = request["spark_python_task"]
    assert task["python_file"].startswith("dbfs:/mlflow-experiments/") and task["python_file"].endswith(".py")
    assert task["parameters"][:5] == ["convert_onnx", "--model", "tiny-phi3", "--target", "cpu-int4"]
    assert "''" in task["parameters"]  # empty values arrive shell-quoted; hf2mlflow/databricks/job.py unquotes

    run = check_step_run(client, "databricks-spark-job", host, backend="databricks")
    assert run.data.tags["mlflow.runName"] == "tiny-phi3-cpu-int4"  # output_name '' really arrived empty
    assert any(path == "/api/2.0/mlflow/runs/log-batch" for _, path in workspace.requests)  # logged via the workspace


def test_a_bad_cluster_spec_fails_with_the_field_named(tmp_path, tracking_server, project):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"node_type_id": "i3.xlarge", "num_workers": 1}))
    workspace = Workspace(tmp_path / "workspace", TOKEN)
    with workspace.serving() as host:
        proc = mlflow_run_databricks(project, host, tracking_server, "databricks-bad", *STEP,
                                     backend_config=str(spec))
    assert proc.returncode != 0 and "new_cluster.spark_version is required" in proc.stderr
    assert workspace.runs == {}
