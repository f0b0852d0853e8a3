"""benchmarks/suite.py, the results: one dict (JSON), its Markdown tables, the chart, and the MLflow run.

The Markdown is what `--update-docs` writes into docs/performance.md's `benchmarks` block.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from hf2mlflow.contract import installed
from hf2mlflow.measure import cpu_name
from benchmarks.suite_setup import DEVICES, has_bf16


def collect(args, inputs, started: float, models: dict, full, speed: dict, agreement: dict, serving: dict,
            lengths: dict, llama_cpp: dict | None = None) -> dict:
    """Everything measured, with the command, the machine and the versions it ran with."""
    import psutil
    import torch

    from hf2mlflow.convert.memory_plan import checkpoint_size

    size = checkpoint_size(inputs.source)
    conversion = {name: m["conversion"] for name, m in models.items() if name.startswith("onnx-")}
    if full:
        conversion[full[0]] = full[1]
    command = ("python -m benchmarks.suite" + (" --quick" if args.quick else f" --layers {args.layers}")
               + ("" if args.device == "cpu" else f" --device {args.device}")
               + (" --full-conversion" if args.full_conversion else ""))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {
        "date": time.strftime("%Y-%m-%d"), "command": command, "model": inputs.label, "parameters": size.parameters,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "seconds": time.time() - started,
        "device": args.device, "onnx_targets": DEVICES[args.device]["onnx"],
        "machine": {"cores": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30, "cpu": cpu_name(),
                    "bf16": has_bf16(args.device),
                    "gpu": (f"{gpu} (--device cuda)" if args.device == "cuda" else
                            f"{gpu} unused (--device cpu)" if gpu else "no GPU")},
        "versions": {p: installed(p) for p in ("mlflow", "onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime",
                                               "onnxruntime-gpu", "transformers", "torch") if installed(p)},
        "speed": speed, "targets": targets(speed), "parity": agreement, "served": serving,
        "conversion": conversion, "prompt_lengths": lengths, "llama_cpp": llama_cpp,
    }


def _range(s: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})" if s else "n/a"


def report(r: dict) -> str:
    speed, lines = r["speed"], []
    add = lines.append
    add(f"Measured {r['date']} on {r['machine']['cores']} cores, {r['machine']['memory_gib']:.0f} GiB, "
        f"{r['machine']['cpu']}, {r['machine']['gpu']}, with `{r['command']}`: {r['model']} "
        f"({r['parameters'] / 1e9:.2f} B parameters), {r['max_tokens']} new tokens per answer, "
        f"{r['rounds']} interleaved rounds of fresh processes; medians with min-max"
        + ("." if r["device"] == "cpu" else "; peak RSS is host memory (GPU memory is not measured)."))
    add("")
    add("| model | decode tok/s | streamed decode tok/s | time to first token ms | load s | peak RSS GiB | "
        "size MiB |")
    add("|---|---|---|---|---|---|---|")
    for name, m in speed.items():
        add(f"| {name} | {_range(m['decode_tps'])} | {_range(m['stream_decode_tps'])} | {_range(m['ttft_ms'])} | "
            f"{_range(m['load_s'], '{:.2f}')} | "
            f"{_range(m['peak_rss_gib'], '{:.2f}')} | {m['size_mib']:.1f} |")
    add("")
    add("| comparison | measured | target | met |")
    add("|---|---|---|---|")
    for row in r["targets"]:
        add(f"| {row['what']} | {row['measured']} | {row['target']} | {row['met']} |")
    add("")
    add("| ONNX precision | identical greedy answers vs PyTorch | matched share | logits max diff |")
    add("|---|---|---|---|")
    for name, p in r["parity"].items():
        diff = p.get("parity_logits_max_abs_diff")
        add(f"| {name} | {p['parity_identical_rate']:.0%} | {p['parity_matched_share']:.0%} | "
            f"{'n/a' if diff is None else f'{diff:.1e}'} |")
    add("")
    add("| served (onnx-int4, `mlflow models serve`) | requests | errors | requests/s | tokens/s | p50 s | p95 s |")
    add("|---|---|---|---|---|---|---|")
    for clients, s in r["served"].items():
        add(f"| {clients} concurrent clients | {s['requests']} | {s['errors']} | {s['requests_per_s']:.2f} | "
            f"{s['tokens_per_s']:.1f} | {s['latency_p50_s']:.2f} | {s['latency_p95_s']:.2f} |")
    add("")
    add("| conversion (builder, auto path) | seconds | builder peak RSS GiB | peak / checkpoint | output MiB |")
    add("|---|---|---|---|---|")
    for name, c in r["conversion"].items():
        add(f"| {name} ({c['builder_path']}) | {c['seconds']:.1f} | {c['peak_rss_gib']:.2f} | "
            f"{c['peak_over_checkpoint']:.2f}x | {c['size_mib']:.1f} |")
    add("")
    add("| prompt tokens (onnx-int4 pyfunc) | time to first token ms |")
    add("|---|---|")
    for p in r["prompt_lengths"].values():
        add(f"| {p['prompt_tokens']} | {_range(p['ttft_ms'])} |")
    if llama := r.get("llama_cpp"):
        add("")
        if "skipped" in llama:
            add(f"llama.cpp (section 7): skipped, {llama['skipped']}.")
        else:
            add("llama.cpp beside our conversions, on another model: the trained SmolLM2-135M-Instruct "
                "(benchmarks/llama_cpp_peer.py; no quality pass here).")
            add("")
            add(llama["table"].split("\n\n", 1)[1].rstrip("\n"))
    return "\n".join(lines) + "\n"


def targets(speed: dict) -> list[dict]:
    def med(name, figure):
        return speed[name][figure].get("median", float("nan"))

    def row(what, value, fmt, target, ok):
        known = value == value
        return {"what": what, "measured": fmt.format(value) if known else "n/a", "target": target,
                "met": ("yes" if ok(value) else "no") if known and ok else ("" if not ok else "no data")}

    rows = [row("pyfunc / bare onnxruntime-genai loop, decode",
                med("onnx-int4", "decode_tps") / med("genai-int4 (bare)", "decode_tps"), "{:.3f}x", ">= 0.97x",
                lambda v: v >= 0.97),
            row("pyfunc predict_stream / bare loop, decode",
                med("onnx-int4", "stream_decode_tps") / med("genai-int4 (bare)", "decode_tps"), "{:.3f}x",
                ">= 0.97x", lambda v: v >= 0.97),
            row("pyfunc - bare loop, time to first token",
                med("onnx-int4", "ttft_ms") - med("genai-int4 (bare)", "ttft_ms"), "{:+.1f} ms", "<= 10 ms",
                lambda v: v <= 10)]
    for name in [n for n in speed if n.startswith("transformers-")]:
        rows += [row(f"onnx-int4 / {name}, decode", med("onnx-int4", "decode_tps") / med(name, "decode_tps"),
                     "{:.1f}x", ">= 6x", lambda v: v >= 6),
                 row(f"onnx-int4 / {name}, artifact size", speed["onnx-int4"]["size_mib"] / speed[name]["size_mib"],
                     "{:.2f}x", "<= 0.3x", lambda v: v <= 0.3),
                 row(f"onnx-int4 / {name}, time to first token", med("onnx-int4", "ttft_ms") / med(name, "ttft_ms"),
                     "{:.2f}x", "(none)", None)]
    return rows


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(r["speed"])
    left.barh(names, [r["speed"][n]["decode_tps"].get("median", 0) for n in names], color="tab:blue")
    left.set_xlabel("decode tokens/s (median)")
    left.set_title(f"{r['model']}: decode speed")
    lengths = list(r["prompt_lengths"].values())
    right.plot([p["prompt_tokens"] for p in lengths], [p["ttft_ms"]["median"] for p in lengths], marker="o")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("time to first token, ms (onnx-int4)")
    right.set_title("time to first token vs prompt length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flat_metrics(r: dict) -> dict:
    def key(*parts):
        return re.sub(r"[^\w.\-/ ]", "", ".".join(str(p) for p in parts)).replace(" ", "_")

    metrics = {}
    for name, m in r["speed"].items():
        for figure in ("decode_tps", "stream_decode_tps", "ttft_ms", "load_s", "peak_rss_gib"):
            if m[figure]:
                metrics[key(name, figure)] = m[figure]["median"]
        metrics[key(name, "size_mib")] = m["size_mib"]
    for name, p in r["parity"].items():
        for figure, value in p.items():
            metrics[key(name, figure)] = value
    for clients, s in r["served"].items():
        for figure, value in s.items():
            metrics[key("served", f"{clients}_clients", figure)] = value
    for name, c in r["conversion"].items():
        for figure in ("seconds", "peak_rss_gib", "peak_over_checkpoint"):
            metrics[key("conversion", name, figure)] = c[figure]
    for p in r["prompt_lengths"].values():
        metrics[key("ttft_ms_at_prompt", p["prompt_tokens"])] = p["ttft_ms"]["median"]
    for name, s in ((r.get("llama_cpp") or {}).get("speed") or {}).items():
        metrics[key("llama_peer", name, "decode_tps")] = s["decode_tps"]["median"]
        for n, t in s["ttft_ms"].items():
            metrics[key("llama_peer", name, f"ttft_ms_at_{n}")] = t["median"]
    return metrics


def write_results(results: dict, table: str, output_dir: str) -> tuple[Path, str]:
    """suite.{md,json,png} (suite-DEVICE.* off the cpu) in output_dir; returns the folder and the stem."""
    out, stem = Path(output_dir), "suite" if results["device"] == "cpu" else f"suite-{results['device']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    chart(results, out / f"{stem}.png")
    return out, stem


def log_run(results: dict, args, out: Path, stem: str):
    """The benchmark as one MLflow run (experiment "benchmarks"): every figure a metric, the files artifacts."""
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"{stem}-{'quick' if args.quick else f'{args.layers}l'}") as run:
        mlflow.log_params({"model": results["model"], "device": args.device, "gpu": results["machine"]["gpu"][:250],
                           "layers": 0 if args.quick else args.layers, "rounds": args.rounds,
                           "max_tokens": args.max_tokens, "cores": results["machine"]["cores"],
                           "memory_gib": round(results["machine"]["memory_gib"], 1),
                           "cpu": results["machine"]["cpu"][:250],
                           **{f"version.{k}": v for k, v in results["versions"].items()}})
        mlflow.log_metrics(flat_metrics(results))
        for name in (f"{stem}.md", f"{stem}.json", f"{stem}.png"):
            mlflow.log_artifact(str(out / name))
    return run
