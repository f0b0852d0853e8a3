"""Reliability and security: a step killed, or cut off from its tracking server, is never reused, and no secret
from the environment lands in a run.
(Any request gets an answer or a clear refusal: tests/unit/test_chat_schema.py.)"""

import contextlib
import os
import signal
import subprocess

import mlflow
import psutil
import pytest

from hf2mlflow import PROJECT_ROOT
from tests.support import all_runs, free_port, tracking_server, wait_for_output

pytestmark = pytest.mark.slow  # three chains through `mlflow run`, one waiting out the retries

SECRETS = {"HF_TOKEN": "hf_SentinelHuggingFaceToken0123456789",
           "DATABRICKS_TOKEN": "dapiSentinelDatabricksToken0123456789",
           "HUGGING_FACE_HUB_TOKEN": "hf_SentinelHubToken0123456789"}


def _texts_of_every_run(uri: str, tmp_path) -> str:
    """Params, tags, metric names and every artifact of every run, and the registry's versions, as text."""
    client, texts = mlflow.MlflowClient(uri), []
    for run in all_runs(uri):
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()] + list(run.data.metrics)
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id),
                                                    tracking_uri=uri)
        for root, _, files in os.walk(local):
            texts += [open(os.path.join(root, f), "rb").read().decode("utf-8", "replace") for f in files]
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            texts += [str(version.tags), version.source or "", version.description or ""]
    return "\n".join(texts)


def _kill_tree(proc) -> None:
    """main, its step and the builder, as a machine going away would (MLflow starts each step in a session of
    its own, so the whole tree, not one process group)."""
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_interrupted_chains_are_never_reused_and_no_secret_lands_in_a_run(tmp_path):
    """`main` interrupted twice while converting, against a tracking server: killed with its steps, then cut off
    from the server for longer than its retries (it gives up, naming the server). Each conversion run stays
    RUNNING and is never reused; the rerun completes the chain. All ran with tokens in the environment: no run,
    artifact, registered version or output holds one."""
    port, backend = free_port(), f"sqlite:///{tmp_path}/server.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", HF_HUB_OFFLINE="1",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", **SECRETS)
    command = ["mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local", "-P", "model=tiny-phi3",
               "-P", "target=cpu-int4", "-P", "eval_limit=1"]
    killed_log, cut_off_log = tmp_path / "killed.log", tmp_path / "cut-off.log"
    with tracking_server(backend, tmp_path, port):
        with open(killed_log, "w") as log:
            killed = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            wait_for_output(killed, killed_log, "[builder]")
            _kill_tree(killed)
        cut_off_out = open(cut_off_log, "w")
        cut_off = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=cut_off_out, stderr=subprocess.STDOUT)
        wait_for_output(cut_off, cut_off_log, "[builder]")
    # The server is down now, and stays down until main gives up.
    assert cut_off.wait(timeout=300) != 0
    cut_off_out.close()
    assert f"[convert_onnx] FAILED: cannot reach the tracking server at http://127.0.0.1:{port}" in (
        cut_off_log.read_text()), cut_off_log.read_text()[-3000:]

    with tracking_server(backend, tmp_path, port) as uri:
        interrupted = [r for r in all_runs(uri) if r.data.tags.get("step") == "convert_onnx"]
        assert [r.info.status for r in interrupted] == ["RUNNING", "RUNNING"]
        assert "artifact_bytes" not in interrupted[0].data.metrics
        rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "convert_onnx: running" in rerun.stdout and "reusing" not in rerun.stdout
        converted = [r for r in all_runs(uri) if r.data.tags.get("step") == "convert_onnx"]
        assert sorted(r.info.status for r in converted) == ["FINISHED", "RUNNING", "RUNNING"]
        assert len({r.data.tags["cache_key"] for r in converted}) == 1  # the same inputs every time
        blob = (_texts_of_every_run(uri, tmp_path) + killed_log.read_text() + cut_off_log.read_text()
                + rerun.stdout + rerun.stderr)
    for name, secret in SECRETS.items():
        assert secret not in blob, f"{name} leaked"
