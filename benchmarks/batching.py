"""Batching, measured: `mlflow models serve` of one int4 model logged two ways, side by side in one run.

    python -m benchmarks.batching            # 4-layer Phi-3-mini-shaped model, int4 (about 15 minutes on 2 cores)
    python -m benchmarks.batching --quick    # tiny-phi3: a smoke run

The two loggings of the same conversion differ only in the target's `batching` settings:
- off: max_batch 1, one sequence at a time;
- batched: the default (max_batch 8, continuous batching: a sequence joins the running ones at the next step).

For each: 1, 4, 8 and 16 concurrent clients (greedy, --max_tokens new tokens, --per_client requests each),
then 8 clients asking for 256 tokens at once (MLflow's scoring server answers 504 after 60 s); in process, a
DataFrame of 32 requests against the same requests row by row; and the batch_infer step on local[2] Spark
(32 rows, 2 partitions). Prints a table and writes benchmarks/results/batching.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from benchmarks.docs_blocks import update_docs
from benchmarks.suite_sections import served
from benchmarks.suite_setup import QUESTIONS

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "off": {"max_batch": 1},
    "batched": {},
}


def log_variants(source: Path, work: Path) -> dict:
    import mlflow
    import yaml

    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    run_id = convert(ConvertArgs(model=str(source), target="cpu-int4"))
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/targets/cpu-int4.yaml").read_text())
    models = {}
    for i, (name, batching) in enumerate(VARIANTS.items()):
        target = work / f"cpu-int4-batching-{i}.yaml"
        target.write_text(yaml.safe_dump({**base, "name": f"cpu-int4-batching-{i}", "batching": batching}))
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run_id, target=str(target),
                                       registered_model_name=f"bench-batching-{i}"))
        models[name] = {"path": str(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / f"m{i}"))),
                        "batching": batching, "uri": uri}
    return models


def dataframe_vs_rows(path: str, prompts: list, max_tokens: int, rows: int = 32) -> dict:
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(path)
    requests = [{"messages": prompts[i % len(prompts)], "max_tokens": max_tokens} for i in range(rows)]
    model.predict(requests[0])  # warm-up
    start = time.perf_counter()
    one_by_one = [model.predict(r)[0] for r in requests]
    row_seconds = time.perf_counter() - start
    start = time.perf_counter()
    together = model.predict(pd.DataFrame(requests))
    frame_seconds = time.perf_counter() - start
    same = sum(a["choices"] == b["choices"] for a, b in zip(one_by_one, together))
    return {"rows": rows, "row_by_row_s": row_seconds, "dataframe_s": frame_seconds,
            "speedup": row_seconds / frame_seconds, "same_answers": same}


def spark_rows_per_s(uri: str, prompts: list, max_tokens: int, work: Path, rows: int = 32) -> float:
    from hf2mlflow.batch.step import BatchInferArgs, batch_infer

    requests = work / f"requests-{time.monotonic_ns()}.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "messages": prompts[i % len(prompts)]}) + "\n"
                                for i in range(rows)))
    summary = batch_infer(BatchInferArgs(model=uri, input=str(requests), output=str(requests.with_suffix(".parquet")),
                                         max_tokens=max_tokens, partitions=2, spark_master="local[2]"))
    if summary["rows_ok"] != rows:
        raise SystemExit(f"batch_infer: {summary['rows_error']:.0f} of {rows} rows failed; see run {summary['run_id']}")
    return summary["rows_per_s"]


def step_scaling(onnx_dir: Path, sizes=(1, 2, 4, 6, 8), steps: int = 32) -> dict:
    """Decode tokens/s of the served model's own decoder (hf2mlflow/runtime/kv_slots.py) at each batch size,
    without the scheduler: the ceiling batching can reach."""
    from hf2mlflow.runtime.chat_tokenizer import ChatTokenizer
    from hf2mlflow.runtime.kv_slots import SlotDecoder

    ids = ChatTokenizer(onnx_dir).encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    decoder = SlotDecoder(onnx_dir)
    figures = {}
    for size in sizes:
        decoder.release()
        decoder.reserve(size, len(ids) + steps + 1, [])
        for row in range(size):
            decoder.prefill(row, ids)
        start = time.perf_counter()
        for step in range(steps):
            decoder.decode([ids[-1]] * size, [len(ids) + step] * size)
        step = (time.perf_counter() - start) / steps
        figures[str(size)] = {"step_ms": 1000 * step, "tokens_per_s": size / step}
        print(f"[batching] decoder alone, batch of {size}: {1000 * step:.1f} ms a step, "
              f"{size / step:.1f} tokens/s", flush=True)
    return figures


def batch_sizes(log: Path) -> list[int]:
    return [int(n) for n in re.findall(r"\] (\d+) sequences in one batch", log.read_text())]


def report(r: dict) -> str:
    lines = [f"Measured {r['date']} with `{r['command']}`: {r['model']}, int4 (cpu-int4), greedy, "
             f"{r['max_tokens']} new tokens, {r['per_client']} requests per client, `mlflow models serve` with one "
             f"worker; {r['cores']} cores.", "",
             "| logging | clients | requests/s | tokens/s | p50 s | p95 s | errors | largest batch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in r["variants"].items():
        for clients, s in v["served"].items():
            lines.append(f"| {name} | {clients} | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | "
                         f"{s['latency_p50_s']:.2f} | {s['latency_p95_s']:.2f} | {s['errors']} | "
                         f"{v['largest_batch']} |")
    lines += ["", "| logging | 8 clients x 256 tokens: 504s | other errors | p95 s | 8 vs 1 client tokens/s | "
              "lone request vs off | DataFrame of 32 vs row by row | same answers | batch_infer rows/s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    off_one = r["variants"]["off"]["served"]["1"]["tokens_per_s"]
    for name, v in r["variants"].items():
        long, s = v["long"], v["served"]
        frame = v["dataframe"]
        lines.append(f"| {name} | {long['timeouts']} | {long['errors'] - long['timeouts']} | "
                     f"{long['latency_p95_s']:.1f} | {s['8']['tokens_per_s'] / s['1']['tokens_per_s']:.2f}x | "
                     f"{s['1']['tokens_per_s'] / off_one:.2f}x | {frame['speedup']:.2f}x | "
                     f"{frame['same_answers']}/{frame['rows']} | {v['batch_infer_rows_per_s']:.2f} |")
    steps = r.get("step_scaling", {})
    if steps:
        lines += ["", "| the served model's decoder alone (kv_slots), batch of | " + " | ".join(steps) + " |",
                  "| --- |" + " ---: |" * len(steps),
                  "| ms a decode step | " + " | ".join(f"{v['step_ms']:.1f}" for v in steps.values()) + " |",
                  "| tokens/s | " + " | ".join(f"{v['tokens_per_s']:.1f}" for v in steps.values()) + " |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-phi3 and few requests: a smoke run")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--per_client", type=int, default=2)
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--update-docs", action="store_true", help="rewrite the batching block in docs/performance.md")
    parser.add_argument("--steps-only", action="store_true", help="only the bare Generator's tokens/s per batch size")
    args = parser.parse_args(argv)
    if args.quick and args.update_docs:
        parser.error("--update-docs takes the 4-layer model's figures; leave out --quick")

    import os

    import mlflow
    import psutil

    from hf2mlflow.sources.tiny import phi3_mini_shape_path, tiny_model_path

    source = tiny_model_path("tiny-phi3") if args.quick else phi3_mini_shape_path(4)
    label = "tiny-phi3" if args.quick else "Phi-3-mini-shaped model, 4 layers"
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    long_tokens = 32 if args.quick else 256
    per_client = 1 if args.quick else args.per_client
    results = {"date": time.strftime("%Y-%m-%d"), "command": "python -m benchmarks.batching"
               + (" --quick" if args.quick else ""), "model": label, "max_tokens": args.max_tokens,
               "per_client": per_client, "cores": psutil.cpu_count(), "variants": {}}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="hf2mlflow-batching-") as work:
        work = Path(work)
        previous = mlflow.get_tracking_uri()
        os.environ["MLFLOW_TRACKING_URI"] = store = f"sqlite:///{work}/models.db"
        mlflow.set_tracking_uri(store)
        try:
            models = log_variants(source, work)
            onnx_dir = next(Path(next(iter(models.values()))["path"]).rglob("genai_config.json")).parent
            results["step_scaling"] = step_scaling(onnx_dir)
            if args.steps_only:
                return results
            print("[batching] warming Spark up (its first job starts the JVM and the Python workers)", flush=True)
            spark_rows_per_s(next(iter(models.values()))["uri"], prompts, 4, work, rows=4)
            for name, model in models.items():
                print(f"[batching] {name}: serving", flush=True)
                log = work / f"serve-{len(results['variants'])}.log"
                serving = served(model, prompts, args.max_tokens, [1, 4, 8, 16], per_client, log)
                long_log = work / f"serve-long-{len(results['variants'])}.log"
                long = served(model, prompts, long_tokens, [8], 1, long_log)[8]
                print(f"[batching] {name}: DataFrame of 32 against row by row", flush=True)
                frame = dataframe_vs_rows(model["path"], prompts, args.max_tokens)
                print(f"[batching] {name}: {frame}", flush=True)
                print(f"[batching] {name}: batch_infer on local[2] Spark", flush=True)
                spark = spark_rows_per_s(model["uri"], prompts, args.max_tokens, work)
                results["variants"][name] = {
                    "batching": model["batching"], "served": {str(k): v for k, v in serving.items()},
                    "long": long, "dataframe": frame, "batch_infer_rows_per_s": spark,
                    "largest_batch": max(batch_sizes(log) + batch_sizes(long_log), default=1)}
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = previous
            mlflow.set_tracking_uri(previous)
    results["seconds"] = time.time() - started
    table = report(results)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batching.md").write_text(table)
    (out / "batching.json").write_text(json.dumps(results, indent=2))
    if args.update_docs:
        update_docs(table, "batching")
    print("\n" + table)
    print(f"results: {out.resolve()} (batching.md, batching.json), {results['seconds'] / 60:.1f} min"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return results


if __name__ == "__main__":
    main()
