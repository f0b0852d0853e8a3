"""What the tests share that is not a fixture: the greeting they send, a local MLflow store, processes and
servers they start, HTTP. Test modules import these (`from tests.support import ...`); tests/conftest.py holds
only fixtures and the tier markers."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from hf2mlflow import PROJECT_ROOT

HELLO = [{"role": "user", "content": "Hello there"}]
TRAINED_MODEL = "smollm2-135m-instruct"  # from the package registry: tests/test_trained_model.py, test_sweep.py
FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"


def store_uri(root) -> str:
    """The tracking URI of the local MLflow store in `root`."""
    return f"sqlite:///{root}/mlflow.db"


@contextlib.contextmanager
def local_store(root):
    """A local MLflow store in `root`, which is also the working directory (where artifacts land)."""
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    uri = os.environ["MLFLOW_TRACKING_URI"] = store_uri(root)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
        mlflow.set_tracking_uri(old_uri)


def write_target(tmp_path, text):
    path = tmp_path / "my-target.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def all_runs(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@contextlib.contextmanager
def pickle_free_model(root, uri):
    """The model at `uri` from the store in `root`, loaded with pickle deserialization off: nothing in it may be
    pickled."""
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        with local_store(root):
            yield mlflow.pyfunc.load_model(uri)
    finally:
        os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)


def ask(model, **request):
    (response,) = model.predict({"messages": HELLO, **request})
    return response


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(command, log: Path, **kwargs):
    """`command` in its own process group, output appended to `log`; stopped (SIGTERM, then SIGKILL) on the way
    out."""
    with open(log, "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def wait_for_http(url: str, proc, log: Path, seconds: int = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
    pytest.fail(f"{url} did not come up:\n{log.read_text()[-3000:]}")


def wait_for_output(proc, log: Path, text: str, seconds: int = 180) -> None:
    """Wait until `text` shows in the log of a process that is still running."""
    deadline = time.time() + seconds
    while text not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@contextlib.contextmanager
def tracking_server(backend_uri: str, root: Path, port: int = 0):
    """`mlflow server` on 127.0.0.1 (on `port`, else a free one) with the given backend store and artifacts
    served from `root`; stopped on the way out."""
    port = port or free_port()
    command = ["mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with process(command, root / "server.log") as proc:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, root / "server.log")
        yield f"http://127.0.0.1:{port}"


def copy_working_tree(destination: Path) -> Path:
    """What a clone would hold plus the uncommitted work under test (tracked and untracked, not ignored)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, destination / name)
    return destination


def post(url: str, body, content_type: str = "application/json"):
    """POST `body` (bytes as they are, anything else as JSON): the status and the answer, parsed when it is JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def failing_step_env(step: str) -> dict:
    """Environment additions for a process tree in which the step `step` fails inside its run (its run ends
    FAILED with an `error` tag): tests/fault_injection/sitecustomize.py, first on PYTHONPATH."""
    return {"HF2MLFLOW_FAIL_STEP": step,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_INJECTION), os.environ.get("PYTHONPATH")]))}
