"""The trained model's registered chat pyfunc (SmolLM2-135M-Instruct, cpu-int4, from conftest's `trained_sweep`) in
one fresh virtual environment, built once for this file:

1. holding only the model's requirements.txt (no torch, no transformers, no hf2mlflow project), loaded with pickle
   deserialization disabled, it answers a chat request;
2. then with the Azure ML deployment's packages added as `python -m hf2mlflow.azureml deploy` writes them
   (environment/conda.yaml: the model's requirements, azureml-inference-server-http, azureml-ai-monitoring), the
   written scoring script answers under the real inference server, `azmlinfsrv`.

The tests run in this order (1 needs the environment before 2 adds to it). The environment installs from the
package registry pip is configured with (pip's cache makes it quicker); building it takes about two minutes, most of
it `pip install` (mlflow brings scipy, pyarrow, scikit-learn, ...).
"""

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from hf2mlflow.azureml.deploy import deploy
from hf2mlflow.azureml.specs import SERVER_PACKAGES, Spec
from tests.support import HELLO, TRAINED_MODEL, free_port, post, process, wait_for_http

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained-model")]  # a virtual environment of about 1 GB

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# azmlinfsrv always binds 0.0.0.0 (its DEFAULT_HOST); the test serves on the loopback interface only.
LOOPBACK_AZMLINFSRV = textwrap.dedent('''
    import sys
    import azureml_inference_server_http.amlserver as server
    server.DEFAULT_HOST = "127.0.0.1"
    sys.argv = ["azmlinfsrv", *sys.argv[1:]]
    server.run()
''')

# Runs in the venv's python. It prints one JSON line of what it saw; the test asserts on it.
CHILD = textwrap.dedent('''
    import importlib.util, json, pickle, sys

    model_dir, request = sys.argv[1], json.loads(sys.argv[2])
    seen = {"before": {name: importlib.util.find_spec(name) is not None
                       for name in ("torch", "transformers", "hf2mlflow")}}

    # MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (set by the test) makes MLflow refuse to unpickle a model
    # (python_model.pkl and the like). Anything else that unpickles while the model loads or answers fails here:
    # pickle.load(s), and cloudpickle's, which are the same functions bound at its import.
    def refuse(*args, **kwargs):
        raise RuntimeError("pickle deserialization attempted")

    pickle.load = pickle.loads = refuse
    import cloudpickle
    cloudpickle.load = cloudpickle.loads = refuse

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_dir)
    seen["response"] = model.predict(request)
    import hf2mlflow
    seen["hf2mlflow_file"] = hf2mlflow.__file__
    seen["hf2mlflow_modules"] = sorted(m for m in sys.modules if m == "hf2mlflow" or m.startswith("hf2mlflow."))
    seen["project_importable"] = {name: importlib.util.find_spec(name) is not None
                                  for name in ("hf2mlflow.config", "hf2mlflow.log_model", "hf2mlflow.convert")}
    seen["heavy_loaded"] = sorted(m for m in ("torch", "transformers", "optimum") if m in sys.modules)
    print("SEEN " + json.dumps(seen))
''')


@contextlib.contextmanager
def tracking_at(uri):
    """MLflow pointed at `uri` (the store `logged` registered its model in): download_artifacts's tracking_uri
    argument does not reach the registry and logged-model look-ups behind a models:/ URI."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        mlflow.set_tracking_uri(old)


def clean_env(**extra):
    """The test's environment without what would leak this interpreter's packages or the tracking store in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "MLFLOW_", "VIRTUAL_ENV", "CONDA")) and k != "PYTHONPATH"}
    return dict(env, PYTHONNOUSERSITE="1", **extra)


