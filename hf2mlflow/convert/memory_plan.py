"""How much memory a model-builder conversion needs, and which builder path fits a memory budget.

The estimates come from the checkpoint's own numbers (parameter count and stored dtype, read from the
safetensors headers without loading a weight) and per-path factors measured with benchmarks/convert_memory.py
on a model of Phi-3-mini's width (docs/convert.md). They decide before the builder starts:
a conversion that cannot fit stops with what it needs instead of being killed by the kernel half-way.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

from hf2mlflow.errors import ConfigError, StepError

BUILDER_MEMORY_MODES = ("auto", "standard", "low")
GIB = 2**30
# Bytes per stored value for the safetensors dtypes a causal LM checkpoint uses.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Python, torch, onnxruntime and the builder's own code before any weight is loaded (measured: about 0.7 GiB).
BASE_BYTES = 1 * GIB
LOW_BASE_BYTES = int(1.2 * GIB)  # the same, plus the quantizer's own imports
# Quantized bytes per parameter written by the builder (weights, scales, and the float embedding and norms
# for a Phi-3-mini shape), measured on its output.
OUTPUT_BYTES_PER_PARAM = {"int4": 0.65, "int8": 1.15, "fp16": 2.0, "bf16": 2.0, "fp32": 4.0}
# The standard builder holds the float32 model and, for int4/int8, a second float32 copy of the whole graph for
# the quantizer: peak about 2.7x the float32 checkpoint on the 4-layer Phi-3-mini shape.
STANDARD_FP32_FACTOR = {"int4": 2.7, "int8": 2.7, "fp16": 1.6, "bf16": 1.6, "fp32": 1.3}


class MemoryBudgetError(StepError):
    """The conversion needs more memory than the budget allows."""


@dataclass(frozen=True)
class CheckpointSize:
    parameters: int
    stored_bytes: int  # in the checkpoint's own dtype(s)
    largest_parameters: int = 0  # of the largest tensor (the embedding or the output layer, for an LM)


@dataclass(frozen=True)
class MemoryPlan:
    path: str  # "standard" or "low"
    estimated_bytes: int
    standard_bytes: int
    low_bytes: int
    budget_bytes: int
    checkpoint: CheckpointSize

    def params(self) -> dict:
        return {"builder_path": self.path, "checkpoint_parameters": self.checkpoint.parameters}

    def metrics(self) -> dict:
        return {"checkpoint_bytes": self.checkpoint.stored_bytes, "memory_budget_bytes": self.budget_bytes,
                "estimated_peak_rss_bytes": self.estimated_bytes}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def checkpoint_size(folder: Path) -> CheckpointSize:
    """Parameters and stored bytes of a Hugging Face checkpoint folder, from its safetensors headers."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        # .bin checkpoints carry no header to read without unpickling: count their bytes as float32 values.
        # The largest tensor is unknown there: take a tenth of the model, more than any LM's embedding.
        stored = sum(p.stat().st_size for p in Path(folder).glob("*.bin"))
        return CheckpointSize(stored // 4, stored, stored // 40)
    parameters = stored = largest = 0
    for file in files:
        for name, entry in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = math.prod(entry["shape"])
            parameters += count
            stored += count * DTYPE_BYTES.get(entry["dtype"], 4)
            largest = max(largest, count)
    return CheckpointSize(parameters, stored, largest)


def estimate(size: CheckpointSize, precision: str) -> tuple[int, int]:
    """(standard, low) estimated peak RSS of the builder process, in bytes."""
    fp32 = size.parameters * 4
    output = size.parameters * OUTPUT_BYTES_PER_PARAM[precision]
    standard = BASE_BYTES + STANDARD_FP32_FACTOR[precision] * fp32
    # The low-memory path holds the checkpoint as stored (the weights it has quantized are not all handed back
    # to the system) and the quantized model as it grows; onnxruntime's quantizer needs about four float32
    # copies of the tensor in hand, the output layer's at the end. Measured: 4.1 GiB for 4 layers, 10.1 GiB
    # for 32 (benchmarks/results/convert_memory_*.json; this formula estimates 4.1 and 10.9). Float targets keep
    # every stored weight and its cast copy.
    in_flight = 4 * 4 * size.largest_parameters
    held = size.stored_bytes + (0.5 * output if precision in ("int4", "int8") else output)
    low = LOW_BASE_BYTES + held + in_flight
    return int(standard), int(low)


def check_options(mode: str, budget_gib: float) -> None:
    """The step's memory options, checked before any run starts."""
    if mode not in BUILDER_MEMORY_MODES:
        raise ConfigError(f"builder_memory '{mode}' is not allowed; allowed: {', '.join(BUILDER_MEMORY_MODES)}")
    if budget_gib < 0:
        raise ConfigError(f"memory_budget_gib must be 0 (the memory available) or positive, got {budget_gib}")


def plan(size: CheckpointSize, precision: str, mode: str, budget_gib: float) -> MemoryPlan:
    """Pick the builder path for `mode` (checked by check_options) within the budget (0: the memory available
    now), or say what it needs."""
    available = psutil.virtual_memory().available
    budget = int(budget_gib * GIB) if budget_gib > 0 else available
    standard, low = estimate(size, precision)
    if mode == "auto":
        path = "standard" if standard <= budget or standard <= low else "low"
    else:
        path = mode
    needed = standard if path == "standard" else low
    if needed > budget:
        hint = (" the low-memory builder (-P builder_memory=low) needs about "
                f"{low / GIB:.1f} GiB;" if path == "standard" and low < standard else "")
        raise MemoryBudgetError(
            f"converting a {size.parameters / 1e9:.2f} B-parameter checkpoint ({size.stored_bytes / GIB:.1f} GiB "
            f"stored) to {precision} with the {path} builder needs about {needed / GIB:.1f} GiB, more than the "
            f"memory budget of {budget / GIB:.1f} GiB (available now: {available / GIB:.1f} GiB);{hint} free "
            f"memory, raise -P memory_budget_gib if the estimate is too cautious for your machine, or convert on "
            f"a machine with more memory")
    return MemoryPlan(path, needed, standard, low, budget, size)
