"""benchmarks/suite.py, setup: what each --device benchmarks, whether it can run, and the models compared.

The models are converted and logged into a temporary MLflow store (`models_store`), never the user's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# What each --device benchmarks. onnx: the shipped targets converted and logged, the int4 one first (the bare loop,
# serving and prompt lengths use it) and the widest last (its logits are compared with PyTorch's); transformers: the
# flavor's dtypes on that device (bfloat16 only where the hardware has it, and not with --quick); env: set for the
# measuring processes (on cpu no GPU is visible: MLflow would load the transformers flavor onto one where it is).
DEVICES = {
    "cpu": {"onnx": ["cpu-int4", "cpu-int8", "cpu-fp32"], "transformers": ["float32", "bfloat16"],
            "env": {"CUDA_VISIBLE_DEVICES": ""}},
    "cuda": {"onnx": ["cuda-int4", "cuda-fp16"], "transformers": ["float16", "bfloat16"], "env": {}},
}

QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Explain what a hash function does in one sentence.", "Give me a short tip for learning to cook."]


@dataclass
class Inputs:
    """What one suite run measures: the source model and the prompts asked of it."""

    source: Path
    label: str
    tokenizer: object
    lengths: list[int]  # prompt lengths, in tokens, for section 6
    prompts: list[list[dict]]
    bf16: bool  # the transformers flavor in bfloat16 too


def inputs(args) -> Inputs:
    """The model and prompts for these arguments; --quick: tiny-phi3, one round of 256 new tokens, 3 prompts."""
    from transformers import AutoTokenizer

    from hf2mlflow.sources.tiny import phi3_mini_shape_path, tiny_model_path

    if args.quick:
        # A pyfunc decodes 32 tokens of tiny-phi3 in about 2 ms, less than the jitter of the separate one-token
        # request that times its first token on a busy machine: 256 keep the decode time above it.
        args.rounds, args.max_tokens = 1, 256
    source = tiny_model_path("tiny-phi3") if args.quick else phi3_mini_shape_path(args.layers)
    label = "tiny-phi3" if args.quick else f"Phi-3-mini-shaped model, {args.layers} layers, bf16 checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(source)
    context = 2048 if args.quick else 4096
    lengths = [64, 512, 1536] if args.quick else [64, 1024, 3000]
    assert max(lengths) + args.max_tokens < context
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[: 3 if args.quick else len(QUESTIONS)]]
    return Inputs(source, label, tokenizer, lengths, prompts, has_bf16(args.device) and not args.quick)


@contextlib.contextmanager
def models_store(device: str, user_tracking_uri: str):
    """A temporary folder and MLflow store for the models compared; the user's tracking URI is back afterwards.
    Sets DEVICES[device]["env"] for the measuring processes."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="hf2mlflow-bench-") as work:
        work = Path(work)
        os.environ["MLFLOW_TRACKING_URI"] = store = f"sqlite:///{work}/models.db"
        mlflow.set_tracking_uri(store)
        os.environ.update(DEVICES[device]["env"])
        try:
            yield work
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = user_tracking_uri
            mlflow.set_tracking_uri(user_tracking_uri)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def has_bf16(device: str) -> bool:
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def prepare_models(source: Path, work: Path, device: str, bf16: bool) -> dict:
    """Convert and log every model compared into a temporary store; returns name -> info."""
    import mlflow
    import yaml

    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
    from hf2mlflow.contract import SHORT_DTYPE
    from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers
    from hf2mlflow.measure import BARE, SERVED
    from hf2mlflow.runtime.manifest import folder_bytes

    models = {}
    for target in DEVICES[device]["onnx"]:
        print(f"[setup] converting and logging {target}", flush=True)
        run_id = convert(ConvertArgs(model=str(source), target=target))
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run_id))
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / target)))
        conversion = conversion_figures(run_id, source)
        models[f"onnx-{target.split('-')[1]}"] = {
            "kind": SERVED, "path": str(path), "uri": uri, "size_bytes": conversion["size_bytes"],
            "conversion": conversion, "target": target}
    models["genai-int4 (bare)"] = {**models["onnx-int4"], "kind": BARE}
    for dtype in [d for d in DEVICES[device]["transformers"] if d != "bfloat16" or bf16]:
        print(f"[setup] logging the transformers flavor ({dtype} on {device})", flush=True)
        target = work / f"{device}-{dtype}.yaml"
        target.write_text(yaml.safe_dump({"description": f"transformers {dtype} on {device} (benchmark)",
                                          "execution_provider": device, "precision": "fp32",
                                          "transformers": {"device": device, "dtype": dtype}}))
        uri = log_transformers(LogTransformersArgs(model=str(source), target=str(target),
                                                   registered_model_name=f"bench-transformers-{dtype}"))
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / f"transformers-{dtype}")))
        models[f"transformers-{SHORT_DTYPE[dtype]}"] = {
            "kind": SERVED, "path": str(path), "uri": uri, "size_bytes": folder_bytes(path)}
    return models


def conversion_figures(run_id: str, source: Path) -> dict:
    """A convert_onnx run's time, builder peak and output size, and the peak against the checkpoint's size."""
    import mlflow

    from hf2mlflow.convert.memory_plan import checkpoint_size

    run = mlflow.get_run(run_id)
    m = run.data.metrics
    return {"seconds": m["conversion_seconds"], "peak_rss_gib": m["builder_peak_rss_bytes"] / 2**30,
            "peak_over_checkpoint": m["builder_peak_rss_bytes"] / checkpoint_size(source).stored_bytes,
            "size_bytes": int(m["artifact_bytes"]), "size_mib": m["artifact_bytes"] / 2**20,
            "builder_path": run.data.params.get("builder_path", "standard")}


def full_size_conversion(device: str, stand_in: Path | None = None) -> tuple[str, dict]:
    """The int4 conversion of the full-size model (bf16 checkpoint, as published), by the path `auto` picks;
    `stand_in` takes its place (--quick: tiny-phi3, so that the option cannot rot)."""
    from hf2mlflow.convert.memory_plan import checkpoint_size
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.sources.tiny import phi3_mini_shape_path

    source = stand_in or phi3_mini_shape_path(32)
    target, layers = DEVICES[device]["onnx"][0], json.loads((source / "config.json").read_text())["num_hidden_layers"]
    print(f"[setup] converting the full-size model ({layers} layers) to {target}", flush=True)
    figures = conversion_figures(convert(ConvertArgs(model=str(source), target=target)), source)
    return f"onnx-int4, {layers} layers ({checkpoint_size(source).parameters / 1e9:.2f} B)", figures


def prompt_of_length(tokenizer, tokens: int) -> list[dict]:
    """A user message whose chat prompt is about `tokens` tokens long."""
    words = (PROJECT_ROOT / "hf2mlflow" / "sources" / "data" / "tiny_corpus.txt").read_text(encoding="utf-8").split()

    def length(n):
        messages = [{"role": "user", "content": " ".join(words[i % len(words)] for i in range(n))}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)), messages

    low, high = 1, tokens  # a word is at least one token
    while low < high:
        mid = (low + high + 1) // 2
        if length(mid)[0] <= tokens:
            low = mid
        else:
            high = mid - 1
    return length(low)[1]
