"""Faults while a step runs: the tracking server goes away (and comes back in time, or too late), the disk
fills while artifacts are logged. Half-done work never ends FINISHED, never gets a registered version and is
never reused; the step says what happened; a rerun completes."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
from hf2mlflow.runtime.manifest import verify_manifest
from tests.support import (all_runs, ask, failing_step_env, free_port, local_store, pickle_free_model,
                           tracking_server, wait_for_output)

CONVERT = [sys.executable, str(PROJECT_ROOT / "steps" / "convert_onnx.py"), "--model", "tiny-phi3",
           "--target", "cpu-int4"]
REGISTERED = "tiny-phi3-cpu-int4-onnx"


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real filesystem of `size` (tmpfs) mounted at `path`: writes beyond it fail with ENOSPC."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill `disk` until `leave_bytes` are free; returns the filler file (delete it to free the space)."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def artifacts_experiment(location: Path, monkeypatch, name: str = "faults") -> str:
    """An experiment whose artifacts go to `location`, made the active one for this test and its subprocesses."""
    experiment_id = mlflow.create_experiment(name, artifact_location=location.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return experiment_id


def conversion_is_complete(run_id: str, tmp_path: Path) -> bool:
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / run_id)))
    return not verify_manifest(local / "onnx", json.loads((local / "manifest.json").read_text()))


def test_an_injected_failure_fails_the_step_inside_its_run(tmp_path):
    """tests/fault_injection, with which test_main.py fails one step of the chain: the step named fails inside
    its run, which ends FAILED with the reason, and the step says why."""
    with local_store(tmp_path) as uri:
        failed = subprocess.run(CONVERT, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, **failing_step_env("convert_onnx")))
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "[convert_onnx] FAILED: failing on purpose: HF2MLFLOW_FAIL_STEP=convert_onnx" in failed.stderr
        (run,) = all_runs(uri)
        assert run.info.status == "FAILED" and "failing on purpose" in run.data.tags["error"]
        assert "artifact_bytes" not in run.data.metrics


@pytest.mark.slow
def test_disk_full_while_the_conversion_is_logged(tmp_path, monkeypatch):
    with local_store(tmp_path) as uri, small_disk(tmp_path / "disk", "4m") as disk:
        artifacts_experiment(disk / "artifacts", monkeypatch)
        filler = fill(disk, 200 * 1024)  # the tiny model's artifacts take ~570 KiB
        full = subprocess.run(CONVERT, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1
        assert "[convert_onnx] FAILED: no space left on device" in full.stderr, full.stderr[-3000:]
        assert str(disk) in full.stderr and "Traceback" not in full.stderr
        (failed,) = all_runs(uri)
        assert failed.info.status == "FAILED" and "No space left on device" in failed.data.tags["error"]

        filler.unlink()
        rerun = subprocess.run(CONVERT, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        finished = [r for r in all_runs(uri) if r.info.status == "FINISHED"]
        assert len(finished) == 1 and conversion_is_complete(finished[0].info.run_id, tmp_path)


def test_disk_full_while_the_pyfunc_is_logged_leaves_no_registered_version(converted, shared_store, tmp_path,
                                                                           monkeypatch):
    convert_run_id = converted("tiny-phi3", "cpu-int4")
    name = "tiny-phi3-disk-full"  # in the session's store, beside the shared models
    with local_store(shared_store["root"]) as uri, small_disk(tmp_path / "disk", "8m") as disk:
        experiment_id = artifacts_experiment(disk / "artifacts", monkeypatch, f"faults-{tmp_path.name}")
        filler = fill(disk, 200 * 1024)
        with pytest.raises(OSError, match="No space left on device"):
            log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id, registered_model_name=name))
        client = mlflow.MlflowClient(uri)
        (failed,) = client.search_runs([experiment_id], "tags.step = 'log_pyfunc'")
        assert failed.info.status == "FAILED" and "No space left on device" in failed.data.tags["error"]
        assert client.search_model_versions(f"name='{name}'") == []

        filler.unlink()
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id, registered_model_name=name))
        (version,) = client.search_model_versions(f"name='{name}'")
        assert version.status == "READY" and model_uri == f"models:/{name}@candidate"
        with pickle_free_model(shared_store["root"], model_uri) as model:
            assert ask(model, max_tokens=4)["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_tracking_server_away_mid_step_and_back_in_time(tmp_path):
    """The server stops while the model builds and comes back while the step is retrying: the step waits
    (MLflow retries with backoff), then finishes with every artifact; log_pyfunc goes on from it."""
    port, backend = free_port(), f"sqlite:///{tmp_path}/server.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    log = tmp_path / "convert.log"
    with open(log, "w") as out:
        with tracking_server(backend, tmp_path, port):
            step = subprocess.Popen(CONVERT, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
            wait_for_output(step, log, "[builder]")
        # Down now. After the build the step must log its metrics and artifacts: it cannot, and waits, retrying.
        wait_for_output(step, log, "[builder] Saving processing files")
        time.sleep(5)
        assert step.poll() is None and "[convert_onnx] run " not in log.read_text()  # not finished
        with tracking_server(backend, tmp_path, port) as uri:
            assert step.wait(timeout=300) == 0, log.read_text()[-3000:]
            mlflow.set_tracking_uri(uri)
            (run,) = all_runs(uri)
            assert run.info.status == "FINISHED" and conversion_is_complete(run.info.run_id, tmp_path)
            model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run.info.run_id))
            assert model_uri == f"models:/{REGISTERED}@candidate"
