"""How fast, how big, how much memory: the project's models against the alternatives, measured in one run.

    python -m benchmarks.suite                   # 4-layer Phi-3-mini-shaped model (about 15 minutes on 2 cores)
    python -m benchmarks.suite --layers 32       # the full 3.8 B model
    python -m benchmarks.suite --full-conversion # and convert the full 32-layer model too (section 5)
    python -m benchmarks.suite --quick           # tiny-phi3, a smoke run (the test suite runs this)
    python -m benchmarks.suite --update-docs     # and rewrite docs/performance.md's suite block from this run
    python -m benchmarks.suite --device cuda     # the cuda targets on an NVIDIA GPU (see suite_setup.DEVICES)

What it compares, all on the same prompts and numbers of new tokens:
1. the logged ONNX pyfunc through MLflow vs a bare onnxruntime-genai loop on the same files (the wrapper's price);
2. the ONNX int4 pyfunc vs the transformers flavor in float32, and bfloat16 where the CPU has bf16 instructions
   (with --device cuda: float16, and bfloat16 where the GPU has it);
3. ONNX int4 vs int8 vs fp32 (cuda: int4 vs fp16): speed, size, greedy-token agreement with PyTorch;
4. `mlflow models serve` with 1, 4, 8 and 16 concurrent clients;
5. conversion: time and builder peak RSS against the checkpoint's size; with --full-conversion also the full
   32-layer model in bf16, as published (benchmarks/convert_memory.py compares the two builder paths);
6. time to first token for prompts of about 64, 1024 and 3000 tokens;
7. llama.cpp beside our conversions on the same trained weights (SmolLM2-135M-Instruct, the shipped Q4_1 GGUF;
   benchmarks/llama_cpp_peer.py, fewer rounds, no quality pass; --quick: llama.cpp Q4_1 alone), where
   llama-cpp-python is installed (`pip install '.[llama]'`); elsewhere one line says it is skipped.

Every model answers in fresh processes (its own load time and peak RSS), in rounds that interleave the models
(A, B, C, A, B, C, ...) after a warm-up; figures are medians over rounds with their min-max. Time to first
token is a one-token request for every model; decode rate is (new tokens - 1) / (answer time - that), or, for the
bare loop, which sees its own first token, the answer's own time after it. The models are converted and logged
into a temporary MLflow store; the benchmark itself is one MLflow run (experiment "benchmarks") in the tracking
store in use, with every figure as a metric and the table, JSON and chart as artifacts, also written to
benchmarks/results/ (suite-cuda.* for --device cuda).

The parts: suite_setup.py (devices, the models compared), suite_measure.py (one model in a fresh process),
suite_sections.py (the figures of each comparison), suite_report.py (results, tables, chart, MLflow run),
docs_blocks.py (--update-docs); llama_cpp_peer.py (section 7).
"""

from __future__ import annotations

import argparse
import time

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.cuda import cuda_problems, install_hint

from benchmarks.docs_blocks import update_docs
from benchmarks.llama_cpp_peer import suite_section as llama_cpp_section
from benchmarks.suite_report import collect, log_run, report, write_results
from benchmarks.suite_sections import parity, prompt_lengths, served, speed_rounds
from benchmarks.suite_setup import DEVICES, full_size_conversion, inputs, models_store
from benchmarks.suite_setup import prepare_models

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; --device cuda where it cannot run stops here, before anything is built."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the Phi-3-mini-shaped model (32: full)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fresh processes per model")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--quick", action="store_true", help="tiny-phi3, one round, few tokens: a smoke run")
    parser.add_argument("--output_dir", default=str(RESULTS),
                        help="where suite.{md,json,png} go (suite-cuda.* with --device cuda)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the suite's block in docs/performance.md")
    parser.add_argument("--full-conversion", action="store_true",
                        help="also convert the full 32-layer model (int4; about 5 minutes and 10 GiB on 2 cores)")
    parser.add_argument("--device", choices=sorted(DEVICES), default="cpu",
                        help="cpu: the cpu targets; cuda: the cuda targets and the transformers flavor on the GPU")
    args = parser.parse_args(argv)
    if args.device != "cpu" and args.update_docs:
        parser.error("--update-docs rewrites the suite's block in docs/performance.md, which holds the cpu run; a "
                     f"--device {args.device} run writes benchmarks/results/suite-{args.device}.* and its MLflow run")
    if args.device == "cuda" and (problems := cuda_problems()):
        raise SystemExit(
            "benchmarks/suite.py: error: --device cuda needs a usable CUDA GPU and a CUDA build of "
            "onnxruntime-genai; here:\n"
            + "".join(f"  - {p}\n" for p in problems)
            + f"Nothing was built or measured, and no results were written. To benchmark the cuda targets: "
              f"{install_hint()}, then run this again. Without --device cuda the suite benchmarks the CPU.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mlflow

    bench = inputs(args)  # the model, its prompts, the prompt lengths; --quick: tiny-phi3, one round
    user_tracking_uri = mlflow.get_tracking_uri()
    started = time.time()

    with models_store(args.device, user_tracking_uri) as work:  # a temporary store for the models compared
        models = prepare_models(bench.source, work, args.device, bench.bf16)  # convert and log (section 5 too)
        full = (full_size_conversion(args.device, bench.source if args.quick else None)  # section 5, 32 layers
                if args.full_conversion else None)
        speed = speed_rounds(models, bench.prompts, args.max_tokens, args.rounds)  # sections 1-3
        print("[parity] greedy tokens vs PyTorch", flush=True)
        agreement = parity(bench.source, models, bench.prompts, args.max_tokens)  # section 3
        serving = served(models["onnx-int4"], bench.prompts, args.max_tokens, [1, 4, 8, 16],  # section 4
                         1 if args.quick else 4, work / "serve.log")
        print("[prompt length] time to first token", flush=True)
        lengths = prompt_lengths(models["onnx-int4"], bench.tokenizer, bench.lengths, args.rounds)  # section 6
        llama = llama_cpp_section(args.quick, args.rounds, args.max_tokens) if args.device == "cpu" else None  # 7

    results = collect(args, bench, started, models, full, speed, agreement, serving, lengths, llama)
    table = report(results)
    out, stem = write_results(results, table, args.output_dir)
    run = log_run(results, args, out, stem)
    if args.update_docs:
        update_docs(table)
    print("\n" + table)
    print(f"results: {out.resolve()} ({stem}.md, {stem}.json, {stem}.png); MLflow run {run.info.run_id} in "
          f"experiment 'benchmarks' at {mlflow.get_tracking_uri()}; `mlflow ui` shows it"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return results


if __name__ == "__main__":
    main()
