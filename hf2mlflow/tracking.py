"""Small MLflow helpers shared by the steps."""

from __future__ import annotations

import contextlib
import sys

import mlflow
from mlflow.exceptions import MlflowException

from hf2mlflow.errors import ConfigError


def log_params_once(params: dict) -> None:
    """Log params the run does not have yet (`mlflow run` already logged the entry point's own)."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    new = {k: "" if v is None else str(v) for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)


@contextlib.contextmanager
def step_run(step: str, run_name: str, tags: dict, params: dict):
    """Start (or, under `mlflow run`, attach to) the step's run, tag and parametrise it, and on any
    failure put the reason on the run as well: the run then ends FAILED with its `error` tag."""
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"step": step, "mlflow.runName": run_name, **tags})
        log_params_once(params)
        try:
            yield run
        except BaseException as exc:
            _record_error(step, run, exc)
            raise


def _record_error(step: str, run, exc: BaseException) -> None:
    """The reason on the run as its `error` tag, if the tracking server can still be told; the step's own
    error is what gets raised either way."""
    try:
        mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:4000])
    except Exception as unrecorded:
        print(f"[{step}] could not record the error on run {run.info.run_id}: {unrecorded}", file=sys.stderr)


def ui_hint(run) -> str:
    uri = mlflow.get_tracking_uri()
    path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}  then open http://127.0.0.1:5000/{path}"


def print_run_summary(step: str, run, outputs: dict[str, str]) -> None:
    print(f"\n[{step}] run {run.info.run_id} finished")
    for label, value in outputs.items():
        print(f"[{step}] {label}: {value}")
    print(f"[{step}] UI: {ui_hint(run)}")


def check_alias(alias: str) -> None:
    """The registry's own alias rules, checked before anything is downloaded or logged."""
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise ConfigError(f"alias: {exc.message}") from None


def set_alias(step: str, model_info, registered: str, alias: str) -> str:
    """Point `alias` at the version `log_model(registered_model_name=...)` just made; returns models:/name@alias."""
    version = model_info.registered_model_version
    print(f"[{step}] setting alias '{alias}' on version {version} of '{registered}'")
    mlflow.MlflowClient().set_registered_model_alias(registered, alias, version)
    mlflow.log_param("registered_model_version", version)
    uri = f"models:/{registered}@{alias}"
    mlflow.set_tags({"registered_model_uri": uri, "registered_model_version_uri": f"models:/{registered}/{version}"})
    return uri


def print_model_summary(step: str, run, model_info, registered_uri: str) -> None:
    print_run_summary(step, run, {
        "model URI": model_info.model_uri,
        "registered": f"{registered_uri} (version {model_info.registered_model_version})",
        "serve": f"mlflow models serve -m '{registered_uri}' --env-manager local -p 5000"})
