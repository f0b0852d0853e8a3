"""Whether the cuda targets can run here: a GPU that the NVIDIA driver shows, and CUDA builds of the runtimes.

Each check is cheap and says in words what is missing, so a caller can refuse before any expensive work starts.
"""

from __future__ import annotations

import ctypes
from typing import Optional

from hf2mlflow.contract import installed


def visible_gpus() -> int:
    """CUDA devices the driver shows this process (CUDA_VISIBLE_DEVICES applies); 0 without a driver.
    Asks the driver itself (libcuda), so it needs neither torch nor onnxruntime."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def genai_cuda_problem() -> Optional[str]:
    """Why onnxruntime-genai cannot run a cuda model here; None where it can."""
    try:
        import onnxruntime_genai as og

        has_cuda, module = og.is_cuda_available(), "onnxruntime_genai"
    except Exception as exc:  # a CUDA build whose libraries are missing fails to import
        has_cuda, module = False, f"onnxruntime_genai (does not import: {exc})"
    if not has_cuda:
        version = installed("onnxruntime-genai-cuda")
        return ("onnxruntime-genai has no CUDA execution provider (onnxruntime_genai.is_cuda_available() is False; "
                f"the module in use is {module}; "
                + (f"onnxruntime-genai-cuda {version} is installed, but another build's module is imported)"
                   if version else "the onnxruntime-genai-cuda package is not installed)"))
    if not visible_gpus():
        return ("the NVIDIA driver shows no GPU (libcuda.so.1 is missing, or it counts no device; "
                "CUDA_VISIBLE_DEVICES may hide them)")
    return None


def torch_cuda_problem() -> Optional[str]:
    """Why the transformers flavor cannot run on cuda here; None where it can."""
    import torch

    if torch.cuda.is_available():
        return None
    build = ("a CPU-only build" if torch.version.cuda is None
             else f"built for CUDA {torch.version.cuda}, but it finds no usable GPU or driver")
    return f"torch.cuda.is_available() is False (torch {torch.__version__}, {build})"


def cuda_problems() -> list[str]:
    """Everything that keeps the cuda targets and the transformers flavor on cuda from running here."""
    problems = []
    if problem := torch_cuda_problem():
        problems.append(f"{problem}: the transformers flavor cannot run on cuda")
    if problem := genai_cuda_problem():
        problems.append(f"{problem}: the cuda ONNX models cannot run")
    return problems


def install_hint() -> str:
    """What a user does to run the cuda targets, in one sentence."""
    version = installed("onnxruntime-genai") or installed("onnxruntime-genai-cuda") or "VERSION"
    return ("on a machine with an NVIDIA GPU and its driver, install a CUDA build of torch and onnxruntime-genai-cuda "
            "of the same version in place of onnxruntime-genai (pip uninstall -y onnxruntime-genai && pip install "
            f"onnxruntime-genai-cuda=={version}: both provide the onnxruntime_genai module)")
