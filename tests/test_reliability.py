"""Reliability and security: a killed step is never reused, and no secret from the environment lands in a run.
(Any request gets an answer or a clear refusal: tests/unit/test_chat_schema.py.)"""

import contextlib
import os
import signal
import subprocess
import time

import mlflow
import psutil

from hf2mlflow import PROJECT_ROOT
from tests.support import all_runs, local_store

SECRETS = {"HF_TOKEN": "hf_SentinelHuggingFaceToken0123456789",
           "DATABRICKS_TOKEN": "dapiSentinelDatabricksToken0123456789",
           "HUGGING_FACE_HUB_TOKEN": "hf_SentinelHubToken0123456789"}


def _texts_of_every_run(uri: str, tmp_path) -> str:
    """Params, tags, metric names and every artifact of every run, and the registry's versions, as text."""
    client, texts = mlflow.MlflowClient(uri), []
    for run in all_runs(uri):
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()] + list(run.data.metrics)
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id))
        for root, _, files in os.walk(local):
            texts += [open(os.path.join(root, f), "rb").read().decode("utf-8", "replace") for f in files]
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            texts += [str(version.tags), version.source or "", version.description or ""]
    return "\n".join(texts)


def test_killed_chain_is_rerun_and_no_secret_lands_in_a_run(tmp_path):
    """`main` killed (with its steps) while converting: the conversion run stays RUNNING and is never reused; the
    rerun completes the chain. Both ran with tokens in the environment: no run, artifact, registered version or
    output holds one."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", HF_HUB_OFFLINE="1", **SECRETS)
    command = ["mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local", "-P", "model=tiny-phi3",
               "-P", "target=cpu-int4", "-P", "eval_limit=1"]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 180
        while "[builder]" not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
        # main, its step and the builder, as a machine going away would (MLflow starts each step in a session
        # of its own, so the whole tree, not one process group).
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    with local_store(tmp_path) as uri:
        (killed,) = [r for r in all_runs(uri) if r.data.tags.get("step") == "convert_onnx"]
        assert killed.info.status == "RUNNING" and "artifact_bytes" not in killed.data.metrics

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "convert_onnx: running" in rerun.stdout and "reusing" not in rerun.stdout
    with local_store(tmp_path) as uri:
        converted = [r for r in all_runs(uri) if r.data.tags.get("step") == "convert_onnx"]
        assert sorted(r.info.status for r in converted) == ["FINISHED", "RUNNING"]
        assert converted[0].data.tags["cache_key"] == converted[1].data.tags["cache_key"]  # same inputs
        blob = _texts_of_every_run(uri, tmp_path) + log_path.read_text() + rerun.stdout + rerun.stderr
    for name, secret in SECRETS.items():
        assert secret not in blob, f"{name} leaked"
