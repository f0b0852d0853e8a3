"""Peak memory and time of the model builder's int4 conversion, standard path vs low-memory path.

    python -m benchmarks.convert_memory                 # 4-layer Phi-3-mini-shaped model, both paths
    python -m benchmarks.convert_memory --layers 32     # the full 3.8 B model (standard runs only if it fits)
    python -m benchmarks.convert_memory --quick         # tiny-phi3, seconds (the test suite runs this)

The model is built by the project (random weights, Phi-3-mini's exact width, stored in bf16 like the published
checkpoint; hf2mlflow.sources.tiny.phi3_mini_shape_path). Each path runs the builder in its own process, as
convert_onnx does, and the peak is that process's own peak RSS from the kernel (os.wait4). Repeats are
interleaved (standard, low, standard, low...). Both outputs are checked to give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from hf2mlflow.config import load_target
from hf2mlflow.convert.genai_builder import builder_version, run_builder
from hf2mlflow.runtime.manifest import folder_bytes
from hf2mlflow.convert.memory_plan import GIB, checkpoint_size, estimate
from hf2mlflow.sources.tiny import phi3_mini_shape_path, tiny_model_path
from hf2mlflow.convert.validate import validate_genai_model

PATHS = ("standard", "low")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the Phi-3-mini-shaped model (32: full)")
    parser.add_argument("--target", default="cpu-int4", help="configs/targets name")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path, interleaved")
    parser.add_argument("--force-standard", action="store_true",
                        help="run the standard path even where its estimate exceeds the available memory")
    parser.add_argument("--quick", action="store_true", help="tiny-phi3 instead: a smoke run in seconds")
    parser.add_argument("--output", default="benchmarks/results/convert_memory.json", help="JSON results file")
    args = parser.parse_args(argv)

    source = tiny_model_path("tiny-phi3") if args.quick else phi3_mini_shape_path(args.layers)
    label = "tiny-phi3" if args.quick else f"phi3-mini-shape {args.layers} layers, bf16"
    target = load_target(args.target)
    size = checkpoint_size(source)
    estimates = dict(zip(PATHS, estimate(size, target.precision)))
    available = psutil.virtual_memory().available
    paths = [p for p in PATHS if p == "low" or args.force_standard or estimates[p] < available]
    skipped = [p for p in PATHS if p not in paths]
    for p in skipped:
        print(f"skipping the {p} path: its estimate, {estimates[p] / GIB:.1f} GiB, exceeds the "
              f"{available / GIB:.1f} GiB available (--force-standard runs it anyway)")

    runs: dict[str, list] = {p: [] for p in paths}
    tokens = {}
    with tempfile.TemporaryDirectory(prefix="convert-memory-") as work:
        for repeat in range(args.repeats):
            for path in paths:
                out = Path(work) / f"{path}-{repeat}"
                print(f"[{repeat + 1}/{args.repeats}] {path} builder: {label} -> {target.name}", flush=True)
                result = run_builder(source, out, Path(work) / "cache", target, low_memory=path == "low",
                                     log=lambda line: None)
                runs[path].append({"seconds": result.seconds, "peak_rss_bytes": result.peak_rss_bytes,
                                   "output_bytes": folder_bytes(out)})
                print(f"  {result.seconds:.1f} s, peak RSS {result.peak_rss_bytes / GIB:.2f} GiB", flush=True)
                if repeat == 0 and target.execution_provider == "cpu":
                    tokens[path] = validate_genai_model(out, max_new_tokens=16).new_tokens
                shutil.rmtree(out)

    rows = {}
    for path, measured in runs.items():
        seconds = [m["seconds"] for m in measured]
        peaks = [m["peak_rss_bytes"] for m in measured]
        rows[path] = {"seconds_median": statistics.median(seconds), "seconds_min": min(seconds),
                      "seconds_max": max(seconds), "peak_rss_bytes": max(peaks),
                      "estimated_peak_bytes": estimates[path], "output_bytes": measured[0]["output_bytes"]}
    same_tokens = len(set(map(tuple, tokens.values()))) == 1 if len(tokens) == 2 else None
    results = {
        "date": time.strftime("%Y-%m-%d"), "model": label, "target": target.name,
        "parameters": size.parameters, "checkpoint_bytes": size.stored_bytes,
        "machine": {"cores": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "platform": platform.platform()},
        "builder_version": builder_version(), "repeats": args.repeats, "paths": rows, "skipped": skipped,
        "same_greedy_tokens": same_tokens,
    }

    print(f"\n{label} ({size.parameters / 1e9:.2f} B parameters, checkpoint {size.stored_bytes / GIB:.2f} GiB) "
          f"-> {target.name}, onnxruntime-genai {builder_version()}, {args.repeats} run(s) each")
    print("| path | seconds (median, min-max) | peak RSS GiB | estimate GiB | peak / checkpoint | output GiB |")
    print("|---|---|---|---|---|---|")
    for path, r in rows.items():
        print(f"| {path} | {r['seconds_median']:.1f} ({r['seconds_min']:.1f}-{r['seconds_max']:.1f}) | "
              f"{r['peak_rss_bytes'] / GIB:.2f} | {r['estimated_peak_bytes'] / GIB:.2f} | "
              f"{r['peak_rss_bytes'] / size.stored_bytes:.2f}x | {r['output_bytes'] / GIB:.2f} |")
    for path in skipped:
        print(f"| {path} | not run | | {estimates[path] / GIB:.2f} | | |")
    if len(rows) == 2:
        print(f"low / standard: peak {rows['low']['peak_rss_bytes'] / rows['standard']['peak_rss_bytes']:.2f}x, "
              f"time {rows['low']['seconds_median'] / rows['standard']['seconds_median']:.2f}x; "
              f"same greedy tokens: {same_tokens}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"results: {output.resolve()}")
    return results


if __name__ == "__main__":
    main()