@pytest.fixture(scope="module")
def lean_env(trained_sweep, tmp_path_factory):
    """The deploy command's spec folder for the trained model (model/ and the written specs) and a virtual
    environment of the model's requirements.txt alone."""
    work = tmp_path_factory.mktemp("lean-env")
    model_uri = {p["key"]: p for p in trained_sweep["first"]["points"]}["base"]["model_uri"]
    with tracking_at(trained_sweep["tracking_uri"]):
        spec = deploy(model_uri, Spec(endpoint="smol-chat"), work / "spec")
    model_dir = spec / "model"
    venv = work / "venv"
    python = venv / "bin" / "python"
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
        made = time.monotonic()
        # --no-compile: no .pyc for the thousands of installed files; only what is imported compiles, once.
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-r",
                                  str(model_dir / "requirements.txt")],
                                 capture_output=True, text=True, timeout=1200, env=clean_env(), cwd=work)
        installed = time.monotonic()
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        print(f"venv {made - started:.0f}s, pip install {installed - made:.0f}s")
        yield {"python": python, "spec": spec, "model_dir": model_dir, "work": work}
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1 GB


def test_the_logged_model_chats_in_an_environment_of_only_its_requirements(lean_env):
    model_dir, python, work = lean_env["model_dir"], lean_env["python"], lean_env["work"]
    requirements = (model_dir / "requirements.txt").read_text()
    names = [r.split("==")[0] for r in requirements.split()]
    assert names == ["mlflow", "onnxruntime", "tokenizers", "jinja2", "numpy"]

    request = {"messages": HELLO, "max_tokens": 8}
    started = time.monotonic()
    child = subprocess.run([str(python), "-I", "-c", CHILD, str(model_dir), json.dumps(request)],
                           capture_output=True, text=True, timeout=600, cwd=work,
                           env=clean_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", HF_HUB_OFFLINE="1"))
    print(f"load + chat {time.monotonic() - started:.0f}s")
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-5000:]
    (line,) = [line for line in child.stdout.splitlines() if line.startswith("SEEN ")]
    seen = json.loads(line.removeprefix("SEEN "))
    print("hf2mlflow modules after loading:", ", ".join(seen["hf2mlflow_modules"]))

    # Before loading: nothing of the training stack or of the project is there.
    assert seen["before"] == {"torch": False, "transformers": False, "hf2mlflow": False}

    (response,) = seen["response"]
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    assert response["model"] == TRAINED_MODEL and isinstance(response["created"], int)
    assert response["choices"]
    for index, choice in enumerate(response["choices"]):
        assert choice["index"] == index and choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = response["usage"]
    assert usage["prompt_tokens"] > 0 and 0 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # After loading: hf2mlflow is the model's own copy of the runtime, and nothing else of the project.
    assert Path(seen["hf2mlflow_file"]).resolve().is_relative_to((model_dir / "code").resolve())
    assert seen["hf2mlflow_modules"] and all(m == "hf2mlflow" or m.startswith("hf2mlflow.runtime")
                                             for m in seen["hf2mlflow_modules"]), seen["hf2mlflow_modules"]
    assert seen["project_importable"] == dict.fromkeys(seen["project_importable"], False)
    assert seen["heavy_loaded"] == []


