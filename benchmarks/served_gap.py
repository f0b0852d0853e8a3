"""What the logged pyfunc costs against the bare onnxruntime-genai loop on the same files, and how much of that is
batch invariance (a lone request decoding beside a copy of itself, `batching.batch_invariant: true`).

    python benchmarks/served_gap.py                 # the trained SmolLM2-135M-Instruct, cpu-int4, 3 rounds
    python benchmarks/served_gap.py --quick         # tiny-phi3, one round, 256 tokens (the tests)
    python benchmarks/served_gap.py --update-docs   # and rewrite its block in docs/performance.md

The model is converted once and logged twice, batch-invariant (the default) and not; the two pyfuncs and the
bare loop answer the same prompts in fresh processes, in interleaved rounds (benchmarks/suite_measure.py), greedy,
one request at a time. Writes benchmarks/results/served_gap.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow import PROJECT_ROOT  # noqa: E402

from docs_blocks import update_docs  # noqa: E402
from suite_report import cpu_name  # noqa: E402
from suite_sections import speed_rounds  # noqa: E402
from suite_setup import QUESTIONS, models_store  # noqa: E402

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
BARE, INVARIANT, ONE_ROW = "bare onnxruntime-genai loop", "pyfunc, batch-invariant (default)", "pyfunc, one-row lone"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="configs/models name or model folder")
    parser.add_argument("--target", default="cpu-int4", help="a cpu target")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fresh processes")
    parser.add_argument("--max_tokens", type=int, default=64, help="new tokens per answer")
    parser.add_argument("--quick", action="store_true", help="tiny-phi3, one round, 256 tokens: a smoke run")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where served_gap.{md,json} go")
    parser.add_argument("--update-docs", action="store_true", help="rewrite its block in docs/performance.md")
    args = parser.parse_args(argv)
    if args.quick:
        # Fewer tokens decode within the timing jitter of a busy machine (benchmarks/suite_setup.py).
        args.model, args.rounds, args.max_tokens = "tiny-phi3", 1, 256
    return args


def prepare(args, work: Path) -> dict:
    """One conversion, logged batch-invariant and not; name -> what suite_measure runs."""
    import mlflow
    import yaml

    from hf2mlflow.config import load_target
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
    from hf2mlflow.runtime.manifest import folder_bytes

    run_id = convert(ConvertArgs(model=args.model, target=args.target))
    one_row = load_target(args.target).model_dump(mode="json", exclude={"name"})
    one_row["batching"]["batch_invariant"] = False
    (work / "one-row.yaml").write_text(yaml.safe_dump(one_row))
    paths = {}
    for name, target in ((INVARIANT, args.target), (ONE_ROW, str(work / "one-row.yaml"))):
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run_id, target=target,
                                       registered_model_name=f"served-gap-{len(paths)}"))
        paths[name] = str(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / f"model-{len(paths)}")))
    size = folder_bytes(Path(paths[INVARIANT]))
    return {BARE: {"kind": "genai", "path": paths[INVARIANT], "size_bytes": size},
            INVARIANT: {"kind": "pyfunc", "path": paths[INVARIANT], "size_bytes": size},
            ONE_ROW: {"kind": "pyfunc", "path": paths[ONE_ROW], "size_bytes": size}}


def table(results: dict) -> str:
    speed, bare = results["speed"], results["speed"][BARE]["decode_tps"]["median"]
    lines = [f"Measured {results['date']} with `{results['command']}`: {results['model']}, {results['target']}, "
             f"greedy, {results['max_tokens']} new tokens, {len(QUESTIONS)} prompts one at a time, "
             f"{results['rounds']} interleaved rounds of fresh processes; {results['machine']}.", "",
             "| runtime | decode tok/s | vs bare loop | first token ms | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, figures in speed.items():
        decode, ttft = figures["decode_tps"], figures["ttft_ms"]
        lines.append(f"| {name} | {decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f}) | "
                     f"{decode['median'] / bare:.2f}x | {ttft['median']:.0f} | "
                     f"{figures['peak_rss_gib']['median'] * 1024:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import mlflow
    import psutil

    args = parse_args(argv)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    with models_store("cpu", mlflow.get_tracking_uri()) as work:
        models = prepare(args, work)
        speed = speed_rounds(models, prompts, args.max_tokens, args.rounds)
    for figures in speed.values():
        figures.pop("samples")
    results = {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/served_gap.py"
               + (" --quick" if args.quick else ""), "model": args.model, "target": args.target,
               "max_tokens": args.max_tokens, "rounds": args.rounds,
               "machine": f"{psutil.cpu_count()} cores, {cpu_name()}", "speed": speed}
    text = table(results)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "served_gap.json").write_text(json.dumps(results, indent=1))
    (out / "served_gap.md").write_text(text)
    if args.update_docs:
        update_docs(text, "served_gap")
    print("\n" + text + f"\nresults: {out.resolve()} (served_gap.md, served_gap.json)"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return results


if __name__ == "__main__":
    main()
