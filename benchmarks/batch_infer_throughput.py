"""Throughput of the batch_infer step on local Spark versus a plain Python loop, on the same rows and model.

Measures, in one run, with the built-in tiny-phi3 converted to cpu-int4 and logged with log_pyfunc (in a fresh
temporary MLflow store, so nothing else is touched):

- spark: hf2mlflow.batch.step.batch_infer (the batch_infer step) on `--spark_master local[2]`, JSONL in, Parquet
  out, timed around the whole call (MLflow run, wrapping the model for spark_udf, scoring, writing, summary);
  "answering s" is the step's own `seconds` metric (scoring and writing only);
- loop: one process, mlflow.pyfunc.load_model of the same model URI, then the same rows one by one through the
  same per-row code the Spark job uses (batch_chat_model.answer_row), timed from the load to the last answer;
  "answering s" leaves the load out.

Both are warmed up once, then run `--repeats` times interleaved (spark, loop, spark, loop, ...), greedy, with
`--max_tokens` new tokens per row. Prints a markdown table and writes the figures as JSON to `--output`.

    python -m benchmarks.batch_infer_throughput              # 200 rows, 3 repeats
    python -m benchmarks.batch_infer_throughput --quick      # 16 rows, 1 repeat (smoke run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "batch_infer_throughput.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200, help="prompts to answer (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved (default 3)")
    parser.add_argument("--max_tokens", type=int, default=16, help="new tokens per row (default 16)")
    parser.add_argument("--spark_master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--partitions", type=int, default=2, help="Spark partitions (default 2)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help=f"JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 rows, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = 16, 1
    return args


def write_prompts(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for i in range(rows):
            messages = [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": f"Question {i}: what is {i} plus {i % 7}?"}]
            f.write(json.dumps({"id": f"q{i}", "messages": messages}) + "\n")


def run_spark(model_uri: str, prompts: Path, out: Path, args) -> dict:
    from hf2mlflow.batch.step import BatchInferArgs, batch_infer

    start = time.perf_counter()
    result = batch_infer(BatchInferArgs(model=model_uri, input=str(prompts), output=str(out),
                                        max_tokens=args.max_tokens, partitions=args.partitions,
                                        spark_master=args.spark_master))
    seconds = time.perf_counter() - start
    if result["rows_ok"] != args.rows:
        raise SystemExit(f"spark: {result['rows_error']:.0f} of {args.rows} rows failed; see run {result['run_id']}")
    return {"seconds": seconds, "answering_seconds": result["seconds"],
            "completion_tokens": int(result["completion_tokens"])}


def run_loop(model_uri: str, prompts: Path, args) -> dict:
    import mlflow

    from hf2mlflow.runtime.batch_chat_model import answer_row

    lines = prompts.read_text().splitlines()
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    loaded = time.perf_counter()
    results = [answer_row(model, line, args.max_tokens) for line in lines]
    end = time.perf_counter()
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        raise SystemExit(f"loop: {len(errors)} of {len(lines)} rows failed, first: {errors[0]}")
    return {"seconds": end - start, "answering_seconds": end - loaded,
            "completion_tokens": sum(r["completion_tokens"] for r in results)}


def summarise(runs: list[dict], rows: int, partitions) -> dict:
    seconds = [r["seconds"] for r in runs]
    median = statistics.median(seconds)
    tokens = runs[0]["completion_tokens"]
    return {"rows": rows, "partitions": partitions, "repeats": len(runs), "seconds": seconds,
            "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
            "median_answering_s": statistics.median(r["answering_seconds"] for r in runs),
            "rows_per_s": rows / median, "completion_tokens": tokens, "completion_tokens_per_s": tokens / median}


def table(results: dict) -> str:
    lines = ["| run | rows | partitions | median s (min-max) | answering s | rows/s | completion tok/s |",
             "|---|---|---|---|---|---|---|"]
    for m in results["measurements"].values():
        lines.append(f"| {m['label']} | {m['rows']} | {m['partitions']} | {m['median_s']:.2f} "
                     f"({m['min_s']:.2f}-{m['max_s']:.2f}) | {m['median_answering_s']:.2f} | {m['rows_per_s']:.1f} "
                     f"| {m['completion_tokens_per_s']:.0f} |")
    lines.append(f"\nspark/loop throughput ratio (rows/s): {results['ratio_spark_over_loop']:.2f} end to end, "
                 f"{results['ratio_spark_over_loop_answering']:.2f} answering only")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output).resolve()
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter

    with tempfile.TemporaryDirectory(prefix="bench-batch-infer-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # the store's artifacts, Spark's warehouse and logs land here and go with it
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
        import mlflow
        from pyspark.sql import SparkSession

        from hf2mlflow.convert.step import ConvertArgs, convert
        from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        print("[bench] converting and logging tiny-phi3 cpu-int4", flush=True)
        model_uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert(ConvertArgs(model="tiny-phi3",
                                                                                target="cpu-int4"))))
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, args.rows)
        # The session batch_infer's getOrCreate finds: same master, quieter (no UI, no progress bar).
        spark = (SparkSession.builder.master(args.spark_master).appName("bench-batch-infer")
                 .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                 .getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")

        print(f"[bench] warm-up: {args.rows} rows each", flush=True)
        run_spark(model_uri, prompts, work / "warmup.parquet", args)
        run_loop(model_uri, prompts, args)
        spark_runs, loop_runs = [], []
        for i in range(args.repeats):
            print(f"[bench] repeat {i + 1}/{args.repeats}", flush=True)
            spark_runs.append(run_spark(model_uri, prompts, work / f"answers-{i}.parquet", args))
            loop_runs.append(run_loop(model_uri, prompts, args))
        spark.stop()

    spark_m = {"label": f"spark {args.spark_master}", **summarise(spark_runs, args.rows, args.partitions)}
    loop_m = {"label": "python loop", **summarise(loop_runs, args.rows, 1)}
    if spark_m["completion_tokens"] != loop_m["completion_tokens"]:  # greedy: both must generate the same
        print(f"[bench] warning: completion tokens differ: spark {spark_m['completion_tokens']}, "
              f"loop {loop_m['completion_tokens']}")
    results = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.batch_infer_throughput", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "python": platform.python_version()},
        "versions": {p: version(p) for p in ("mlflow", "pyspark", "onnxruntime-genai")},
        "model": "tiny-phi3 cpu-int4 (log_pyfunc)", "max_tokens": args.max_tokens,
        "measurements": {"spark": spark_m, "loop": loop_m},
        "ratio_spark_over_loop": spark_m["rows_per_s"] / loop_m["rows_per_s"],
        "ratio_spark_over_loop_answering": loop_m["median_answering_s"] / spark_m["median_answering_s"],
    }
    print("\n" + table(results))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n[bench] results written to {output}")
    return results


if __name__ == "__main__":
    main()
