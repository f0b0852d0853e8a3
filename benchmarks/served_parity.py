"""Served parity: the engine the logged pyfunc serves with on CPU (parity.ServedModel: our chat template rendering,
our decode loop over the builder's graph, continuous batching) against onnxruntime-genai over the same files and
against the source model in PyTorch float32, for each cpu target.

    python -m benchmarks.served_parity            # the trained SmolLM2-135M-Instruct: cpu-fp32 and cpu-int4
    python -m benchmarks.served_parity --quick    # tiny-phi3 (random weights), cpu-fp32, 8 prompts,
                                                  # windows of 128: a smoke run

Per target, on the prompts of the shipped dataset (capitals-and-facts, its max_new_tokens, greedy), every
engine reading the source tokenizer's prompt ids (so tokenization differences do not count; whether the served
engine's own template rendering gives the same ids is a row of its own):
- greedy tokens: PyTorch's, the served engine's for each prompt alone and as rows of batches of 8 queued at once
  (how many rows each decode step really carried is read from the scheduler), onnxruntime-genai's alone;
- teacher-forced (hf2mlflow/quality.py) on the held-out text, windows of 256 tokens, the second half scored:
  mean KL divergence and top-1 agreement of the served engine against onnxruntime-genai, of the served engine
  against PyTorch float32 and of onnxruntime-genai against PyTorch float32.
Every prompt whose tokens differ between two engines is listed with the index of the first new token that
differs. The targets are converted with convert_onnx into a temporary MLflow store, never the user's; the
served engine runs with the target's session_options, onnxruntime-genai with genai_config.json's.
Writes benchmarks/results/served_parity.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from hf2mlflow import PROJECT_ROOT

from hf2mlflow.measure import cpu_name
from benchmarks.suite_setup import models_store

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
DATASET = "capitals-and-facts"
BATCH = 8
# (key in a target's results, label): pairs of greedy answers compared prompt by prompt.
COMPARISONS = (("served_vs_torch", "served alone vs PyTorch"), ("genai_vs_torch", "onnxruntime-genai vs PyTorch"),
               ("batch_vs_torch", "served in a batch of 8 vs PyTorch"),
               ("batch_vs_alone", "served in a batch of 8 vs served alone"),
               ("served_vs_genai", "served alone vs onnxruntime-genai"))
# (key, reference, candidate): the teacher-forced pairs.
KLD_PAIRS = (("served_vs_genai", "onnxruntime-genai", "served"), ("served_vs_torch", "PyTorch", "served"),
             ("genai_vs_torch", "PyTorch", "onnxruntime-genai"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="configs/models name or model folder")
    parser.add_argument("--targets", default="cpu-fp32,cpu-int4", help="comma-separated cpu targets")
    parser.add_argument("--window", type=int, default=256, help="tokens per window; its second half is scored")
    parser.add_argument("--limit", type=int, default=0, help="the dataset's first LIMIT prompts (0: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny-phi3, cpu-fp32, 8 prompts, windows of 128: a smoke run")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where served_parity.{md,json} go")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.window, args.limit, args.targets = "tiny-phi3", 128, BATCH, "cpu-fp32"
    return args


def differences(ids: list[str], expected: list[list[int]], got: list[list[int]], decode) -> list[dict]:
    """The prompts whose answers differ: id, first differing index, and the token each side has there."""
    from hf2mlflow.parity import PromptParity

    out = []
    for prompt, a, b in zip(ids, expected, got):
        at = PromptParity(a, b).first_divergence
        if at is not None:
            out.append({"id": prompt, "at": at, "lengths": [len(a), len(b)],
                        "tokens": [decode(a[at:at + 1]), decode(b[at:at + 1])]})
    return out


def open_models(args, target: str, work: Path):
    """The target converted by convert_onnx (validated, logged in the temporary store): its ONNX folder, the
    served engine with the target's session_options, and onnxruntime-genai over the same files."""
    import mlflow

    from hf2mlflow.config import load_target
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.parity import GenAIModel, ServedModel

    run_id = convert(ConvertArgs(model=args.model, target=target))
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/onnx", dst_path=str(work)))
    options = load_target(target).session_options.model_dump(exclude_none=True)
    genai_options = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get(
        "session_options", {})
    return folder, options, genai_options, ServedModel.from_folder(folder, options, max_batch=BATCH), \
        GenAIModel(folder)


