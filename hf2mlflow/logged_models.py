"""The models `evaluate` compares: run IDs or model URIs, resolved and checked before anything runs."""

from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from hf2mlflow.config import ModelSpec
from hf2mlflow.errors import ConfigError
from hf2mlflow.contract import (GENAI_PACKAGE, ORT_PACKAGE, OPTIMUM_ROUTE, SHORT_DTYPE, TRANSFORMERS_FLAVOR,
                                TRANSFORMERS_TASK as TASK, onnx_registered_name, route_for_format,
                                transformers_registered_name)
from hf2mlflow.sources.resolve import spec_from_source_params

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# models:/NAME@ALIAS or models:/NAME/VERSION (models:/m-... is a logged model, not a registered one)
REGISTERED = re.compile(r"^models:/([^/@]+)(?:@([^/]+)|/([^/]+))")
GIVE = ("give a log_pyfunc or log_transformers run ID, or a model URI (models:/name@alias, models:/name/version, "
        "runs:/run_id/model, a path)")


@dataclass
class EvalModel:
    ref: str  # as the user gave it
    uri: str  # a registered model's alias resolved to its version, once
    name: str  # short name for metric keys and tables
    flavor: str  # "onnx" (onnxruntime-genai), "optimum-onnx" (onnxruntime through optimum) or "transformers"
    precision: str
    logged_by_run: str
    source: ModelSpec  # the Hugging Face model it came from: the parity reference
    execution_provider: str = "cpu"  # where a logged ONNX model runs: its pyfunc picks its engine by it


def _uri_for_run(run_id: str) -> str:
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run ID '{run_id}': no such run at {mlflow.get_tracking_uri()}; {GIVE}") from None
    logged = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
    if not logged:
        step = run.data.tags.get("step", "unknown step")
        raise ConfigError(f"run ID '{run_id}' ({step} run) holds no logged model; {GIVE}")
    return f"models:/{logged[0].model_id}"


def _check_runtime(ref: str, provider: str, flavor: str) -> None:
    """A model built for a GPU provider runs only where that provider's runtime package is installed."""
    if provider == "cpu":
        return
    package = ORT_PACKAGE[provider] if flavor == OPTIMUM_ROUTE.flavor else GENAI_PACKAGE[provider]
    try:
        installed = package not in ("onnxruntime-genai", "onnxruntime") and importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if not installed:
        raise ConfigError(f"'{ref}' is built for {provider}; evaluating it needs that device and "
                          f"{package}, and this environment runs cpu models")


def _model_info(uri: str):
    try:
        return mlflow.models.get_model_info(uri)
    except Exception as exc:  # any store or format error: the URI does not load
        raise ConfigError(f"'{uri}' does not load: {type(exc).__name__}: {str(exc)[:300]}; {GIVE}") from None


def _pin_alias(uri: str) -> str:
    """models:/name@alias as models:/name/<the version the alias names now>: the version evaluated is the one the
    gate promotes, though the alias moves meanwhile. Other URIs as given (an alias that names no version too:
    loading it says why)."""
    registered = REGISTERED.match(uri)
    if not registered or not registered.group(2) or registered.group(1).startswith("m-"):
        return uri
    name, alias = registered.group(1), registered.group(2)
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return uri
    return f"models:/{name}/{version.version}{uri[registered.end():]}"


def resolve(ref: str, key: str = "models") -> EvalModel:
    """A chat model of this project by run ID or URI; errors name the parameter `key` it came from."""
    try:
        return _resolve(ref.strip())
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _resolve(ref: str) -> EvalModel:
    if RUN_ID.match(ref):
        uri = _uri_for_run(ref)
    elif ":/" in ref or os.path.isdir(ref):
        uri = _pin_alias(ref)
    else:
        raise ConfigError(f"'{ref}' is neither a run ID (32 hex characters) nor a model URI; {GIVE}")
    info = _model_info(uri)
    meta = info.metadata or {}
    provider = "cpu"
    if "transformers" in info.flavors:
        if info.flavors["transformers"].get("inference_task") != TASK:
            raise ConfigError(f"'{ref}' is a transformers model without task {TASK}; log it with "
                              f"log_transformers")
        flavor, precision = TRANSFORMERS_FLAVOR, SHORT_DTYPE.get(meta.get("dtype", ""), meta.get("dtype", "?"))
        source_run = info.run_id
        default_name = transformers_registered_name(meta.get("model"), meta.get("device"), meta.get("dtype", "?"))
    elif "source_run_id" in meta and "execution_provider" in meta:
        route = route_for_format(meta.get("artifact_format"))
        flavor, precision, source_run = route.flavor, meta["precision"], meta["source_run_id"]
        provider = meta["execution_provider"]
        default_name = onnx_registered_name(meta["model"], meta["target"], route)
        _check_runtime(ref, meta["execution_provider"], flavor)
    else:
        raise ConfigError(f"'{ref}' is not a chat model of this project (log_pyfunc or log_transformers)")
    params = mlflow.get_run(source_run).data.params
    registered = REGISTERED.match(uri)
    name = registered.group(1) if registered and not registered.group(1).startswith("m-") else default_name
    return EvalModel(ref, uri, name, flavor, precision, info.run_id,
                     spec_from_source_params(meta.get("model", "model"), params), provider)


def resolve_all(refs: str) -> list[EvalModel]:
    models = [resolve(r) for r in refs.split(",") if r.strip()]
    if not models:
        raise ConfigError("models: give at least one run ID or model URI (comma-separated)")
    seen: dict[str, int] = {}
    for model in models:  # two models with one name get -2, -3 ... so their metric keys differ
        seen[model.name] = seen.get(model.name, 0) + 1
        if seen[model.name] > 1:
            model.name = f"{model.name}-{seen[model.name]}"
    return models
