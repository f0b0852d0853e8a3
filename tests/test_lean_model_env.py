"""The logged chat pyfunc in a fresh virtual environment that holds only the model's requirements.txt (no torch,
no transformers, no hf2mlflow project), loaded with pickle deserialization disabled, answers a chat request.

The environment installs from the package registry pip is configured with (pip's cache makes it quicker);
the test takes about two minutes, most of it `pip install` (mlflow brings scipy, pyarrow, scikit-learn, ...).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.slow  # a virtual environment of about 1 GB

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


def test_the_logged_model_chats_in_an_environment_of_only_its_requirements(logged, tmp_path):
    with tracking_at(logged["tracking_uri"]):
        model_dir = Path(mlflow.artifacts.download_artifacts(logged["uri"], dst_path=str(tmp_path / "model")))
    requirements = (model_dir / "requirements.txt").read_text()
    names = [r.split("==")[0] for r in requirements.split()]
    assert names == ["mlflow", "onnxruntime", "tokenizers", "jinja2", "numpy"]

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_env())
        made = time.monotonic()
        # --no-compile: no .pyc for the thousands of installed files; only what is imported compiles, once.
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-r",
                                  str(model_dir / "requirements.txt")],
                                 capture_output=True, text=True, timeout=1200, env=clean_env(), cwd=tmp_path)
        installed = time.monotonic()
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

        request = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
        child = subprocess.run([str(python), "-I", "-c", CHILD, str(model_dir), json.dumps(request)],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path,
                               env=clean_env(MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false", HF_HUB_OFFLINE="1"))
        answered = time.monotonic()
        print(f"venv {made - started:.0f}s, pip install {installed - made:.0f}s, "
              f"load + chat {answered - installed:.0f}s")
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-5000:]
        (line,) = [line for line in child.stdout.splitlines() if line.startswith("SEEN ")]
        seen = json.loads(line.removeprefix("SEEN "))
        print("hf2mlflow modules after loading:", ", ".join(seen["hf2mlflow_modules"]))
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1 GB

    # Before loading: nothing of the training stack or of the project is there.
    assert seen["before"] == {"torch": False, "transformers": False, "hf2mlflow": False}

    (response,) = seen["response"]
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    assert response["model"] == "tiny-phi3" and isinstance(response["created"], int)
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