def measure_target(args, target: str, work: Path, reference, prompts, torch_tokens, held_out, cache) -> dict:
    ids = [p["id"] for p in prompts]
    prompt_ids = [p["ids"] for p in prompts]
    decode = reference.tokenizer.decode
    n = args.max_new_tokens
    print(f"[parity] converting {args.model} to {target}", flush=True)
    folder, options, genai_options, served, genai = open_models(args, target, work)
    print(f"[parity] {target}: greedy, {len(prompts)} prompts alone through the served engine", flush=True)
    alone = [served.greedy(p, n) for p in prompt_ids]
    before = Counter(served.engine.scheduler.batch_sizes)
    print(f"[parity] {target}: greedy, the same prompts queued {BATCH} at a time", flush=True)
    batch = served.greedy_together(prompt_ids, n)
    rows = Counter(served.engine.scheduler.batch_sizes)
    rows.subtract(before)
    rows = {int(k): int(v) for k, v in sorted(rows.items()) if v > 0}
    print(f"[parity] {target}: greedy through onnxruntime-genai", flush=True)
    genai_tokens = [genai.greedy(p, n) for p in prompt_ids]
    answers = {"torch": torch_tokens, "served": alone, "batch": batch, "genai": genai_tokens}
    pairs = {"served_vs_torch": ("torch", "served"), "genai_vs_torch": ("torch", "genai"),
             "batch_vs_torch": ("torch", "batch"), "batch_vs_alone": ("served", "batch"),
             "served_vs_genai": ("genai", "served")}
    greedy = {}
    for key, (a, b) in pairs.items():
        diff = differences(ids, answers[a], answers[b], decode)
        greedy[key] = {"identical": len(ids) - len(diff), "prompts": len(ids), "differ": diff}
    template = sum(served.prompt_ids(p["messages"]) == p["ids"] for p in prompts)

    from hf2mlflow.quality import teacher_forced

    bos = reference.bos_id
    print(f"[parity] {target}: teacher-forced, {len(held_out)} tokens in windows of {args.window}", flush=True)
    kld = {"served_vs_genai": teacher_forced(genai, served, held_out, args.window, None, bos),
           "served_vs_torch": teacher_forced(reference, served, held_out, args.window, cache, bos),
           "genai_vs_torch": teacher_forced(reference, genai, held_out, args.window, cache, bos)}
    return {"session_options": options, "genai_session_options": genai_options, "greedy": greedy,
            "template_ids_agree": template, "batch_rows": rows, "max_rows": max(rows, default=0),
            "new_tokens": {k: sum(map(len, v)) for k, v in answers.items()},
            "answers": {k: dict(zip(ids, v)) for k, v in answers.items()}, "kld": kld}


def threads(results: dict) -> str:
    """The threads each engine ran with: the target's session_options (served engine), genai_config.json's
    decoder session options (onnxruntime-genai); targets with the same settings are said once."""
    groups: dict[str, list[str]] = {}
    for target, row in results["targets"].items():
        served = row["session_options"]
        genai = {k: v for k, v in row["genai_session_options"].items() if "thread" in k or "spin" in k}
        said = (f"served engine {json.dumps(served) if served else 'none set'}, onnxruntime-genai "
                f"{json.dumps(genai) if genai else 'none set in genai_config.json'}")
        if not served.get("intra_op_num_threads") and not genai:
            said += (f": the served engine onnxruntime's default, one intra-op thread per physical core "
                     f"({results['physical_cores']}), onnxruntime-genai its own, half the logical cores "
                     f"({max(1, results['logical_cores'] // 2)})")
        groups.setdefault(said, []).append(target)
    return "; ".join(f"{' and '.join(names)} session_options: {said}" for said, names in groups.items())


