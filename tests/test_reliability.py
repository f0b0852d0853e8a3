"""Reliability and security: any request gets an answer or a clear refusal, a killed step is never reused,
and no secret from the environment lands in a run."""

import contextlib
import os
import signal
import subprocess
import time

import mlflow
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.runtime.chat_schema import (MAX_CONTENT_CHARS, MAX_MESSAGES, MAX_N, REQUEST_KEYS, ROLES, ChatRequest,
                                   ChatRequestError, parse_request)
from tests.support import all_runs, local_store

DEFAULTS = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0}

# Any JSON value, and request bodies built from the schema's own keys with values of any type.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES) | json_values,
                                           "content": st.text(max_size=30) | json_values}), max_size=4)
bodies = st.dictionaries(st.sampled_from(REQUEST_KEYS + ("extra",)), json_values, max_size=6).flatmap(
    lambda body: st.builds(lambda m: {**body, "messages": m}, messages | json_values))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_request_parses_or_gets_a_clear_refusal(body):
    try:
        request = parse_request(body, DEFAULTS)
    except ChatRequestError as exc:
        assert str(exc)  # a refusal says what was wrong
        return
    assert isinstance(request, ChatRequest)
    assert 1 <= len(request.messages) <= MAX_MESSAGES
    assert all(m["role"] in ROLES and isinstance(m["content"], str) and m["content"] for m in request.messages)
    assert 1 <= request.max_tokens and 1 <= request.n <= MAX_N and 0.0 <= request.temperature <= 2.0
    assert 0 < request.top_p <= 1.0 and request.top_k >= 0 and len(request.stop) <= 4
    assert all(isinstance(s, str) and s for s in request.stop)


@pytest.mark.parametrize("body, expected", [
    ({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}, f"at most {MAX_MESSAGES}"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]}, f"at most {MAX_CONTENT_CHARS}"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "'stop' must be a string or a list"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}}, "'stop' must be a string or a list"),
])
def test_request_size_and_shape_are_bounded(body, expected):
    with pytest.raises(ChatRequestError, match=expected):
        parse_request(body, DEFAULTS)


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