def sse(url: str, body: dict):
    """POST `body`; the status, the content type and the server-sent events' data lines."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        status, kind, text = response.status, response.headers["Content-Type"], response.read().decode()
    return status, kind, [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def test_the_scoring_script_answers_under_azmlinfsrv_in_the_deployment_environment(lean_env):
    spec, python, work = lean_env["spec"], lean_env["python"], lean_env["work"]
    conda = yaml.safe_load((spec / "environment" / "conda.yaml").read_text())
    (pip,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict)]
    assert pip[-2:] == SERVER_PACKAGES
    assert pip[:-2] == (lean_env["model_dir"] / "requirements.txt").read_text().split()

    # The deployment's pip list in one install, as Azure builds the conda file: pip fits the server's pins around
    # the model's (it moves fastapi down for opentelemetry 1.33; adding the server alone would leave a conflict).
    started = time.monotonic()
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", *pip],
                             capture_output=True, text=True, timeout=900, env=clean_env(), cwd=work)
    installed = time.monotonic()
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=clean_env())
    assert check.returncode == 0, check.stdout + check.stderr
    # Azure's inference images import it at start (a 502 without it); the scoring script itself does not need it.
    monitoring = subprocess.run([str(python), "-I", "-c", "import azureml.ai.monitoring"], capture_output=True,
                                text=True, env=clean_env())
    assert monitoring.returncode == 0, monitoring.stderr[-3000:]

    port = free_port()
    url = f"http://127.0.0.1:{port}/score"
    log = work / "azmlinfsrv.log"
    command = [str(python), "-I", "-c", LOOPBACK_AZMLINFSRV, "--entry_script", str(spec / "code" / "score.py"),
               "--model_dir", str(spec), "--port", str(port)]
    env = clean_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", HF_HUB_OFFLINE="1")
    with process(command, log, env=env, cwd=work) as proc:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, log, seconds=180)
        with urllib.request.urlopen(url, timeout=60) as response:
            info = json.loads(response.read())
        started_server = time.monotonic()
        print(f"azure packages: pip install {installed - started:.0f}s; azmlinfsrv up and model loaded "
              f"{started_server - installed:.0f}s")
        assert info["status"] == "ready" and info["model"] == TRAINED_MODEL and info["streams"] is True
        assert Path(info["model_folder"]) == spec / "model"  # found beneath AZUREML_MODEL_DIR (--model_dir)

        # Azure ML's request format: one chat request, then the same as a split-orient DataFrame.
        status, answer = post(url, {"input_data": {"messages": FRANCE, "max_tokens": 16}})
        assert status == 200 and answer["object"] == "chat.completion", answer
        content = answer["choices"][0]["message"]["content"]
        assert "Paris" in content and answer["model"] == TRAINED_MODEL
        frame = {"columns": ["messages", "max_tokens"], "index": [0, 1], "data": [[FRANCE, 16], [HELLO, 4]]}
        status, answers = post(url, {"input_data": frame, "params": {"seed": 7}})
        assert status == 200 and len(answers) == 2, answers
        assert answers[0]["choices"][0]["message"]["content"] == content  # greedy: the same answer
        assert answers[1]["usage"]["completion_tokens"] <= 4

        # The seed's own body, as sent to `mlflow models serve`.
        status, answer = post(url, {"messages": FRANCE, "max_tokens": 16})
        assert status == 200 and answer["choices"][0]["message"]["content"] == content

        # Streamed: several chunks whose text is the whole answer's, then [DONE].
        status, kind, events = sse(url, {"input_data": {"messages": FRANCE, "max_tokens": 16, "stream": True}})
        assert status == 200 and kind.startswith("text/event-stream") and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 3 and all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        # A bad request: 400 and the model's own message, streamed or not; a body of no known shape: 400.
        for body in ({"messages": FRANCE, "max_tokens": -3}, {"messages": FRANCE, "max_tokens": -3, "stream": True},
                     {"input_data": {"messages": FRANCE, "max_tokens": -3}}):
            status, error = post(url, body)
            assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", (body, error)
            assert "'max_tokens' must be between 1 and" in error["message"]
        status, error = post(url, {"question": "What is the capital of France?"})
        assert status == 400 and "none of 'input_data', 'messages', 'prompt'" in error["message"]
        status, error = post(url, b"not json")
        assert status == 400 and error["error_code"] == "MALFORMED_REQUEST"

        # 40 clients, each gone after the first event of a long answer: closing the response closes the model's
        # stream, which frees its row; a new request is then answered as fast as when idle, not queued or refused.
        def latency() -> float:
            started = time.perf_counter()
            assert post(url, {"messages": HELLO, "max_tokens": 8})[0] == 200
            return time.perf_counter() - started

        idle = min(latency() for _ in range(3))
        story = [{"role": "user", "content": "Write a very long story about a dragon"}]
        long = json.dumps({"input_data": {"messages": story, "max_tokens": 1500, "stream": True}})
        for _ in range(40):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("POST", "/score", long, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")
            response.close()
            connection.close()
        time.sleep(0.5)  # the server sees the last disconnect
        after = min(latency() for _ in range(3))
        print(f"a quick request idle {idle * 1000:.0f} ms, after the 40 streams {after * 1000:.0f} ms")
        assert after < 2 * idle + 0.2
        assert proc.poll() is None
