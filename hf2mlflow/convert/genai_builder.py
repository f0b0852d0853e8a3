"""Run onnxruntime-genai's model builder in a subprocess and account for it.

A subprocess keeps the builder's memory out of the step (it is the step's peak by
far), shows its progress as it goes, and turns a kill (e.g. by the kernel's
out-of-memory killer) into an error instead of a silent exit. The optimum exporter
(hf2mlflow/convert/optimum_export.py) runs through the same `run_tool`.
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.contract import genai_version
from hf2mlflow.config import Target
from hf2mlflow.errors import StepError

REQUIRED_OUTPUTS = ("genai_config.json", "model.onnx")


class BuilderError(StepError):
    """The builder (or the optimum exporter) failed, was killed, or wrote an incomplete model."""


def builder_version() -> str:
    """The builder ships inside onnxruntime-genai: its version is the runtime's."""
    return genai_version()


@lru_cache(maxsize=1)
def supported_architectures() -> tuple[str, ...]:
    """Architectures the installed builder dispatches on, read from its source (importing it loads torch)."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    source = Path(spec.origin).read_text(encoding="utf-8")
    return tuple(sorted(set(re.findall(r'architectures\[0\] == "(\w+)"', source))))


def check_architecture(architecture: str, model_name: str) -> None:
    supported = supported_architectures()
    if architecture not in supported:
        raise BuilderError(
            f"model '{model_name}' has architecture {architecture}, which the onnxruntime-genai "
            f"{builder_version()} model builder does not support; supported: {', '.join(supported)}. "
            f"optimum exports many more architectures to ONNX (served with onnxruntime): convert with "
            f"-P exporter=optimum")


@dataclass(frozen=True)
class BuildResult:
    seconds: float
    peak_rss_bytes: int
    command: list[str]


def builder_command(source: Path, output: Path, cache: Path, target: Target, trust_remote_code: bool,
                    low_memory: bool = False, node_bits: Optional[Path] = None) -> list[str]:
    options = target.builder_options.as_cli() + [f"hf_remote={'true' if trust_remote_code else 'false'}"]
    # Both take the builder's own arguments (hf2mlflow/convert/lowmem_builder.py, hf2mlflow/convert/node_bits.py).
    if node_bits is not None:
        module = ["hf2mlflow.convert.node_bits", str(node_bits)] + (["--low_memory"] if low_memory else [])
    else:
        module = ["hf2mlflow.convert.lowmem_builder" if low_memory else "onnxruntime_genai.models.builder"]
    return [sys.executable, "-u", "-m", *module, "-i", str(source), "-o", str(output),
            "-p", target.precision, "-e", target.execution_provider, "-c", str(cache),
            "--extra_options", *options]


def _peak_rss_bytes(rusage) -> int:
    # ru_maxrss is in kilobytes on Linux and bytes on macOS. Linux carries the forking process's size across
    # exec into it, so this is the larger of the child's own peak and this process's size when it started the
    # child: exact for any conversion bigger than the step itself (a few hundred MiB), a floor below that.
    return rusage.ru_maxrss if sys.platform == "darwin" else rusage.ru_maxrss * 1024


def run_builder(source: Path, output: Path, cache: Path, target: Target, trust_remote_code: bool = False,
                low_memory: bool = False, log=print, node_bits: Optional[Path] = None) -> BuildResult:
    """`node_bits`: a JSON file of bit widths per MatMul (hf2mlflow/convert/node_bits.py)."""
    command = builder_command(source, output, cache, target, trust_remote_code, low_memory, node_bits)
    return run_tool(command, output, REQUIRED_OUTPUTS, "the model builder", "builder", log)


def run_tool(command: list[str], output: Path, required_outputs: tuple[str, ...], tool: str, prefix: str,
             log=print) -> BuildResult:
    """Run a conversion command, stream its output with `[prefix]`, and check that it wrote `required_outputs`
    in `output`; its own peak RSS comes from the kernel's accounting for that child."""
    log(f"[{prefix}] {' '.join(command[2:])}")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    start = time.perf_counter()
    # This project's package importable in the child too (a `mlflow run` of a git clone does not install it).
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            errors="replace")
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail.append(line)
            log(f"[{prefix}] {line}")
    # wait4 gives this child's own peak RSS, not that of every child this process ever had.
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes(rusage)
    last = "\n".join(list(tail)[-15:])
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        why = " (SIGKILL is what the kernel's out-of-memory killer sends)" if name == "SIGKILL" else ""
        raise BuilderError(f"{tool} was killed by {name}{why} after {seconds:.0f} s at "
                           f"{peak / 2**30:.1f} GiB peak RSS; its last output:\n{last}")
    if proc.returncode != 0:
        raise BuilderError(f"{tool} exited with status {proc.returncode}; its last output:\n{last}")
    missing = [f for f in required_outputs if not (output / f).is_file()]
    if missing:
        raise BuilderError(f"{tool} exited 0 but did not write {', '.join(missing)} in {output}; "
                           f"its last output:\n{last}")
    return BuildResult(seconds, peak, command)
