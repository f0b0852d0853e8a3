"""The entry point as users run it: `mlflow run . -e convert_onnx`."""

import os
import subprocess

import mlflow

from hf2mlflow import PROJECT_ROOT
from tests.support import all_runs


def mlflow_run(tracking_uri, *params, entry_point="convert_onnx"):
    command = ["mlflow", "run", str(PROJECT_ROOT), "-e", entry_point, "--env-manager", "local"]
    for p in params:
        command += ["-P", p]
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_mlflow_run_converts_and_prints_where_results_went(tracking):
    proc = mlflow_run(tracking, "model=tiny-qwen2", "target=cpu-int4", "output_name=qwen-demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = all_runs(tracking)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "tiny-qwen2" and run.data.params["output_name"] == "qwen-demo"
    assert run.data.tags["mlflow.runName"] == "qwen-demo"
    assert run.data.tags["mlflow.project.entryPoint"] == "convert_onnx"
    assert f"ONNX model: runs:/{run.info.run_id}/onnx" in proc.stdout
    assert "[builder]" in proc.stdout  # the builder's progress is shown
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "onnx")}
    assert {"onnx/model.onnx", "onnx/model.onnx.data", "onnx/genai_config.json"} <= files

    # The next step, as its entry point, on that run: a registered chat model.
    proc = mlflow_run(tracking, f"convert_run_id={run.info.run_id}", "registered_model_name=qwen-chat",
                      entry_point="log_pyfunc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered: models:/qwen-chat@candidate (version 1)" in proc.stdout
    (answer,) = mlflow.pyfunc.load_model("models:/qwen-chat@candidate").predict(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert answer["model"] == "tiny-qwen2" and answer["usage"]["completion_tokens"] <= 3


def test_mlflow_run_bad_config_fails_clearly(tracking, tmp_path):
    bad = tmp_path / "my-target.yaml"
    bad.write_text("execution_provider: cpu\nprecision: fp16\ntransformers: {device: cpu, dtype: float32}\n")
    proc = mlflow_run(tracking, "model=tiny-phi3", f"target={bad}")
    assert proc.returncode != 0
    assert f"{bad}: invalid target config" in proc.stderr
    assert "precision 'fp16' is not built for execution_provider 'cpu'" in proc.stderr
    assert "Loading" not in proc.stdout and "[builder]" not in proc.stdout  # failed before any model work
    (run,) = all_runs(tracking)
    assert run.info.status == "FAILED"


def test_mlflow_run_log_transformers(tracking):
    proc = mlflow_run(tracking, "model=tiny-qwen2", "target=cpu-fp32", "registered_model_name=qwen-tf",
                      entry_point="log_transformers")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered: models:/qwen-tf@candidate (version 1)" in proc.stdout
    (run,) = all_runs(tracking)
    assert run.data.params["save_pretrained"] == "true" and run.data.tags["model"] == "tiny-qwen2"
    (answer,) = mlflow.pyfunc.load_model("models:/qwen-tf@candidate").predict(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert answer["usage"]["completion_tokens"] == 3
