"""The Azure ML specs for a downloaded MLflow model folder: what they say, how they are written and how azure-ai-ml
checks them. No download and no Azure call here (hf2mlflow/azureml/deploy.py downloads)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import yaml

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.errors import ConfigError

SCORE_SCRIPT = Path(__file__).resolve().parent / "score.py"
# The deployment's server, and what Azure's inference images import at start (without it: 502, docs/azureml.md).
SERVER_PACKAGES = ["azureml-inference-server-http==1.5.1", "azureml-ai-monitoring==1.0.0"]
BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
# Azure's rules for endpoint and deployment names: 3-32 characters, letters, digits and hyphens, a letter first.
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{2,31}$")
INSTANCE_TYPE = re.compile(r"^Standard_[A-Za-z0-9_]+$")
SCHEMAS = "https://azuremlschemas.azureedge.net/latest"
FILES = ("endpoint.yml", "deployment.yml", "environment/conda.yaml", "code/score.py", "job.yml")


@dataclasses.dataclass
class Spec:
    endpoint: str
    deployment: str = "blue"
    instance_type: str = "Standard_DS3_v2"
    instance_count: int = 1
    base_image: str = BASE_IMAGE
    compute: str = "cpu-cluster"
    experiment: str = "hf2mlflow"
    job_model: str = ""  # empty: the model's own `model` metadata (the chain that built it)
    job_target: str = ""
    eval_limit: int = 5


def check_spec(spec: Spec) -> None:
    """Everything about the request that can be wrong before anything is downloaded."""
    for kind, name in (("endpoint", spec.endpoint), ("deployment", spec.deployment)):
        if not NAME.match(name or ""):
            raise ConfigError(f"{kind} name {name!r} is not allowed: Azure ML wants 3 to 32 characters, letters, "
                              f"digits and hyphens, starting with a letter (e.g. 'smollm2-chat')")
    if isinstance(spec.instance_count, bool) or not isinstance(spec.instance_count, int) or spec.instance_count < 1:
        raise ConfigError(f"instance count {spec.instance_count!r} is not allowed: a whole number, 1 or more")
    if not INSTANCE_TYPE.match(spec.instance_type or ""):
        raise ConfigError(f"instance type {spec.instance_type!r} is not allowed: an Azure VM size such as "
                          f"Standard_DS3_v2 or Standard_F4s_v2")
    if spec.eval_limit < 0:
        raise ConfigError(f"eval limit {spec.eval_limit} is not allowed: 0 (all examples) or more")


def read_model(model_dir: Path) -> dict:
    """What the specs take from a downloaded MLflow model: its pip requirements, Python version and metadata."""
    mlmodel, requirements = model_dir / "MLmodel", model_dir / "requirements.txt"
    for path in (mlmodel, requirements):
        if not path.is_file():
            raise ConfigError(f"{model_dir} is not an MLflow model folder with pip requirements: {path.name} missing")
    meta = yaml.safe_load(mlmodel.read_text()) or {}
    pyfunc = (meta.get("flavors") or {}).get("python_function")
    if not pyfunc:
        raise ConfigError(f"{mlmodel}: no python_function flavor; the scoring script loads the model as a pyfunc")
    lines = [line.strip() for line in requirements.read_text().splitlines()]
    return {"requirements": [line for line in lines if line and not line.startswith("#")],
            "python": ".".join(str(pyfunc.get("python_version", "3.11")).split(".")[:2]),
            "metadata": meta.get("metadata") or {}}


def conda_env(model: dict, name: str) -> dict:
    # The model's own pins come first: the server packages must fit around them, never move them.
    return {"name": name, "channels": ["conda-forge"],
            "dependencies": [f"python={model['python']}", "pip",
                             {"pip": model["requirements"] + SERVER_PACKAGES}]}


def _project_path(out: Path) -> str:
    """The project folder as the job's `code:`: relative to the spec folder when the folder is inside it."""
    return os.path.relpath(PROJECT_ROOT, out) if out.resolve().is_relative_to(PROJECT_ROOT) else str(PROJECT_ROOT)


def job_command(model: str, target: str, eval_limit: int) -> str:
    # Azure sets MLFLOW_TRACKING_URI (azureml://, which only the azureml-mlflow plugin reads; it cannot sit beside
    # mlflow 3.17) and MLFLOW_RUN_ID; the chain logs to a store in ./outputs instead, which Azure keeps with the job.
    return ("mkdir -p outputs && cd outputs && "
            "env -u MLFLOW_RUN_ID -u MLFLOW_EXPERIMENT_ID -u MLFLOW_EXPERIMENT_NAME -u MLFLOW_TRACKING_TOKEN "
            "MLFLOW_TRACKING_URI=sqlite:///mlflow.db "
            f"python ../steps/main.py --model {model} --target {target} --eval_limit {eval_limit}")


