"""Every cuda path of the project, run on an NVIDIA GPU in one command, with one JSON report and one log.

    python -m benchmarks.cuda_check --out DIR   # a machine with a GPU, torch with CUDA and onnxruntime-genai-cuda
    bash benchmarks/cuda_check.sh               # a bare GPU machine without network, from the carried pack
                                                # (benchmarks/cuda_check_pack.py says how to make and carry it)
    python -m benchmarks.cuda_check --fp16-baseline  # no GPU: PyTorch float16 against float32, vs the tolerance

For tiny-phi3 and, where its GGUF file is cached, the trained SmolLM2-135M-Instruct:
1. convert_onnx to cpu-fp32 (the reference), cuda-fp16 and cuda-int4; the cuda models generate on the GPU in the
   step's own validation;
2. log_pyfunc of each cuda model, loaded through MLflow onto the GPU (the GPU memory it takes is measured), chatting.
   Against the source model in PyTorch float32 on the CPU, on the same prompt ids: fp16's next-token logits lie
   within fp16_logits_tolerance, and its greedy tokens are the reference's up to the first near tie (a step where
   the reference's top two logits are closer than that tolerance: from there either continuation is right); where
   they agree in full, its chat text through the pyfunc is the cpu-fp32 pyfunc's. int4 is held to no equality
   (4-bit weights change answers): its agreement is reported;
3. log_transformers with the cuda-fp16 target (float16 on the GPU), loaded through MLflow onto the GPU, chatting;
   then the cuda int4 and fp16 pyfuncs and the transformers flavor side by side: tokens/s of greedy answers,
   interleaved, median of 3 rounds, and the ratios to the transformers flavor;
4. python -m benchmarks.suite --device cuda --quick, then the 4-layer Phi-3-mini-shaped run (one round) if time is left.

Writes DIR/cuda_check.json (each stage: passed or failed, its figures, its error; rewritten after every stage) and
DIR/cuda_check.log (all output), DIR/suite-quick/ and DIR/suite/ (suite-cuda.{md,json,png}). Exit 1 when a stage
failed; exit 2, writing nothing, where no GPU or no CUDA build is (it says which).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hf2mlflow.cuda import cuda_problems, install_hint

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Name three primary colours."}]]
NEW_TOKENS = 16
TRAINED = "smollm2-135m-instruct"


def fp16_logits_tolerance(reference) -> float:
    """What float16 weights and activations may move a next-token logit from float32's: 0.01 plus 2% of the largest
    logit. PyTorch's own float16 takes at most 19% of it on the trained model and 2% on tiny-phi3 (--fp16-baseline);
    a wrong graph moves logits by whole units."""
    import numpy as np

    return 0.01 + 0.02 * float(np.max(np.abs(reference)))


def judge_fp16(first_divergence, margin, tolerance: float) -> tuple[bool, str]:
    """Whether fp16 greedy tokens may part from fp32's where they do: only at a near tie of the reference (its top
    two logits at that step closer than `tolerance`)."""
    if first_divergence is None:
        return True, "greedy tokens equal"
    if margin <= tolerance:
        return True, (f"equal up to token {first_divergence}, a near tie (fp32 top-2 margin {margin:.3g} <= "
                      f"{tolerance:.3g})")
    return False, (f"greedy tokens part at token {first_divergence}, where fp32's top two logits are {margin:.3g} "
                   f"apart (more than the tolerance {tolerance:.3g})")


def top2_margin(logits) -> float:
    import numpy as np

    second, first = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(first - second)


def fp16_baseline() -> int:
    """PyTorch's own float16 against its float32 on the CPU (no GPU needed), along the greedy path: how much of
    fp16_logits_tolerance plain float16 rounding takes."""
    import numpy as np

    from hf2mlflow.parity import TorchModel

    models = ["tiny-phi3", *([TRAINED] if trained_cached() else [])]
    print("| model | prompt | largest logit | max diff, first step | tolerance | worst diff / tolerance, "
          f"{NEW_TOKENS} tokens | greedy equal |\n|---|---|---|---|---|---|---|")
    for model in models:
        reference, half = TorchModel.from_folder(source_folder(model)), TorchModel.from_folder(source_folder(model))
        half.model.half()
        for messages in PROMPTS:
            ids = reference.prompt_ids(messages)
            tokens, worst, first = reference.greedy(ids, NEW_TOKENS), 0.0, None
            for k in range(len(tokens) + 1):
                expected = reference.next_logits(ids + tokens[:k])
                diff = float(np.max(np.abs(expected - half.next_logits(ids + tokens[:k]))))
                first = (float(np.max(np.abs(expected))), diff, fp16_logits_tolerance(expected)) if k == 0 else first
                worst = max(worst, diff / fp16_logits_tolerance(expected))
            print(f"| {model} | {messages[0]['content']} | {first[0]:.1f} | {first[1]:.4f} | {first[2]:.3f} | "
                  f"{worst:.2f} | {half.greedy(ids, NEW_TOKENS) == tokens} |")
    return 0


class Check:
    """The report: one entry per stage, written after each so a stopped run still leaves what it did."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "stages": {}}
        self.failed = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"\n[cuda-check] {name}", flush=True)
        entry, start = {}, time.monotonic()
        try:
            yield entry
            entry["passed"] = True
        except Exception as exc:
            self.failed = True
            entry.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                         traceback=traceback.format_exc()[-3000:])
            print(f"[cuda-check] FAILED {name}: {entry['error']}", flush=True)
        finally:
            entry["seconds"] = round(time.monotonic() - start, 1)
            self.report["stages"][name] = entry
            self.write()

    def write(self) -> None:
        self.report["passed"] = not self.failed
        (self.out / "cuda_check.json").write_text(json.dumps(self.report, indent=1, default=str))