def table(results: dict) -> str:
    targets = results["targets"]
    names = list(targets)
    lines = [f"Measured {results['date']} with `{results['command']}`: {results['model']}, {results['prompts']} "
             f"prompts of {results['dataset']} (greedy, at most {results['max_new_tokens']} new tokens, end of "
             f"sequence left out), every engine on the source tokenizer's prompt ids; teacher-forced: "
             f"{results['positions']} scored positions of the held-out text (windows of {results['window']} "
             f"tokens, second half scored). Served engine: hf2mlflow/parity.py ServedModel, the engine the logged "
             f"pyfunc serves with on CPU; onnxruntime-genai {results['versions'].get('onnxruntime-genai', '?')} "
             f"over the same files; PyTorch float32 on the source model. {results['machine']}; threads: "
             f"{threads(results)}.",
             "", "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]

    def row(label, cell):
        lines.append(f"| {label} | " + " | ".join(cell(targets[name]) for name in names) + " |")

    def count(key):
        return lambda t: f"{t['greedy'][key]['identical']}/{t['greedy'][key]['prompts']}"

    row("prompts", lambda t: str(t["greedy"]["served_vs_torch"]["prompts"]))
    row("served template gives the source's prompt ids", lambda t: f"{t['template_ids_agree']}/{results['prompts']}")
    row("greedy = PyTorch: served alone", count("served_vs_torch"))
    row("greedy = PyTorch: onnxruntime-genai alone", count("genai_vs_torch"))
    row(f"greedy = PyTorch: served in a batch of {BATCH}", count("batch_vs_torch"))
    row(f"served in a batch of {BATCH} = served alone", count("batch_vs_alone"))
    row("served alone = onnxruntime-genai alone", count("served_vs_genai"))
    row("most rows decoded together (decode steps at that size)",
        lambda t: f"{t['max_rows']} ({t['batch_rows'].get(t['max_rows'], 0)})")
    for key, ref, cand in KLD_PAIRS:
        row(f"mean KLD, {cand} against {ref}", lambda t, k=key: f"{t['kld'][k]['mean_kld']:.3g}")
        row(f"same top token, {cand} against {ref}", lambda t, k=key: f"{100 * t['kld'][k]['top1_agreement']:.1f}%")
    lines += ["", "Prompts whose greedy tokens differ (id@index of the first new token that differs):", ""]
    for name in names:
        for key, label in COMPARISONS:
            diff = targets[name]["greedy"][key]["differ"]
            listed = ", ".join(f"{d['id']}@{d['at']}" for d in diff) if diff else "none"
            lines.append(f"- {name}, {label}: {listed}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import mlflow
    import psutil

    from hf2mlflow.config import load_model
    from hf2mlflow.contract import installed
    from hf2mlflow.datasets import load_dataset
    from hf2mlflow.parity import TorchModel
    from hf2mlflow.quality import TEXT, held_out_ids, logits_cache
    from hf2mlflow.sources.resolve import resolve_model

    args = parse_args(argv)
    config, examples = load_dataset(DATASET)
    examples = examples[:args.limit] if args.limit else examples
    args.max_new_tokens = config.max_new_tokens
    source = resolve_model(load_model(args.model)).path
    print(f"[parity] reference: {args.model} in PyTorch float32 ({source})", flush=True)
    reference = TorchModel.from_folder(source)
    prompts = [{"id": e.id, "messages": e.messages, "ids": reference.prompt_ids(e.messages)} for e in examples]
    print(f"[parity] PyTorch greedy on {len(prompts)} prompts, {args.max_new_tokens} new tokens", flush=True)
    torch_tokens = [reference.greedy(p["ids"], args.max_new_tokens) for p in prompts]
    held_out, cache = held_out_ids(reference), logits_cache(source, reference)
    targets = {}
    with models_store("cpu", mlflow.get_tracking_uri()) as work:
        for number, target in enumerate(t for t in args.targets.split(",") if t):
            targets[target] = measure_target(args, target, work / f"model-{number}", reference, prompts,
                                             torch_tokens, held_out, cache)
    given = sys.argv[1:] if argv is None else argv
    results = {"date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["python -m benchmarks.served_parity", *given]),
               "model": args.model, "dataset": DATASET, "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens, "batch": BATCH, "window": args.window, "text": TEXT,
               "tokens": len(held_out),
               "positions": next(iter(targets.values()))["kld"]["served_vs_genai"]["positions"],
               "machine": f"{psutil.cpu_count()} cores, {cpu_name()}", "physical_cores": psutil.cpu_count(False),
               "logical_cores": psutil.cpu_count(),
               "versions": {p: installed(p) for p in ("onnxruntime-genai", "onnxruntime", "torch", "transformers")},
               "targets": targets}
    text = table(results)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "served_parity.json").write_text(json.dumps(results, indent=1))
    (out / "served_parity.md").write_text(text)
    print("\n" + text + f"\nresults: {out.resolve()} (served_parity.md, served_parity.json)")
    return results


if __name__ == "__main__":
    main()
