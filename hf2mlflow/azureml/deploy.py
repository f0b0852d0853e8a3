"""`python -m hf2mlflow.azureml deploy`: a registered MLflow pyfunc -> a folder that `az ml` deploys as a managed
online endpoint, and a command job that runs the chain (docs/azureml.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from hf2mlflow.azureml.specs import FILES, Spec, check_spec, validate, write_specs
from hf2mlflow.errors import ConfigError, StepError

TAG = "[azureml]"
MARKER = ".hf2mlflow-azureml"  # a spec folder this command wrote, which it may write again


def check_model_uri(model_uri: str) -> None:
    """A models:/ URI must name a registered version at the tracking URI; anything else must be a model folder."""
    client = mlflow.MlflowClient()
    where = f"at tracking URI {mlflow.get_tracking_uri()}"
    if model_uri.startswith("models:/"):
        name, sep, alias = model_uri.removeprefix("models:/").partition("@")
        try:
            if sep:
                client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = name.partition("/")
                client.get_model_version(name, version or "1")
        except MlflowException as exc:
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
            raise ConfigError(f"model URI {model_uri!r} names no registered model version {where} ({exc.message}); "
                              f"registered models there: {', '.join(known) or 'none'}; give models:/NAME@ALIAS "
                              f"or models:/NAME/VERSION") from None
    elif "://" not in model_uri and ":/" not in model_uri and not (Path(model_uri) / "MLmodel").is_file():
        raise ConfigError(f"model URI {model_uri!r}: not a models:/ URI, and no MLflow model folder (MLmodel) there")


def prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{out} exists and was not written by this command; give a new or empty folder")
    for name in ("model", *FILES):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m hf2mlflow.azureml deploy\n")


def deploy(model_uri: str, spec: Spec, out: Path) -> Path:
    """Download the model into `out`/model and write and validate the specs beside it; returns `out`."""
    check_spec(spec)
    check_model_uri(model_uri)
    out = Path(out).resolve()
    prepare_out(out)
    print(f"{TAG} 1/3 downloading {model_uri} from {mlflow.get_tracking_uri()} to {out / 'model'}")
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(out / "model"))
    except MlflowException as exc:
        raise StepError(f"cannot download {model_uri}: {exc.message}") from None
    print(f"{TAG} 2/3 writing the specs")
    written = write_specs(spec, out)
    print(f"{TAG} 3/3 validating them with azure-ai-ml's loaders")
    validate(out)
    print(f"\n{TAG} done: {out}")
    for path in written:
        print(f"  {path.relative_to(out)}")
    print(f"  model/  ({model_uri})")
    print(f"\n{TAG} next, with the Azure CLI's ml extension signed in to your workspace "
          f"(az configure --defaults group=<resource group> workspace=<workspace>):")
    print(f"  az ml online-endpoint create -f {out / 'endpoint.yml'}")
    print(f"  az ml online-deployment create -f {out / 'deployment.yml'} --all-traffic")
    print(f"  az ml online-endpoint get-credentials -n {spec.endpoint}    # the key for requests")
    print(f"  az ml job create -f {out / 'job.yml'}    # the chain as a command job "
          f"(needs compute '{spec.compute}')")
    return out
