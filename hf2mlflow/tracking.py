"""Small MLflow helpers shared by the steps."""

from __future__ import annotations

import mlflow


def log_params_once(params: dict) -> None:
    """Log params the run does not have yet (`mlflow run` already logged the entry point's own)."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    new = {k: "" if v is None else str(v) for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)


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
