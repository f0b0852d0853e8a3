import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from hf2mlflow import PROJECT_ROOT

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="session", autouse=True)
def _offline_shared_home(tmp_path_factory):
    """No hub, and one cache of built-in models for the whole session (built once, in seconds)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF2MLFLOW_HOME", str(tmp_path_factory.mktemp("hf2mlflow-home")))
    os.environ.pop("MLFLOW_RUN_ID", None)
    yield


@contextlib.contextmanager
def local_store(root):
    """A local MLflow store in `root`, which is also the working directory (where artifacts land)."""
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(root)
    uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
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


@pytest.fixture
def tracking(tmp_path):
    """A fresh local MLflow store per test."""
    with local_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="session")
def logged(tmp_path_factory):
    """One conversion of tiny-phi3 to cpu-int4 and its registered chat pyfunc, shared by the session."""
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    root = tmp_path_factory.mktemp("pyfunc")
    with local_store(root) as uri:
        convert_run_id = convert(ConvertArgs(model="tiny-phi3", target="cpu-int4"))
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))
    return {"uri": model_uri, "convert_run_id": convert_run_id, "tracking_uri": uri, "root": root}


@pytest.fixture(scope="session")
def logged_transformers(logged):
    """tiny-phi3 logged with the transformers flavor (cpu fp32), registered in the same store as `logged`."""
    from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers

    with local_store(logged["root"]):
        return log_transformers(LogTransformersArgs(model="tiny-phi3", target="cpu-fp32"))


def all_runs(tracking_uri: str):
    client = mlflow.MlflowClient(tracking_uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]



@pytest.fixture(scope="session")
def logged_fp32(logged):
    """tiny-phi3 converted to cpu-fp32 by the builder and its registered chat pyfunc, in the store of `logged`."""
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    with local_store(logged["root"]):
        return log_pyfunc(LogPyfuncArgs(convert_run_id=convert(ConvertArgs(model="tiny-phi3", target="cpu-fp32"))))


@pytest.fixture(scope="session")
def logged_optimum(logged):
    """tiny-gpt2 (an architecture the onnxruntime-genai builder does not support) exported with optimum to
    fp32 ONNX for the CPU and its registered chat pyfunc, in the store of `logged`."""
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    with local_store(logged["root"]):
        convert_run_id = convert(ConvertArgs(model="tiny-gpt2", target="cpu-fp32", exporter="optimum"))
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert_run_id))
    return {**logged, "uri": model_uri, "convert_run_id": convert_run_id}


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


@pytest.fixture(scope="session")
def served_model(logged):
    """The `logged` pyfunc behind a real `mlflow models serve` on 127.0.0.1 (pickle deserialization off), one
    for the session: its /invocations URL and the server's process ID."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=logged["tracking_uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    command = ["mlflow", "models", "serve", "-m", logged["uri"], "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port), "-w", "1"]
    log = logged["root"] / "serve.log"
    with process(command, log, env=env) as proc:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log, seconds=180)
        yield f"http://127.0.0.1:{port}/invocations", proc.pid


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
