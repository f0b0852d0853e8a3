"""What the steps agree on: step names, artifact paths, routes, runtime packages and registered-model names.

Steps never import each other; a step reads another step's runs through these names only.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

CONVERT_STEP = "convert_onnx"
LOG_PYFUNC_STEP = "log_pyfunc"
LOG_TRANSFORMERS_STEP = "log_transformers"
EVALUATE_STEP = "evaluate"
# The steps of `main`, in the order they run.
CHAIN_ORDER = (CONVERT_STEP, LOG_PYFUNC_STEP, LOG_TRANSFORMERS_STEP, EVALUATE_STEP)

# Artifacts of a convert_onnx run.
ONNX_ARTIFACT_PATH = "onnx"
TARGET_ARTIFACT = "target.json"
MANIFEST_ARTIFACT = "manifest.json"

# The task the transformers flavor logs chat models with.
TRANSFORMERS_TASK = "llm/v1/chat"
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# PyPI's Linux torch wheels are CUDA builds (GBs of CUDA packages); CPU targets take the CPU-only index.
TORCH_CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
# The runtime package for each execution provider (the DirectML build lags behind the others).
GENAI_PACKAGE = {"cpu": "onnxruntime-genai", "webgpu": "onnxruntime-genai", "cuda": "onnxruntime-genai-cuda",
                 "dml": "onnxruntime-genai-directml"}
# The onnxruntime package for each provider an optimum export is served on (onnxruntime-gpu has CUDA and CPU).
ORT_PACKAGE = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu"}


def installed(package: str) -> str:
    """The package's version; '' where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def genai_version() -> str:
    """The version of whichever onnxruntime-genai build provides the module (onnxruntime-genai, -cuda or
    -directml: each installs `onnxruntime_genai`, in place of the others)."""
    (distribution, *_) = importlib.metadata.packages_distributions().get("onnxruntime_genai", ["onnxruntime-genai"])
    return importlib.metadata.version(distribution)


@dataclass(frozen=True)
class Route:
    """One way from a Hugging Face model to ONNX, under every name it goes by."""

    exporter: str  # convert_onnx's `exporter` option and run tag
    artifact_format: str  # the conversion run's tag and the logged model's metadata: picks the serving engine
    flavor: str  # evaluate's name for models of this route
    name_suffix: str  # in run and registered-model names, so the routes of one model and target sit side by side


GENAI_ROUTE = Route("genai-builder", "onnxruntime-genai", "onnx", "")
OPTIMUM_ROUTE = Route("optimum", "optimum-onnx", "optimum-onnx", "-optimum")
ROUTES = (GENAI_ROUTE, OPTIMUM_ROUTE)
TRANSFORMERS_FLAVOR = "transformers"


def route_for_exporter(exporter: str) -> Route:
    return next(r for r in ROUTES if r.exporter == exporter)


def route_for_format(artifact_format: str | None) -> Route:
    """Runs without the tag predate the optimum route: they are builder models."""
    return next((r for r in ROUTES if r.artifact_format == artifact_format), GENAI_ROUTE)


def conversion_name(model: str, target: str, route: Route) -> str:
    """convert_onnx's default run name."""
    return f"{model}-{target}{route.name_suffix}"


def onnx_registered_name(model: str, target: str, route: Route) -> str:
    """log_pyfunc's default registered-model name."""
    return f"{conversion_name(model, target, route)}-onnx"


def transformers_registered_name(model: str, device: str, dtype: str) -> str:
    """log_transformers' default registered-model name (dtype as torch names it, e.g. float32)."""
    return f"{model}-{device}-{SHORT_DTYPE.get(dtype, dtype)}-transformers"
