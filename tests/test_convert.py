import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.errors import ConfigError
from hf2mlflow.convert.genai_builder import BuilderError
from hf2mlflow.runtime.manifest import verify_manifest
from hf2mlflow.sources.resolve import ModelSourceError
from tests.support import all_runs, local_store

STEP = str(PROJECT_ROOT / "steps" / "convert_onnx.py")


@pytest.mark.parametrize("model, target, architecture", [
    ("tiny-phi3", "cpu-int4", "Phi3ForCausalLM"),
    ("tiny-qwen2", "cpu-int4", "Qwen2ForCausalLM"),
    ("tiny-phi3", "cpu-fp32", "Phi3ForCausalLM"),
])
def test_convert_logs_a_validated_model(converted, shared_store, tmp_path, model, target, architecture):
    run_id = converted(model, target)
    with local_store(shared_store["root"]):
        _check_converted(run_id, model, target, architecture, tmp_path)


def _check_converted(run_id, model, target, architecture, tmp_path):
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["step"] == "convert_onnx"
    assert (run.data.tags["model"], run.data.tags["target"]) == (model, target)
    assert run.data.tags["mlflow.runName"] == f"{model}-{target}"
    params = run.data.params
    assert params["architecture"] == architecture
    assert params["model_source"] == "builtin" and params["builder_version"] == "0.15.2"
    assert params["precision"] == target.split("-")[1] and params["execution_provider"] == "cpu"
    if target == "cpu-int4":
        assert (params["builder_option.block_size"], params["builder_option.accuracy_level"]) == ("32", "4")
    metrics = run.data.metrics
    assert metrics["conversion_seconds"] > 0
    assert 100 * 2**20 < metrics["builder_peak_rss_bytes"] < 8 * 2**30
    # Greedy generation stops at EOS or after 16 new tokens; a random tiny model may end at once.
    assert 1 <= metrics["validation_new_tokens"] <= 16 and metrics["validation_tokenizer_match"] == 1.0

    onnx_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(tmp_path / "dl")))
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {
        p.name for p in onnx_dir.iterdir()}
    manifest = mlflow.artifacts.load_dict(f"runs:/{run_id}/manifest.json")
    assert verify_manifest(onnx_dir, manifest) == []
    assert set(manifest["files"]) == {str(p.relative_to(onnx_dir)) for p in onnx_dir.rglob("*") if p.is_file()}
    assert metrics["artifact_bytes"] == manifest["total_bytes"] == sum(
        p.stat().st_size for p in onnx_dir.rglob("*") if p.is_file())
    validation = mlflow.artifacts.load_dict(f"runs:/{run_id}/validation.json")
    assert validation["prompt"].endswith(("<|assistant|>\n", "<|im_start|>assistant\n"))
    assert len(validation["new_tokens"]) == metrics["validation_new_tokens"]


def test_quantized_is_smaller_than_fp32(converted, shared_store):
    client = mlflow.MlflowClient(shared_store["tracking_uri"])
    sizes = {t: client.get_run(converted("tiny-qwen2", t)).data.metrics["artifact_bytes"]
             for t in ("cpu-int4", "cpu-fp32")}
    assert sizes["cpu-int4"] < sizes["cpu-fp32"]


def test_gpu_target_is_built_and_checked_without_a_gpu(tracking):
    """Where a GPU and onnxruntime-genai-cuda are, the cuda model generates in the step; elsewhere the tag says
    why it did not."""
    from hf2mlflow.cuda import genai_cuda_problem

    run = mlflow.get_run(convert(ConvertArgs(model="tiny-phi3", target="cuda-fp16")))
    assert run.info.status == "FINISHED"
    problem = genai_cuda_problem()
    expected = (f"graph checked; generation skipped: needs a cuda device: {problem}" if problem
                else "graph checked; generated on cuda")
    assert run.data.tags["validation"] == expected
    config = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/onnx/genai_config.json")
    assert "cuda" in config["model"]["decoder"]["session_options"]["provider_options"][0]


def test_config_errors_start_no_run(tracking):
    with pytest.raises(ConfigError, match="unknown target"):
        convert(ConvertArgs(model="tiny-phi3", target="cpu-fp16"))
    with pytest.raises(ConfigError, match="model folder not found"):
        convert(ConvertArgs(model="/no/such/model", target="cpu-int4"))
    with pytest.raises(ConfigError, match="revision 'abc' only applies to hub models"):
        convert(ConvertArgs(model="tiny-phi3", target="cpu-int4", revision="abc"))
    assert all_runs(tracking) == []


def only_run(tracking_uri):
    (run,) = all_runs(tracking_uri)
    return run


def test_unsupported_architecture_fails_the_run(tracking):
    with pytest.raises(BuilderError) as err:
        convert(ConvertArgs(model="tiny-gpt2", target="cpu-int4"))
    assert "architecture GPT2LMHeadModel" in str(err.value)
    assert "supported: " in str(err.value) and "Phi3ForCausalLM" in str(err.value)
    assert "-P exporter=optimum" in str(err.value)  # the route that does convert it (tests/test_optimum.py)
    run = only_run(tracking)
    assert run.info.status == "FAILED" and "GPT2LMHeadModel" in run.data.tags["error"]


def test_offline_hub_model_says_how_to_run_offline(tracking):
    with pytest.raises(ModelSourceError) as err:
        convert(ConvertArgs(model="someorg/not-cached-model", target="cpu-int4"))
    assert "cannot reach the Hugging Face hub for 'someorg/not-cached-model'" in str(err.value)
    assert "-P model=tiny-phi3" in str(err.value)
    assert only_run(tracking).info.status == "FAILED"


def test_unreachable_hub_from_the_step_script(tracking, tmp_path):
    # A real connection attempt to a closed port on this machine, no offline flag.
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    proc = subprocess.run([sys.executable, STEP, "--model", "someorg/some-model", "--target", "cpu-int4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "[convert_onnx] FAILED: cannot reach the Hugging Face hub for 'someorg/some-model'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert only_run(tracking).info.status == "FAILED"


def test_builder_killed_fails_the_run_with_the_reason(tracking):
    killed, done = [], threading.Event()

    def kill_builder():
        # Any builder process of this test's (the builder itself, or a wrapper that takes its arguments).
        deadline = time.time() + 120
        while time.time() < deadline and not killed and not done.is_set():
            for child in psutil.Process().children(recursive=True):
                try:
                    if "--extra_options" in child.cmdline():
                        time.sleep(1.0)  # let it get going
                        child.send_signal(signal.SIGKILL)
                        killed.append(child.pid)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_builder)
    watcher.start()
    try:
        with pytest.raises(BuilderError, match="killed by SIGKILL .*out-of-memory killer"):
            convert(ConvertArgs(model="tiny-phi3", target="cpu-int4"))
    finally:
        done.set()  # never left running to kill another test's builder
        watcher.join()
    assert killed
    run = only_run(tracking)
    assert run.info.status == "FAILED" and "SIGKILL" in run.data.tags["error"]
