"""Teacher-forced quality of our ONNX targets against the source model in PyTorch float32 (hf2mlflow/quality.py,
as llama.cpp's `llama-perplexity --kl-divergence` reports it): mean and 99th-percentile KL divergence, top-1
agreement and perplexity on the held-out English text hf2mlflow/sources/data/held_out_english.txt.

    python -m benchmarks.quality_kld                # the trained SmolLM2-135M-Instruct: cpu-fp32, cpu-int8, cpu-int4
    python -m benchmarks.quality_kld --quick        # tiny-phi3 (random weights), windows of 128: a smoke run
    python -m benchmarks.quality_kld --name quality_kld_int4_recipes \
        --targets cpu-int4,$(ls benchmarks/int4_recipes/*.yaml | paste -sd,)   # int4 recipes side by side
    python -m benchmarks.quality_kld --off-grid --name quality_kld_int4_recipes_off_grid --targets ...
    python -m benchmarks.quality_kld --model gemma3-270m --name quality_kld_gemma3 --targets ... \
        --builder-only "why convert_onnx refuses it"    # a model convert_onnx refuses: the builder's output

--off-grid scores the recipes on weights that sit on no 4-bit grid. The trained model's float weights are the
shipped Q4_1 file dequantized: every block of 32 holds at most 16 values, evenly spaced, so a quantizer whose grid
is Q4_1's (asymmetric blocks of 32 with a float offset) gets them back exactly and looks lossless on this model
alone. --off-grid adds to each weight uniform noise within half a step of its block's grid (seeded), so the
shipped file is again a fair rounding of these weights but no quantizer can find them exactly; the reference is
then the off-grid model in PyTorch float32.

Every target is converted into a temporary MLflow store, read with onnxruntime-genai on the source tokenizer's
token ids, window by window (the second half of each scored); a target that cannot be built is a row saying why.
Writes benchmarks/results/quality_kld.{md,json} (--name: another name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hf2mlflow import PROJECT_ROOT

from hf2mlflow.measure import cpu_name
from benchmarks.suite_setup import models_store

RESULTS = PROJECT_ROOT / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="configs/models name or model folder")
    parser.add_argument("--targets", default="cpu-fp32,cpu-int8,cpu-int4", help="comma-separated cpu targets")
    parser.add_argument("--window", type=int, default=256, help="tokens per window; its second half is scored")
    parser.add_argument("--quick", action="store_true", help="tiny-phi3, windows of 128: a smoke run")
    parser.add_argument("--builder-only", metavar="WHY", default="",
                        help="score the model builder's output for each target without convert_onnx's validation, "
                             "for a model convert_onnx refuses; WHY (why it refuses) goes into the table")
    parser.add_argument("--off-grid", action="store_true",
                        help="score on the model's weights moved off their 4-bit grid (see above)")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where NAME.{md,json} go")
    parser.add_argument("--name", default="quality_kld", help="results file name, without suffix")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.window = "tiny-phi3", 128
    return args


def off_grid_folder(source: Path, out: Path, seed: int = 0) -> Path:
    """A copy of the Hugging Face folder `source` whose 2-D weights get uniform noise within half a step of the
    grid their GGUF file stored them on: 8-bit symmetric (max/127) for the token embedding, as Q8_0 holds it,
    4-bit asymmetric ((max-min)/15) for the rest, as Q4_1 does; blocks of 32 along each row. Made once."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if tensor.dim() == 2 and tensor.shape[1] % 32 == 0:
            blocks = tensor.float().reshape(tensor.shape[0], -1, 32)
            step = (blocks.abs().amax(-1, keepdim=True) / 127 if "embed" in name else
                    (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15)
            noise = (torch.rand(blocks.shape, generator=generator) - 0.5) * step
            tensor = (blocks + noise).reshape(tensor.shape).to(tensor.dtype).contiguous()
        weights[name] = tensor
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    partial.rename(out)
    return out


def build(args, source: Path, target: str, out: Path) -> Path:
    """The ONNX model folder of `target`: convert_onnx's (validated, logged in the temporary store), or with
    --builder-only the model builder's output with the target's options, unvalidated."""
    import mlflow

    from hf2mlflow.config import load_target
    from hf2mlflow.convert.genai_builder import run_builder
    from hf2mlflow.convert.step import ConvertArgs, convert

    if args.builder_only:
        run_builder(source, out / "onnx", out / "builder-cache", load_target(target), trust_remote_code=False)
        return out / "onnx"
    run_id = convert(ConvertArgs(model=args.model, target=target))
    return Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(out)))