def machine() -> dict:
    import torch

    from hf2mlflow.contract import genai_version, installed

    props = torch.cuda.get_device_properties(0)
    smi = shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True).stdout.strip()
    versions = {p: installed(p) for p in ("mlflow", "onnxruntime-gpu", "transformers", "tokenizers", "numpy")}
    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "nvidia_smi": smi or "",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "onnxruntime-genai": genai_version(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions}


def gpu_free_bytes() -> int:
    import torch

    return torch.cuda.mem_get_info()[0]


def chat(model, messages, max_tokens: int = NEW_TOKENS) -> str:
    answer = model.predict({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
    return answer[0]["choices"][0]["message"]["content"]


def source_folder(model: str) -> Path:
    from hf2mlflow.config import load_model
    from hf2mlflow.sources.resolve import resolve_model

    return resolve_model(load_model(model)).path


def trained_cached() -> bool:
    """Whether the trained model's GGUF file is in the project's cache (this check never reaches a registry)."""
    from hf2mlflow.config import load_model
    from hf2mlflow.sources.gguf import package_file_path

    package = load_model(TRAINED).package
    return package_file_path(package.sha256, package.file).is_file()


def onnx_parity(source: Path, onnx_dir: Path, precision: str) -> dict:
    """The cuda model's greedy tokens and next-token logits against PyTorch float32 on the CPU (same prompt ids)."""
    import numpy as np

    from hf2mlflow.parity import GenAIModel, PromptParity, TorchModel

    reference, candidate = TorchModel.from_folder(source), GenAIModel(onnx_dir)
    prompts = []
    for messages in PROMPTS:
        ids = reference.prompt_ids(messages)
        result = PromptParity(reference.greedy(ids, NEW_TOKENS), candidate.greedy(ids, NEW_TOKENS))
        expected = reference.next_logits(ids)
        diff, tolerance = float(np.max(np.abs(expected - candidate.next_logits(ids)))), fp16_logits_tolerance(expected)
        decode = reference.tokenizer.decode
        entry = {"prompt": messages[0]["content"], "reference_text": decode(result.reference_tokens),
                 "text": decode(result.tokens), "first_divergence": result.first_divergence,
                 "matched_share": result.matched_share, "logits_max_abs_diff": diff, "fp16_tolerance": tolerance}
        if precision == "fp16":
            d = result.first_divergence
            margin = None if d is None else top2_margin(reference.next_logits(ids + result.reference_tokens[:d]))
            ok, why = judge_fp16(d, margin, tolerance)
            if diff > tolerance:
                ok, why = False, f"next-token logits differ by up to {diff:.3g} (tolerance {tolerance:.3g}); {why}"
            entry.update(passed=ok, verdict=why)
        prompts.append(entry)
        print(f"[parity] {precision} {messages[0]['content']!r}: {entry.get('verdict', '')} "
              f"(logits max |diff| {diff:.3g}; matched {result.matched_share:.0%})", flush=True)
    return {"prompts": prompts}


def check_model(check: Check, model: str) -> dict:
    """Stages 1 and 2 for one model; returns the cuda pyfuncs loaded (name -> model) for the speed stage."""
    import mlflow

    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    runs = {}
    for target in ("cpu-fp32", "cuda-fp16", "cuda-int4"):
        with check.stage(f"{model} convert {target}") as entry:
            runs[target] = convert(ConvertArgs(model=model, target=target))
            run = mlflow.get_run(runs[target])
            entry.update(run_id=runs[target], validation=run.data.tags.get("validation", ""),
                         conversion_seconds=run.data.metrics.get("conversion_seconds"),
                         artifact_mib=round(run.data.metrics.get("artifact_bytes", 0) / 2**20, 1))
            if target.startswith("cuda") and entry["validation"] != "graph checked; generated on cuda":
                raise RuntimeError(f"the step did not generate on the GPU: {entry['validation']}")
    texts, source, kept = {}, source_folder(model), {}
    for target in ("cpu-fp32", "cuda-fp16", "cuda-int4"):
        if target not in runs:
            continue
        with check.stage(f"{model} log_pyfunc {target}, load and chat") as entry:
            uri = log_pyfunc(LogPyfuncArgs(convert_run_id=runs[target]))
            free = gpu_free_bytes()
            loaded = mlflow.pyfunc.load_model(uri)
            entry["gpu_mib_taken_by_load"] = round((free - gpu_free_bytes()) / 2**20)
            texts[target] = [chat(loaded, messages) for messages in PROMPTS]
            entry.update(uri=uri, answers=texts[target])
            print(f"[chat] {target}: {texts[target]}", flush=True)
            if not all(t.strip() for t in texts[target]):
                raise RuntimeError(f"an empty answer: {texts[target]}")
            if target == "cpu-fp32":
                continue
            if entry["gpu_mib_taken_by_load"] <= 0:
                raise RuntimeError("loading the model took no GPU memory: it did not load onto the GPU")
            kept[f"onnx {target}"] = loaded
            onnx_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{runs[target]}/onnx"))
            entry["parity"] = onnx_parity(source, onnx_dir, target.split("-")[1])
            if target == "cuda-fp16":
                failed = [p["verdict"] for p in entry["parity"]["prompts"] if not p["passed"]]
                if failed:
                    raise RuntimeError("fp16 against PyTorch float32: " + "; ".join(failed))
                equal = [p["first_divergence"] is None for p in entry["parity"]["prompts"]]
                for same, ours, theirs in zip(equal, texts[target], texts.get("cpu-fp32", [])):
                    if same and ours != theirs:
                        raise RuntimeError(f"equal greedy tokens, yet the pyfunc's text differs from the cpu-fp32 "
                                           f"pyfunc's: {ours!r} vs {theirs!r}")
    return kept


def check_transformers(check: Check, model: str) -> dict:
    """Stage 3 for one model; returns the loaded pyfunc (name -> model) for the speed stage."""
    import mlflow
    import torch

    from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers

    with check.stage(f"{model} log_transformers cuda-fp16, load onto the GPU and chat") as entry:
        uri = log_transformers(LogTransformersArgs(model=model, target="cuda-fp16"))
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        loaded = mlflow.pyfunc.load_model(uri)
        entry["torch_gpu_mib_taken_by_load"] = round((torch.cuda.memory_allocated() - allocated) / 2**20)
        pipeline = getattr(getattr(loaded, "_model_impl", None), "pipeline", None)
        entry["device"] = str(pipeline.model.device) if pipeline is not None else ""
        entry["dtype"] = str(pipeline.model.dtype) if pipeline is not None else ""
        entry.update(uri=uri, answers=[chat(loaded, messages) for messages in PROMPTS])
        print(f"[chat] transformers float16: {entry['answers']} on {entry['device']}", flush=True)
        if not entry["device"].startswith("cuda") or entry["torch_gpu_mib_taken_by_load"] <= 0:
            raise RuntimeError(f"the transformers flavor did not load onto the GPU (device {entry['device']!r}, "
                               f"{entry['torch_gpu_mib_taken_by_load']} MiB taken)")
        if not all(a.strip() for a in entry["answers"]):
            raise RuntimeError(f"an empty answer: {entry['answers']}")
        return {"transformers float16": loaded}
    return {}


def check_speed(check: Check, model: str, loaded: dict, rounds: int = 3, max_tokens: int = 64) -> None:
    """The loaded models side by side on the GPU, through their pyfuncs in this process: one greedy answer per
    model per round, the models interleaved, after a warm-up answer each; the median tokens/s per model and its
    ratio to the transformers flavor's."""
    if not loaded:
        return
    with check.stage(f"{model} speed on the GPU, side by side") as entry:
        request = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                   "max_tokens": max_tokens, "temperature": 0.0}
        rates, tokens = {name: [] for name in loaded}, {}
        for pyfunc in loaded.values():  # warm-up
            pyfunc.predict(request)
        for _ in range(rounds):
            for name, pyfunc in loaded.items():
                start = time.perf_counter()
                answer = pyfunc.predict(request)[0]
                tokens[name] = answer["usage"]["completion_tokens"]
                rates[name].append(tokens[name] / (time.perf_counter() - start))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        base = medians.get("transformers float16")
        entry["tokens_per_s"] = {name: {"median": round(m, 1), "min": round(min(rates[name]), 1),
                                        "max": round(max(rates[name]), 1),
                                        "vs_transformers_float16": round(m / base, 2) if base else None,
                                        "completion_tokens": tokens[name]}
                                 for name, m in medians.items()}
        entry.update(rounds=rounds, max_tokens=max_tokens)
        for name, figures in entry["tokens_per_s"].items():
            print(f"[speed] {model} {name}: {figures}", flush=True)


def run_suite(check: Check, name: str, extra: list[str], need_s: float) -> None:
    """python -m benchmarks.suite --device cuda in its own process; stopped at the time budget (said, not failed)."""
    out = check.out / name
    with check.stage(f"suite {name}") as entry:
        timeout = check.left() - 15
        if timeout < need_s:
            entry["not_run"] = f"{check.left():.0f} s of the time budget left; it needs about {need_s:.0f}"
            print(f"[cuda-check] {entry['not_run']}: not run", flush=True)
            return
        command = [sys.executable, "-m", "benchmarks.suite", "--device", "cuda", "--output_dir", str(out),
                   *extra]
        entry["command"] = " ".join(command[1:])
        try:
            proc = subprocess.run(command, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            entry["not_finished"] = f"stopped at the time budget after {timeout:.0f} s"
            print(f"[cuda-check] suite {name}: {entry['not_finished']}", flush=True)
            return
        if proc.returncode:
            raise RuntimeError(f"python -m benchmarks.suite exited {proc.returncode}")
        entry["results"] = json.loads((out / "suite-cuda.json").read_text())


@contextlib.contextmanager
def tee_output(log: Path):
    """Everything this process and its children write (C libraries too) goes to the log as well; the log is
    complete when this returns."""
    tee = subprocess.Popen(["tee", "-a", str(log)], stdin=subprocess.PIPE)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(tee.stdin.fileno(), 1)
    os.dup2(tee.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        tee.stdin.close()
        tee.wait()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="folder for cuda_check.json, cuda_check.log and the suite's files")
    parser.add_argument("--budget-s", type=float, default=520,
                        help="seconds the whole check may take; the suite runs only within what is left")
    parser.add_argument("--no-suite", action="store_true", help="skip stage 4 (python -m benchmarks.suite)")
    parser.add_argument("--fp16-baseline", action="store_true",
                        help="no GPU needed: print how far PyTorch's own float16 is from float32 against the "
                             "fp16 tolerance, and stop")
    args = parser.parse_args(argv)
    if args.fp16_baseline:
        return args
    if not args.out:
        parser.error("--out is required (the folder for the report, the log and the suite's files)")
    if problems := cuda_problems():
        print("benchmarks/cuda_check.py: error: the CUDA check needs an NVIDIA GPU, torch with CUDA and "
              "onnxruntime-genai-cuda; here:\n" + "".join(f"  - {p}\n" for p in problems)
              + f"Nothing was run and nothing was written. To run it: {install_hint()}, then run this again; on a "
                "bare GPU machine without network, see benchmarks/cuda_check_pack.py.", file=sys.stderr)
        raise SystemExit(2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fp16_baseline:
        return fp16_baseline()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tee_output(out / "cuda_check.log"):
        check = Check(out, args.budget_s)
        print(f"[cuda-check] {json.dumps(check.report['machine'])}", flush=True)
        with tempfile.TemporaryDirectory(prefix="cuda-check-") as store:
            import mlflow

            os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{store}/mlflow.db"
            mlflow.set_tracking_uri(uri)
            models = ["tiny-phi3", *([TRAINED] if trained_cached() else [])]
            check.report["models"] = models
            if TRAINED not in models:
                print(f"[cuda-check] {TRAINED}: its GGUF file is not cached; only tiny-phi3 is checked", flush=True)
            for model in models:
                loaded = {**check_model(check, model), **check_transformers(check, model)}
                check_speed(check, model, loaded)
                del loaded
            if not args.no_suite:
                run_suite(check, "suite-quick", ["--quick"], need_s=60)
                run_suite(check, "suite", ["--rounds", "1"], need_s=240)
        check.write()
        stages = check.report["stages"].values()
        print(f"\n[cuda-check] {sum(s['passed'] for s in stages)} of {len(stages)} stages passed on "
              f"{check.report['machine']['gpu']}; "
              f"report: {out / 'cuda_check.json'}, log: {out / 'cuda_check.log'}", flush=True)
        return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
