"""Azure Machine Learning: deployment specs for a managed online endpoint, a command job that runs the chain, and
the workspace's MLflow tracking URI for MLflow's plain REST client (docs/azureml.md).

    python -m hf2mlflow.azureml deploy --model-uri models:/NAME@ALIAS --endpoint NAME --out build/azureml/NAME

azure-ai-ml (extra `.[azureml]`) validates the written YAML offline. The scoring script (score.py) runs in the
deployment's own environment, which never holds this package.
"""

from __future__ import annotations

import re

from hf2mlflow.errors import ConfigError

# Azure ML's own host for the workspace APIs; the region is the workspace's location, e.g. westeurope.
WORKSPACE_HOST = "https://{region}.api.azureml.ms"
_SEGMENT = re.compile(r"^[A-Za-z0-9._()-]+$")


def workspace_tracking_uri(region: str, subscription: str, resource_group: str, workspace: str, *,
                           host: str = "") -> str:
    """The https URI of a workspace's MLflow REST API (tracking and registry), as MLflow's plain REST client takes
    it: MLflow appends /api/2.0/mlflow/... and, with MLFLOW_TRACKING_TOKEN set, sends `Authorization: Bearer`.
    `host` replaces https://<region>.api.azureml.ms (a stand-in server in the tests)."""
    for label, value in (("region", region), ("subscription", subscription), ("resource group", resource_group),
                         ("workspace", workspace)):
        if not value or not _SEGMENT.match(value):
            raise ConfigError(f"{label} {value!r} is not allowed: letters, digits, '.', '_', '-', '(' and ')' only")
    base = (host or WORKSPACE_HOST.format(region=region.lower())).rstrip("/")
    return (f"{base}/mlflow/v2.0/subscriptions/{subscription}/resourceGroups/{resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{workspace}")