def table(results: dict) -> str:
    built = (" Built with the model builder and each target's options, not convert_onnx: "
             + results["builder_only"] + "." if results.get("builder_only") else "")
    lines = [f"Measured {results['date']} with `{results['command']}`: {results['model']}, "
             f"{results['positions']} scored positions (windows of {results['window']} tokens, second half scored) "
             f"of the held-out text, every model against PyTorch float32 on the same token ids; {results['machine']}."
             + built,
             "", "| model | size MiB | mean KLD | 99th pct KLD | same top token | perplexity |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in results["rows"].items():
        if "failed" in row:
            lines.append(f"| {name} | failed: {row['failed']} | | | | |")
            continue
        lines.append(f"| {name} | {row['size_mib']:.1f} | {row['mean_kld']:.3g} | {row['p99_kld']:.3g} | "
                     f"{100 * row['top1_agreement']:.1f}% | {row['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import mlflow
    import psutil

    from hf2mlflow.config import load_model
    from hf2mlflow.errors import StepError
    from hf2mlflow.parity import GenAIModel, TorchModel
    from hf2mlflow.digest import content_digest
    from hf2mlflow.quality import TEXT, held_out_ids, logits_cache, teacher_forced
    from hf2mlflow.runtime.manifest import folder_bytes
    from hf2mlflow.sources.resolve import resolve_model
    from hf2mlflow.sources.tiny import home

    args = parse_args(argv)
    source = resolve_model(load_model(args.model)).path
    if args.off_grid:
        source = off_grid_folder(source, home() / "off-grid" / content_digest(source)[:16])
        print(f"[quality] off-grid weights: {source}", flush=True)
        label, args.model = f"{args.model}, off its 4-bit grid (--off-grid)", str(source)
    else:
        label = args.model
    print(f"[quality] reference: {args.model} in PyTorch float32 ({source})", flush=True)
    reference = TorchModel.from_folder(source)
    ids, cache = held_out_ids(reference), logits_cache(source, reference)
    rows = {}
    with models_store("cpu", mlflow.get_tracking_uri()) as work:
        for number, target in enumerate(t for t in args.targets.split(",") if t):
            name = Path(target).stem  # a shipped target's name, or a target file's
            print(f"[quality] {'building' if args.builder_only else 'converting'} {args.model} to {target}",
                  flush=True)
            try:
                folder = build(args, source, target, work / f"model-{number}")
            except StepError as exc:  # a recipe the builder or the runtime cannot make: a row that says why
                print(f"[quality] {name}: FAILED: {exc}", flush=True)
                rows[f"ours {name}"] = {"failed": str(exc).split(". ")[0]}
                continue
            print(f"[quality] {name}: scoring {len(ids)} tokens in windows of {args.window}", flush=True)
            rows[f"ours {name}"] = {**teacher_forced(reference, GenAIModel(folder), ids, args.window, cache,
                                                     reference.bos_id),
                                      "size_mib": folder_bytes(folder) / 2**20}
    measured = [row for row in rows.values() if "failed" not in row]
    if not measured:
        raise SystemExit("[quality] no target could be converted; see the FAILED lines above")
    first = measured[0]
    rows = {"PyTorch float32 (reference)": {"mean_kld": 0.0, "p99_kld": 0.0, "top1_agreement": 1.0,
                                            "perplexity": first["reference_perplexity"],
                                            "size_mib": folder_bytes(source) / 2**20}, **rows}
    given = sys.argv[1:] if argv is None else argv
    results = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m benchmarks.quality_kld", *given]),
               "model": label,
               "window": args.window,
               "text": TEXT, "tokens": len(ids), "positions": first["positions"],
               "machine": f"{psutil.cpu_count()} cores, {cpu_name()}", "rows": rows,
               "builder_only": args.builder_only}
    text = table(results)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{args.name}.md").write_text(text)
    print("\n" + text + f"\nresults: {out.resolve()} ({args.name}.md, {args.name}.json)")
    return results


if __name__ == "__main__":
    main()