def specs(spec: Spec, model: dict, out: Path) -> dict[str, dict]:
    """The YAML documents, by file name under `out`."""
    job_model = spec.job_model or model["metadata"].get("model")
    job_target = spec.job_target or model["metadata"].get("target")
    if not job_model or not job_target:
        raise ConfigError("the model's MLmodel metadata names no 'model' and 'target' (it was not logged by "
                          "log_pyfunc); give --job-model and --job-target for job.yml")
    project = _project_path(out)
    return {
        "endpoint.yml": {"$schema": f"{SCHEMAS}/managedOnlineEndpoint.schema.json", "name": spec.endpoint,
                         "auth_mode": "key"},
        "deployment.yml": {
            "$schema": f"{SCHEMAS}/managedOnlineDeployment.schema.json", "name": spec.deployment,
            "endpoint_name": spec.endpoint,
            "model": {"path": "model", "type": "mlflow_model"},
            "code_configuration": {"code": "code", "scoring_script": "score.py"},
            "environment": {"image": spec.base_image, "conda_file": "environment/conda.yaml"},
            "instance_type": spec.instance_type, "instance_count": spec.instance_count},
        "environment/conda.yaml": conda_env(model, f"{spec.endpoint}-env"),
        "job.yml": {
            "$schema": f"{SCHEMAS}/commandJob.schema.json", "type": "command",
            "display_name": f"hf2mlflow main {job_model} {job_target}", "experiment_name": spec.experiment,
            "code": project, "command": job_command(job_model, job_target, spec.eval_limit),
            "environment": {"image": spec.base_image, "conda_file": f"{project}/conda.yaml"},
            "compute": f"azureml:{spec.compute}"},
    }


def write_specs(spec: Spec, out: Path) -> list[Path]:
    """Write the specs for the model already in `out`/model; returns the files written."""
    check_spec(spec)
    out = Path(out)
    model = read_model(out / "model")
    documents = specs(spec, model, out)
    written = []
    for name, document in documents.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
        written.append(path)
    (out / "code").mkdir(exist_ok=True)
    shutil.copyfile(SCORE_SCRIPT, out / "code" / "score.py")
    written.append(out / "code" / "score.py")
    return written


def _loaders():
    import warnings

    try:
        with warnings.catch_warnings():  # azure-ai-ml's marshmallow deprecations at import
            warnings.simplefilter("ignore")
            from azure.ai.ml import load_job, load_online_deployment, load_online_endpoint
    except ImportError:
        raise ConfigError("validating the specs needs azure-ai-ml: pip install -e '.[azureml]'") from None
    return {"endpoint.yml": load_online_endpoint, "deployment.yml": load_online_deployment, "job.yml": load_job}


def _reason(exc: Exception) -> str:
    """The part of azure-ai-ml's message that names the field and what is allowed, without its boilerplate."""
    text = str(exc).split("Visit this link")[0]
    text = text.split("failed:", 1)[-1] if "failed:" in text else text
    return " ".join(text.split()) or type(exc).__name__


def validate(out: Path) -> dict:
    """Load every written YAML with azure-ai-ml's own loaders (offline), and check the local paths they name,
    which the loaders do not all check. Returns the loaded entities by file name."""
    import warnings
    from importlib.metadata import version

    out = Path(out)
    loaded = {}
    for name, load in _loaders().items():
        path = out / name
        if not path.is_file():
            raise ConfigError(f"{path}: missing; write the specs first")
        try:
            with warnings.catch_warnings():  # azure-ai-ml's own marshmallow deprecations, by the hundred
                warnings.simplefilter("ignore")
                loaded[name] = load(str(path))
        except Exception as exc:  # noqa: BLE001 - azure-ai-ml raises marshmallow's and its own errors
            raise ConfigError(f"{path} is not a valid Azure ML spec (azure-ai-ml {version('azure-ai-ml')}): "
                              f"{_reason(exc)}") from None
    deployment = loaded["deployment.yml"]
    code = deployment.code_configuration
    needed = {"model.path": out / "model" / "MLmodel",
              "code_configuration": out / code.code / code.scoring_script,
              "environment.conda_file": out / "environment" / "conda.yaml"}
    for field, path in needed.items():
        if not path.is_file():
            raise ConfigError(f"{out / 'deployment.yml'}: {field} points at {path}, which does not exist")
    if deployment.instance_count < 1:
        raise ConfigError(f"{out / 'deployment.yml'}: instance_count {deployment.instance_count} is not allowed: "
                          f"1 or more")
    return loaded
