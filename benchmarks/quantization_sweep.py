"""Quality, speed and size of the builder's int4 quantization algorithms on a trained chat model, beside fp32,
int8 and the transformers flavor: every variant converted, logged and evaluated on the shipped dataset in one
evaluate run (one fresh process per model), tracked in the MLflow experiment "quantization-sweep".

    python -m benchmarks.quantization_sweep                  # smollm2-135m-instruct, all 30 prompts
    python -m benchmarks.quantization_sweep --update-docs    # and rewrite docs/performance.md's quantization table
    python -m benchmarks.quantization_sweep --quick          # tiny-phi3, 3 prompts, 2 variants (the tests)

Each int4 variant is configs/targets/cpu-int4.yaml with only `builder_options.algo_config` and
`matmul_mixed_precision` changed, so block size 32 and accuracy level 4 stay those of the shipped target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

import mlflow

from hf2mlflow import CONFIGS_DIR
from hf2mlflow.convert.step import ConvertArgs, convert
from hf2mlflow.evaluate.step import EvaluateArgs, evaluate
from hf2mlflow.convert.genai_builder import builder_version
from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers

from benchmarks.docs_blocks import update_docs

# name: the int4 builder options that differ from the shipped cpu-int4 target's.
INT4_VARIANTS = {
    "default": {"algo_config": "default"},
    "rtn": {"algo_config": "rtn"},
    "k_quant": {"algo_config": "k_quant"},
    "default+last_matmul:int8": {"algo_config": "default", "matmul_mixed_precision": "last_matmul:int8"},
    "rtn+last_matmul:int8": {"algo_config": "rtn", "matmul_mixed_precision": "last_matmul:int8"},
    "k_quant+last_matmul:int8": {"algo_config": "k_quant", "matmul_mixed_precision": "last_matmul:int8"},
}
# An int8 output layer cannot share its weights with a 4-bit embedding in the builder (an invalid graph for
# models with tied embeddings, as cpu-int8.yaml says): the mixed variants keep the two apart.
MIXED_EXTRA = {"shared_embeddings": False}
REFERENCE_TARGETS = ("cpu-fp32", "cpu-int8")


def _variant_target(name: str, options: dict, folder: Path) -> Path:
    """cpu-int4.yaml with `options` over its builder options, as a target file named for the variant."""
    config = yaml.safe_load((CONFIGS_DIR / "targets" / "cpu-int4.yaml").read_text())
    extra = MIXED_EXTRA if "matmul_mixed_precision" in options else {}
    config["builder_options"] = {**config.get("builder_options", {}), **options, **extra}
    config["description"] = f"cpu-int4 with {name}"
    stem = "cpu-int4-" + name.replace("+", "-").replace(":", "")
    config["name"] = stem
    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _row(label: str, options: str, summary: dict, convert_run_id: str | None) -> dict:
    metrics = mlflow.get_run(convert_run_id).data.metrics if convert_run_id else {}
    return {"variant": label, "builder options": options, "contains": summary.get("contains"),
            "rouge_l": summary.get("rouge_l"), "exact_match": summary.get("exact_match"),
            "same greedy answer as PyTorch": summary.get("parity_identical_rate"),
            "tokens before divergence": summary.get("parity_matched_share"),
            "decode tok/s": summary["decode_tokens_per_s"], "ttft ms": summary["ttft_ms_p50"],
            "size MiB": summary["size_mib"], "conversion s": metrics.get("conversion_seconds"),
            "flag": summary.get("flag", "")}


PERCENT_COLUMNS = ("contains", "rouge_l", "exact_match", "same greedy answer as PyTorch", "tokens before divergence")


def _markdown(rows: list[dict], header: str) -> str:
    def cell(column, value):
        if value is None:
            return ""
        if column in PERCENT_COLUMNS:
            return f"{value:.0%}"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value).replace("|", "\\|")

    columns = [c for c in rows[0] if c != "flag"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="configs/models name or model source")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts of the dataset; 0: all")
    parser.add_argument("--variants", default=",".join(INT4_VARIANTS),
                        help=f"comma-separated int4 variants; allowed: {', '.join(INT4_VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny-phi3, 3 prompts, default and rtn only")
    parser.add_argument("--output", default="benchmarks/results/quantization_sweep",
                        help="results path without suffix (.json and .md are written)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the quantization table in docs/performance.md")
    args = parser.parse_args(argv)
    variants = ["default", "rtn"] if args.quick else [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in INT4_VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; allowed: {', '.join(INT4_VARIANTS)}")
    model = "tiny-phi3" if args.quick else args.model
    limit = 3 if args.quick else args.limit

    mlflow.set_experiment("quantization-sweep")
    start = time.perf_counter()
    entries = []  # (label, options text, model URI, convert run ID)
    with tempfile.TemporaryDirectory() as folder:
        for name in REFERENCE_TARGETS:
            run_id = convert(ConvertArgs(model=model, target=name))
            entries.append((name, "shipped target", log_pyfunc(LogPyfuncArgs(convert_run_id=run_id)), run_id))
        for name in variants:
            target = _variant_target(name, INT4_VARIANTS[name], Path(folder))
            run_id = convert(ConvertArgs(model=model, target=str(target)))
            options = ", ".join(f"{k}={v}" for k, v in INT4_VARIANTS[name].items())
            entries.append((f"int4 {name}", options, log_pyfunc(LogPyfuncArgs(convert_run_id=run_id)), run_id))
    entries.append(("transformers fp32", "PyTorch", log_transformers(LogTransformersArgs(model=model)), None))

    eval_run = evaluate(EvaluateArgs(models=",".join(uri for _, _, uri, _ in entries), limit=limit))
    summaries = mlflow.artifacts.load_dict(f"runs:/{eval_run}/comparison.json")
    rows = [_row(label, options, summary, run_id)
            for (label, options, _, run_id), summary in zip(entries, summaries)]
    minutes = (time.perf_counter() - start) / 60
    examples = mlflow.get_run(eval_run).data.params["examples"]
    header = (f"`python -m benchmarks.quantization_sweep{' --quick' if args.quick else ''}`: {model}, {examples} "
              f"prompts of capitals-and-facts, greedy, onnxruntime-genai {builder_version()}, block size 32, "
              f"accuracy level 4, {platform.machine()} with {os.cpu_count()} cores; evaluate run "
              f"{eval_run}; {minutes:.0f} min in all.")
    table = _markdown(rows, header)
    print("\n" + table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(table)
    if args.update_docs:
        update_docs(table, "quantization")
    print(f"results: {out.with_suffix('.md')}, {out.with_suffix('.json')}; MLflow experiment 'quantization-sweep'"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return rows


if __name__ == "__main__":
    main()
