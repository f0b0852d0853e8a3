"""How fast, how big, how much memory: the project's models against the alternatives, measured in one run.

    python benchmarks/suite.py                   # 4-layer Phi-3-mini-shaped model (about 15 minutes here)
    python benchmarks/suite.py --layers 32       # the full 3.8 B model
    python benchmarks/suite.py --full-conversion # and convert the full 32-layer model too (section 5)
    python benchmarks/suite.py --quick           # tiny-phi3, a smoke run (the test suite runs this)
    python benchmarks/suite.py --update-docs     # and rewrite docs/performance.md's suite block from this run
    python benchmarks/suite.py --device cuda     # the cuda targets on an NVIDIA GPU (see DEVICES below)

What it compares, all on the same prompts and numbers of new tokens:
1. the logged ONNX pyfunc through MLflow vs a bare onnxruntime-genai loop on the same files (the wrapper's price);
2. the ONNX int4 pyfunc vs the transformers flavor in float32, and bfloat16 where the CPU has bf16 instructions
   (with --device cuda: float16, and bfloat16 where the GPU has it);
3. ONNX int4 vs int8 vs fp32 (cuda: int4 vs fp16): speed, size, greedy-token agreement with PyTorch;
4. `mlflow models serve` with 1, 4 and 8 concurrent clients;
5. conversion: time and builder peak RSS against the checkpoint's size; with --full-conversion also the full
   32-layer model in bf16, as published (benchmarks/convert_memory.py compares the two builder paths);
6. time to first token for prompts of about 64, 1024 and 3000 tokens.

Every model answers in fresh processes (its own load time and peak RSS), in rounds that interleave the models
(A, B, C, A, B, C, ...) after a warm-up; figures are medians over rounds with their min-max. Time to first
token is a one-token request for every model; decode rate is (new tokens - 1) / (answer time - that). The models are
converted and logged into a temporary MLflow store; the benchmark itself is one MLflow run (experiment
"benchmarks") in the tracking store in use, with every figure as a metric and the table, JSON and chart as
artifacts, also written to benchmarks/results/ (suite-cuda.* for --device cuda).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf2mlflow import PROJECT_ROOT  # noqa: E402
from hf2mlflow.runtime.manifest import folder_bytes  # noqa: E402

from docs_blocks import update_docs  # noqa: E402

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
# What each --device benchmarks. onnx: the shipped targets converted and logged, the int4 one first (the bare loop,
# serving and prompt lengths use it) and the widest last (its logits are compared with PyTorch's); transformers: the
# flavor's dtypes on that device (bfloat16 only where the hardware has it, and not with --quick); env: set for the
# measuring processes (on cpu no GPU is visible: MLflow would load the transformers flavor onto one where it is).
DEVICES = {
    "cpu": {"onnx": ["cpu-int4", "cpu-int8", "cpu-fp32"], "transformers": ["float32", "bfloat16"],
            "env": {"CUDA_VISIBLE_DEVICES": ""}},
    "cuda": {"onnx": ["cuda-int4", "cuda-fp16"], "transformers": ["float16", "bfloat16"], "env": {}},
}
QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Explain what a hash function does in one sentence.", "Give me a short tip for learning to cook."]


# --- measured in fresh processes -------------------------------------------------------------------------------

class PyfuncRunner:
    """A logged model through mlflow.pyfunc, as users call it."""

    def __init__(self, path: str):
        import mlflow

        self.model = mlflow.pyfunc.load_model(path)
        self.streams = hasattr(self.model, "predict_stream") and self._streams()

    def _streams(self) -> bool:
        try:
            for _ in self.model.predict_stream({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}):
                pass
            return True
        except Exception:  # the transformers flavor's chat task does not stream
            return False

    def first_token(self, messages, max_tokens) -> float:
        # A one-token request, for every model alike: prompt processing, the first token and the wrapper. (The
        # first streamed text is no measure here: a random model's tokens often decode to no text at all.)
        return self.answer(messages, 1)[0]

    def stream(self, messages, max_tokens) -> float:
        """Seconds to stream the whole answer through predict_stream; NaN where the flavor does not stream."""
        if not self.streams:
            return float("nan")
        start = time.perf_counter()
        for _ in self.model.predict_stream({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}):
            pass
        return time.perf_counter() - start

    def answer(self, messages, max_tokens) -> tuple[float, int, int]:
        start = time.perf_counter()
        (response,) = self.model.predict({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
        usage = response["usage"]
        return time.perf_counter() - start, usage["prompt_tokens"], usage["completion_tokens"]


class BareGenAIRunner:
    """The same ONNX files with onnxruntime-genai alone: the loop its own examples show."""

    def __init__(self, path: str):
        import onnxruntime_genai as og

        self.og = og
        (config,) = Path(path).rglob("genai_config.json")
        self.model = og.Model(str(config.parent))
        self.tokenizer = og.Tokenizer(self.model)

    def _generate(self, messages, max_tokens, first_only: bool):
        start = time.perf_counter()
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        stream, count = self.tokenizer.create_stream(), 0
        while not generator.is_done():
            generator.generate_next_token()
            stream.decode(generator.get_next_tokens()[0])
            count += 1
            if first_only:
                break
        return time.perf_counter() - start, len(ids), count

    def first_token(self, messages, max_tokens) -> float:
        return self._generate(messages, max_tokens, first_only=True)[0]

    def stream(self, messages, max_tokens) -> float:
        return float("nan")  # the loop above is already token by token

    def answer(self, messages, max_tokens) -> tuple[float, int, int]:
        return self._generate(messages, max_tokens, first_only=False)


def measure(kind: str, path: str, prompts: list, max_tokens: int) -> dict:
    """Load, warm up, then per prompt: time to first token, latency and decode rate. Runs in a fresh process."""
    from hf2mlflow.evaluate.worker import peak_rss_bytes

    start = time.perf_counter()
    runner = BareGenAIRunner(path) if kind == "genai" else PyfuncRunner(path)
    load_s = time.perf_counter() - start
    runner.answer(prompts[0], 2)
    runner.first_token(prompts[0], max_tokens)
    samples = []
    for messages in prompts:
        ttft = runner.first_token(messages, max_tokens)
        latency, prompt_tokens, new_tokens = runner.answer(messages, max_tokens)
        streamed = runner.stream(messages, max_tokens)  # greedy: the same tokens as the answer

        def rate(seconds):
            return (new_tokens - 1) / (seconds - ttft) if new_tokens > 1 and seconds > ttft else float("nan")

        samples.append({"ttft_s": ttft, "latency_s": latency, "prompt_tokens": prompt_tokens,
                        "new_tokens": new_tokens, "decode_tps": rate(latency), "stream_decode_tps": rate(streamed)})
    return {"load_s": load_s, "peak_rss_bytes": peak_rss_bytes(),
            "samples": samples}


def in_fresh_process(*args) -> dict:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


# --- setup ----------------------------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def has_bf16(device: str) -> bool:
    if device == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def cuda_problems() -> list[str]:
    """Why --device cuda cannot run here; empty where it can. Cheap: checked before anything is built."""
    problems = []
    import torch

    if not torch.cuda.is_available():
        build = ("a CPU-only build" if torch.version.cuda is None
                 else f"built for CUDA {torch.version.cuda}, but it finds no usable GPU or driver")
        problems.append(f"torch.cuda.is_available() is False (torch {torch.__version__}, {build}): the transformers "
                        f"flavor cannot run on cuda")
    try:
        import onnxruntime_genai as og

        genai_cuda, package = og.is_cuda_available(), getattr(og, "__id__", "onnxruntime-genai")
    except Exception as exc:  # a broken CUDA build can fail to import
        genai_cuda, package = False, f"onnxruntime_genai (does not import: {exc})"
    if not genai_cuda:
        version = installed("onnxruntime-genai-cuda")
        problems.append(f"onnxruntime-genai has no CUDA execution provider (onnxruntime_genai.is_cuda_available() is "
                        f"False; the module in use is {package}; "
                        + (f"onnxruntime-genai-cuda {version} is installed, but not the module imported" if version
                           else "the onnxruntime-genai-cuda package is not installed")
                        + f"): the {' and '.join(DEVICES['cuda']['onnx'])} ONNX models cannot run")
    return problems


def prepare_models(source: Path, work: Path, device: str, bf16: bool) -> dict:
    """Convert and log every model compared into a temporary store; returns name -> info."""
    import mlflow
    import yaml

    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
    from hf2mlflow.contract import SHORT_DTYPE
    from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers

    models = {}
    for target in DEVICES[device]["onnx"]:
        print(f"[setup] converting and logging {target}", flush=True)
        run_id = convert(ConvertArgs(model=str(source), target=target))
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run_id))
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / target)))
        conversion = conversion_figures(run_id, source)
        models[f"onnx-{target.split('-')[1]}"] = {
            "kind": "pyfunc", "path": str(path), "uri": uri, "size_bytes": conversion["size_bytes"],
            "conversion": conversion, "target": target}
    models["genai-int4 (bare)"] = {**models["onnx-int4"], "kind": "genai"}
    for dtype in [d for d in DEVICES[device]["transformers"] if d != "bfloat16" or bf16]:
        print(f"[setup] logging the transformers flavor ({dtype} on {device})", flush=True)
        target = work / f"{device}-{dtype}.yaml"
        target.write_text(yaml.safe_dump({"description": f"transformers {dtype} on {device} (benchmark)",
                                          "execution_provider": device, "precision": "fp32",
                                          "transformers": {"device": device, "dtype": dtype}}))
        uri = log_transformers(LogTransformersArgs(model=str(source), target=str(target),
                                                   registered_model_name=f"bench-transformers-{dtype}"))
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / f"transformers-{dtype}")))
        models[f"transformers-{SHORT_DTYPE[dtype]}"] = {
            "kind": "pyfunc", "path": str(path), "uri": uri, "size_bytes": folder_bytes(path)}
    return models


def conversion_figures(run_id: str, source: Path) -> dict:
    """A convert_onnx run's time, builder peak and output size, and the peak against the checkpoint's size."""
    import mlflow

    from hf2mlflow.convert.memory_plan import checkpoint_size

    run = mlflow.get_run(run_id)
    m = run.data.metrics
    return {"seconds": m["conversion_seconds"], "peak_rss_gib": m["builder_peak_rss_bytes"] / 2**30,
            "peak_over_checkpoint": m["builder_peak_rss_bytes"] / checkpoint_size(source).stored_bytes,
            "size_bytes": int(m["artifact_bytes"]), "size_mib": m["artifact_bytes"] / 2**20,
            "builder_path": run.data.params.get("builder_path", "standard")}


def full_size_conversion(device: str, source: Path) -> tuple[str, dict]:
    """The int4 conversion of the full-size model (bf16 checkpoint, as published), by the path `auto` picks."""
    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.convert.memory_plan import checkpoint_size

    target, layers = DEVICES[device]["onnx"][0], json.loads((source / "config.json").read_text())["num_hidden_layers"]
    print(f"[setup] converting the full-size model ({layers} layers) to {target}", flush=True)
    figures = conversion_figures(convert(ConvertArgs(model=str(source), target=target)), source)
    return f"onnx-int4, {layers} layers ({checkpoint_size(source).parameters / 1e9:.2f} B)", figures


def prompt_of_length(tokenizer, tokens: int) -> list[dict]:
    """A user message whose chat prompt is about `tokens` tokens long."""
    words = (PROJECT_ROOT / "hf2mlflow" / "sources" / "data" / "tiny_corpus.txt").read_text(encoding="utf-8").split()

    def length(n):
        messages = [{"role": "user", "content": " ".join(words[i % len(words)] for i in range(n))}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)), messages

    low, high = 1, tokens  # a word is at least one token
    while low < high:
        mid = (low + high + 1) // 2
        if length(mid)[0] <= tokens:
            low = mid
        else:
            high = mid - 1
    return length(low)[1]


# --- sections -------------------------------------------------------------------------------------------------

def summarize(values: list[float]) -> dict:
    values = [v for v in values if v == v]  # drop NaN
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def median(values: list[float]) -> float:
    """Median of the known values (a rate is NaN where the answer took no longer than its first token)."""
    return summarize(values).get("median", float("nan"))


def speed_rounds(models: dict, prompts: list, max_tokens: int, rounds: int) -> dict:
    per_model = {name: [] for name in models}
    for r in range(rounds):
        for name, info in models.items():
            print(f"[speed] round {r + 1}/{rounds}: {name}", flush=True)
            per_model[name].append(in_fresh_process(info["kind"], info["path"], prompts, max_tokens))
    results = {}
    for name, measured in per_model.items():
        results[name] = {
            "decode_tps": summarize([median([s["decode_tps"] for s in m["samples"]]) for m in measured]),
            "stream_decode_tps": summarize([median([s["stream_decode_tps"] for s in m["samples"]])
                                            for m in measured]),
            "ttft_ms": summarize([1000 * statistics.median([s["ttft_s"] for s in m["samples"]]) for m in measured]),
            "load_s": summarize([m["load_s"] for m in measured]),
            "peak_rss_gib": summarize([m["peak_rss_bytes"] / 2**30 for m in measured]),
            "new_tokens": statistics.median([s["new_tokens"] for m in measured for s in m["samples"]]),
            "size_mib": models[name]["size_bytes"] / 2**20,
            "samples": [m["samples"] for m in measured],
        }
    return results


def parity(source: Path, models: dict, prompts: list, max_tokens: int) -> dict:
    from hf2mlflow.parity import GenAIModel, TorchModel, compare
    from hf2mlflow.parity import summarize as summarize_parity

    reference = TorchModel.from_folder(source)
    out, names = {}, [name for name, info in models.items() if "target" in info and info["kind"] == "pyfunc"]
    for name in names:
        (config,) = Path(models[name]["path"]).rglob("genai_config.json")
        out[name] = summarize_parity(compare(reference, GenAIModel(config.parent), prompts, max_tokens,
                                             with_logits=name == names[-1]))
    return out


def served(model: dict, prompts: list, max_tokens: int, concurrency: list[int], per_client: int, log: Path) -> dict:
    port = _free_port()
    env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    command = ["mlflow", "models", "serve", "-m", model["path"], "--env-manager", "local", "--host", "127.0.0.1",
               "-p", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow models serve did not come up: {log.read_text()[-2000:]}")
                time.sleep(0.5)

        def call(messages):
            body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}).encode()
            request = urllib.request.Request(f"{url}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    answer = json.loads(response.read())
                usage = answer["usage"] if isinstance(answer, dict) else answer[0]["usage"]
                return time.perf_counter() - start, usage["completion_tokens"], None
            except Exception as exc:  # counted, not raised: the figure is the error count
                return time.perf_counter() - start, 0, getattr(exc, "code", None) or repr(exc)

        call(prompts[0])  # warm-up
        results = {}
        for clients in concurrency:
            jobs = [prompts[i % len(prompts)] for i in range(clients * per_client)]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(call, jobs))
            wall = time.perf_counter() - start
            latencies = sorted(a[0] for a in answers)
            results[clients] = {
                "requests": len(jobs), "errors": sum(a[2] is not None for a in answers),
                "timeouts": sum(a[2] == 504 for a in answers),
                "requests_per_s": len(jobs) / wall, "tokens_per_s": sum(a[1] for a in answers) / wall,
                "latency_p50_s": latencies[len(latencies) // 2],
                "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}
            print(f"[served] {clients} clients: {results[clients]}", flush=True)
        return results
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_lengths(model: dict, tokenizer, lengths: list[int], rounds: int) -> dict:
    prompts = [prompt_of_length(tokenizer, n) for n in lengths]
    measured = [in_fresh_process(model["kind"], model["path"], prompts, 2) for _ in range(rounds)]
    out = {}
    for i, n in enumerate(lengths):
        out[n] = {"prompt_tokens": measured[0]["samples"][i]["prompt_tokens"],
                  "ttft_ms": summarize([1000 * m["samples"][i]["ttft_s"] for m in measured])}
    return out


# --- report ---------------------------------------------------------------------------------------------------

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
    for n, p in r["prompt_lengths"].items():
        add(f"| {p['prompt_tokens']} | {_range(p['ttft_ms'])} |")
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
    for n, p in r["prompt_lengths"].items():
        metrics[key("ttft_ms_at_prompt", p["prompt_tokens"])] = p["ttft_ms"]["median"]
    return metrics


def installed(package: str) -> str:
    """The package's version; '' where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(argv=None) -> dict:
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
            + "Nothing was built or measured, and no results were written. To benchmark the cuda targets: on a "
              "machine with an NVIDIA GPU and its driver, install a CUDA build of torch and onnxruntime-genai-cuda of "
              f"the same version in place of onnxruntime-genai (pip uninstall -y onnxruntime-genai && pip install "
              f"onnxruntime-genai-cuda=={installed('onnxruntime-genai') or 'VERSION'}: both provide the "
              "onnxruntime_genai module), then run this again. Without --device cuda the suite benchmarks the CPU.")

    import mlflow
    from transformers import AutoTokenizer

    from hf2mlflow.convert.memory_plan import checkpoint_size
    from hf2mlflow.sources.tiny import phi3_mini_shape_path, tiny_model_path

    if args.quick:
        args.rounds, args.max_tokens = 1, 32  # with fewer, the decode time of tiny-phi3 is within timing noise
    source = tiny_model_path("tiny-phi3") if args.quick else phi3_mini_shape_path(args.layers)
    label = "tiny-phi3" if args.quick else f"Phi-3-mini-shaped model, {args.layers} layers, bf16 checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(source)
    context = 2048 if args.quick else 4096
    lengths = [64, 512, 1536] if args.quick else [64, 1024, 3000]
    assert max(lengths) + args.max_tokens < context
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[: 2 if args.quick else len(QUESTIONS)]]
    bf16 = has_bf16(args.device) and not args.quick
    user_tracking_uri = mlflow.get_tracking_uri()
    started = time.time()

    with tempfile.TemporaryDirectory(prefix="hf2mlflow-bench-") as work:
        work = Path(work)
        os.environ["MLFLOW_TRACKING_URI"] = store = f"sqlite:///{work}/models.db"
        mlflow.set_tracking_uri(store)
        os.environ.update(DEVICES[args.device]["env"])
        try:
            models = prepare_models(source, work, args.device, bf16)
            # --quick: tiny-phi3 stands in for the full-size model, so the option cannot rot.
            full = full_size_conversion(args.device, source if args.quick else phi3_mini_shape_path(32)) \
                if args.full_conversion else None
            size = checkpoint_size(source)
            speed = speed_rounds(models, prompts, args.max_tokens, args.rounds)
            print("[parity] greedy tokens vs PyTorch", flush=True)
            agreement = parity(source, models, prompts, args.max_tokens)
            serving = served(models["onnx-int4"], prompts, args.max_tokens, [1, 4, 8, 16], 1 if args.quick else 4,
                             work / "serve.log")
            print("[prompt length] time to first token", flush=True)
            lengths_result = prompt_lengths(models["onnx-int4"], tokenizer, lengths, args.rounds)
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = user_tracking_uri
            mlflow.set_tracking_uri(user_tracking_uri)

    conversion = {name: m["conversion"] for name, m in models.items() if name.startswith("onnx-")}
    if full:
        conversion[full[0]] = full[1]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import psutil
    import torch

    command = ("python benchmarks/suite.py" + (" --quick" if args.quick else f" --layers {args.layers}")
               + ("" if args.device == "cpu" else f" --device {args.device}")
               + (" --full-conversion" if args.full_conversion else ""))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    results = {
        "date": time.strftime("%Y-%m-%d"), "command": command, "model": label, "parameters": size.parameters,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "seconds": time.time() - started,
        "device": args.device, "onnx_targets": DEVICES[args.device]["onnx"],
        "machine": {"cores": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30, "cpu": cpu,
                    "bf16": has_bf16(args.device),
                    "gpu": (f"{gpu} (--device cuda)" if args.device == "cuda" else
                            f"{gpu} unused (--device cpu)" if gpu else "no GPU")},
        "versions": {p: installed(p) for p in ("mlflow", "onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime",
                                               "onnxruntime-gpu", "transformers", "torch") if installed(p)},
        "speed": speed, "targets": targets(speed), "parity": agreement, "served": serving,
        "conversion": conversion, "prompt_lengths": lengths_result,
    }
    table = report(results)
    out, stem = Path(args.output_dir), "suite" if args.device == "cpu" else f"suite-{args.device}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    chart(results, out / f"{stem}.png")

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"{stem}-{'quick' if args.quick else f'{args.layers}l'}") as run:
        mlflow.log_params({"model": label, "device": args.device, "gpu": results["machine"]["gpu"][:250],
                           "layers": 0 if args.quick else args.layers, "rounds": args.rounds,
                           "max_tokens": args.max_tokens, "cores": results["machine"]["cores"],
                           "memory_gib": round(results["machine"]["memory_gib"], 1), "cpu": cpu[:250],
                           **{f"version.{k}": v for k, v in results["versions"].items()}})
        mlflow.log_metrics(flat_metrics(results))
        for name in (f"{stem}.md", f"{stem}.json", f"{stem}.png"):
            mlflow.log_artifact(str(out / name))
    if args.update_docs:
        update_docs(table)
    print("\n" + table)
    print(f"results: {out.resolve()} ({stem}.md, {stem}.json, {stem}.png); MLflow run {run.info.run_id} in "
          f"experiment 'benchmarks' at {mlflow.get_tracking_uri()}; `mlflow ui` shows it"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return results


if __name__ == "__main__":
    main()
