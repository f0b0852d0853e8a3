"""Why the fastest is fast: where a greedy generation's time goes, per operator type, in onnxruntime-genai and in
llama.cpp, on the same trained weights.

    python -m benchmarks.op_profile                    # our cpu-int4 of smollm2-135m-instruct and llama.cpp Q4_1
    python -m benchmarks.op_profile --update-docs      # and rewrite docs/performance.md's op_profile block
    python -m benchmarks.op_profile --onnx-model pick=models:/smollm2-sweep@best --tokens 64
    python -m benchmarks.op_profile --onnx-model fp32=/path/to/onnx/folder --no-llama

ONNX side: onnxruntime's own profiler, switched on through genai_config's decoder session option
`enable_profiling` (a file prefix; og.Config(folder).overlay(...)), with the session options of
hf2mlflow.measure's bare runner (the logged model's, intra_op_num_threads = --threads). The
Chrome trace it writes when the session closes holds one `model_run` event per forward pass and one event per
kernel run; kernels are summed per op type (op_name), split into prefill (the first forward pass: the prompt) and
decode (the others, one per generated token after the first).

llama.cpp side: llama-cpp-python's binding exposes llama.cpp's own counters (`llama_perf_context`: prompt eval and
eval ms per token; `llama_perf_sampler`: sampling) but no per-op breakdown, and GGML of this version has no
per-op timer (GGML_PERF is gone; GGML_SCHED_DEBUG prints the graph split, not times). What it has is the
scheduler's eval callback (`cb_eval` of llama_context_params, the hook llama.cpp's eval-callback and imatrix tools
use): asked for every node, the scheduler computes the graph one node at a time and reports each, so the time
between the reports is that node's compute. That is a per-op breakdown, measured with a synchronization after
every node (slower in total than a normal run, which computes the graph in one go); the shares are the point.
Both profiles run in fresh processes after a warm-up generation; both runtimes decode the same `--tokens` greedy
tokens (end of sequence ignored) for the same chat prompt, rendered by each runtime's own chat template.

Writes benchmarks/results/op_profile.{md,json}.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.llama_cpp_peer import (CHAT, LlamaRunner, command_line, extra_onnx, llama_cpp_problem,
                                       onnx_runtimes, own_cpu_seconds, quiet_fresh, shipped_gguf, versions,
                                       wait_until_idle)

RESULTS = Path(__file__).resolve().parent / "results"
TOP = 12  # op types per table; the rest are summed in one row


# ---------------------------------------------------------------------------------------------------------------
# onnxruntime-genai


def onnx_profile(folder: str, session_options: dict, threads: int, tokens: int, messages: list[dict],
                 prefix: str) -> dict:
    """Greedy generation of `tokens` tokens with onnxruntime's profiler on, the session options those of
    hf2mlflow.measure's bare runner; returns the wall times and the path of the trace. In a fresh process."""
    import onnxruntime_genai as og

    from hf2mlflow.measure import bare_session_options
    from hf2mlflow.runtime.genai_chat import genai_session_options

    def model(profile: bool):
        config = og.Config(folder)
        options = genai_session_options(bare_session_options(session_options, threads))
        if profile:
            options["enable_profiling"] = prefix
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        return og.Model(config)

    def generate(m, n):
        tokenizer = og.Tokenizer(m)
        ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        start = time.perf_counter()
        generator = og.Generator(m, params)
        generator.append_tokens(ids)
        count, first = 0, 0.0
        while not generator.is_done() and count < n:
            generator.generate_next_token()
            count += 1
            if count == 1:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        return {"prompt_tokens": len(ids), "new_tokens": count, "ttft_ms": 1000 * first,
                "decode_tps": (count - 1) / (total - first) if count > 1 else float("nan")}

    plain = model(False)
    generate(plain, 4)
    unprofiled = generate(plain, tokens)  # the same generation without the profiler, for scale
    del plain
    m = model(True)
    generate(m, 4)  # warm-up, inside the profile (its forward passes are told apart below)
    profiled = generate(m, tokens)
    del m
    gc.collect()  # the session writes its trace when it closes
    traces = sorted(Path(prefix).parent.glob(Path(prefix).name + "*.json"))
    return {"unprofiled": unprofiled, "profiled": profiled, "trace": str(traces[-1]) if traces else "",
            "warmup_runs": 4, "cpu_s": own_cpu_seconds()}


def onnx_aggregate(trace: Path, warmup_runs: int) -> dict:
    """Kernel time per op type in prefill and decode, from an onnxruntime Chrome trace."""
    events = json.loads(Path(trace).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    runs = runs[warmup_runs:]  # the warm-up generation's forward passes
    phases = {"prefill": runs[:1], "decode": runs[1:]}
    totals = {phase: collections.defaultdict(lambda: [0.0, 0]) for phase in phases}
    starts = [start for start, _ in runs]
    for e in events:
        if e.get("cat") != "Node" or "op_name" not in e.get("args", {}):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1  # the forward pass this kernel ran in, if any
        if i < 0 or e["ts"] > runs[i][1]:
            continue
        entry = totals["prefill" if i == 0 else "decode"][e["args"]["op_name"]]
        entry[0] += e["dur"] / 1000
        entry[1] += 1
    return {phase: {"forward_passes": len(phases[phase]),
                    "run_ms": sum(end - start for start, end in phases[phase]) / 1000,
                    "ops": {op: {"ms": ms, "count": count} for op, (ms, count) in totals[phase].items()}}
            for phase in phases}


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp


def llama_profile(path: str, threads: int, tokens: int, messages: list[dict]) -> dict:
    """llama.cpp's own counters for a normal greedy generation, then the same generation with an eval callback
    that asks for every graph node (per-node compute times). In a fresh process."""
    import llama_cpp
    from llama_cpp._internals import LlamaContext

    runner = LlamaRunner(path, threads, 2048)
    llm = runner.llm
    ids = runner.encode(messages)
    runner.generate(ids, 4, stop_at_end=False)  # warm-up

    def counters():
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        first, total, out = runner.generate(ids, tokens, stop_at_end=False)
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        return {"prompt_tokens": len(ids), "new_tokens": len(out), "ttft_ms": 1000 * first,
                "decode_tps": (len(out) - 1) / (total - first), "t_p_eval_ms": perf.t_p_eval_ms,
                "n_p_eval": perf.n_p_eval, "t_eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval,
                "wall_ms": 1000 * total}

    plain = counters()
    sampler = {}
    if getattr(llm, "_sampler", None) is not None:
        try:
            s = llama_cpp.llama_perf_sampler(llm._sampler.sampler)
            sampler = {"t_sample_ms": s.t_sample_ms, "n_sample": s.n_sample}
        except Exception as exc:  # the sampler chain's layout differs between binding versions
            sampler = {"error": repr(exc)}

    base = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))
    base.ggml_op_desc.restype = ctypes.c_char_p
    base.ggml_op_desc.argtypes = [ctypes.c_void_p]
    state = {"phase": "warm-up", "start": 0.0}
    times = {p: collections.defaultdict(lambda: [0.0, 0]) for p in ("warm-up", "prefill", "decode")}

    def on_node(tensor, ask, _user_data):
        if ask:
            state["start"] = time.perf_counter()
            return True  # observe every node: the scheduler computes it alone, then calls back with ask=False
        entry = times[state["phase"]][base.ggml_op_desc(tensor).decode()]
        entry[0] += 1000 * (time.perf_counter() - state["start"])
        entry[1] += 1
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_node)
    params = llm.context_params
    params.cb_eval = callback
    params.cb_eval_user_data = None
    llm._ctx = LlamaContext(model=llm._model, params=params, verbose=False)

    runner.generate(ids, 4, stop_at_end=False)  # warm-up of the new context
    llm.reset()
    counted = {"prefill": 0, "decode": 0}
    out, start = [], time.perf_counter()
    state["phase"] = "prefill"
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        counted[state["phase"]] += 1
        out.append(token)
        state["phase"] = "decode"
        if len(out) >= tokens:
            break
    per_node_wall_ms = 1000 * (time.perf_counter() - start)
    return {"counters": plain, "sampler": sampler, "per_node_wall_ms": per_node_wall_ms,
            "ops": {phase: {op: {"ms": ms, "count": n} for op, (ms, n) in t.items()}
                    for phase, t in times.items() if phase != "warm-up"},
            "forward_passes": {"prefill": 1, "decode": len(out) - 1}, "cpu_s": own_cpu_seconds()}


# ---------------------------------------------------------------------------------------------------------------
# Tables


def op_rows(ops: dict, per: int) -> list[dict]:
    """Op types by time, with share, ms per generated token (`per`: the decode tokens) and count; top TOP rows."""
    total = sum(o["ms"] for o in ops.values()) or float("nan")
    rows = sorted(({"op": op, **o} for op, o in ops.items()), key=lambda r: -r["ms"])
    head, rest = rows[:TOP], rows[TOP:]
    if rest:
        head.append({"op": f"{len(rest)} other op types", "ms": sum(r["ms"] for r in rest),
                     "count": sum(r["count"] for r in rest)})
    for r in head:
        r["share"] = r["ms"] / total
        r["ms_per_token"] = r["ms"] / per if per else float("nan")
    return head


def markdown(results: dict) -> str:
    lines = []
    add = lines.append
    add(f"Measured {results['date']} with `{results['command']}` on {results['cores']} cores, {results['threads']} "
        f"threads on both sides: {results['model']}, the chat prompt \"{CHAT[0]['content']}\", greedy, "
        f"{results['tokens']} new tokens (end of sequence ignored). Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".")
    for name, p in results["profiles"].items():
        add("")
        plain = p["unprofiled"]
        add(f"**{name}** ({p['how']}): {plain['prompt_tokens']} prompt tokens; without the profiler "
            f"{plain['decode_tps']:.1f} decode tok/s, first token {plain['ttft_ms']:.1f} ms. " + p["note"])
        add("")
        add("| phase | op type | total ms | ms per token | share | count |")
        add("|---|---|---|---|---|---|")
        for phase in ("prefill", "decode"):
            per = p["per_token"][phase]
            for r in op_rows(p["ops"][phase], per):
                add(f"| {phase} | {r['op']} | {r['ms']:.1f} | {r['ms_per_token']:.3f} | {r['share']:.1%} | "
                    f"{r['count']} |")
    if results.get("findings"):
        add("")
        add(results["findings"])
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx-model", action="append", default=[], metavar="NAME=PATH_OR_MODELS_URI",
                        help="the ONNX model to profile: a folder or a logged pyfunc (models:/..., runs:/...); "
                             "repeatable; default: our cpu-int4 conversion of smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=128, help="greedy new tokens to generate")
    parser.add_argument("--threads", type=int, default=2, help="threads for both runtimes")
    parser.add_argument("--no-llama", dest="llama", action="store_false",
                        help="profile only the ONNX model(s), not llama.cpp on the shipped Q4_1 GGUF")
    parser.add_argument("--output", default=str(RESULTS / "op_profile"),
                        help="results path without suffix (.md and .json are written)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the op_profile block of docs/performance.md")
    args = parser.parse_args(argv)
    args.command = command_line("op_profile", argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.llama and (problem := llama_cpp_problem()):
        print(f"benchmarks/op_profile.py: {problem}; or profile only the ONNX side with --no-llama", file=sys.stderr)
        raise SystemExit(2)
    import mlflow
    import psutil

    from benchmarks.docs_blocks import update_docs
    from benchmarks.suite_setup import models_store

    started = time.time()
    profiles = {}
    with tempfile.TemporaryDirectory(prefix="hf2mlflow-opprof-") as tmp:
        tmp = Path(tmp)
        runtimes = extra_onnx(args.onnx_model, tmp) if args.onnx_model else []
        if not runtimes:
            with models_store("cpu", mlflow.get_tracking_uri()) as work:
                runtimes = onnx_runtimes(["cpu-int4"], work)
                for r in runtimes:  # the temporary store goes; the folder is copied out first
                    import shutil

                    shutil.copytree(r["path"], tmp / "cpu-int4")
                    r["path"] = str(tmp / "cpu-int4")
        for r in runtimes:
            print(f"[profile] {r['name']}: onnxruntime profiler, {args.tokens} tokens", flush=True)
            wait_until_idle()
            got = quiet_fresh(onnx_profile, r["path"], r.get("session_options") or {}, args.threads, args.tokens,
                              CHAT, str(tmp / f"ort-{len(profiles)}"))
            agg = onnx_aggregate(Path(got["trace"]), got["warmup_runs"])
            profiles[r["name"]] = {
                "how": "onnxruntime profiler, kernel time per op_name", "unprofiled": got["unprofiled"],
                "profiled": got["profiled"], "ops": {ph: a["ops"] for ph, a in agg.items()},
                "per_token": {"prefill": got["profiled"]["prompt_tokens"], "decode": agg["decode"]["forward_passes"]},
                "run_ms": {ph: a["run_ms"] for ph, a in agg.items()},
                "background_cores": got["background_cores"],
                "note": (f"Profiled: {got['profiled']['decode_tps']:.1f} tok/s; kernels cover "
                         f"{sum(o['ms'] for o in agg['decode']['ops'].values()) / agg['decode']['run_ms']:.0%} of "
                         f"the {agg['decode']['forward_passes']} decode forward passes' run time. Prefill ms per "
                         f"token is per prompt token.")}
        if args.llama:
            path = shipped_gguf()
            print(f"[profile] llama.cpp Q4_1: counters, then per-node eval callback, {args.tokens} tokens", flush=True)
            wait_until_idle()
            got = quiet_fresh(llama_profile, str(path), args.threads, args.tokens, CHAT)
            c = got["counters"]
            sampler = got["sampler"]
            profiles["llama.cpp Q4_1"] = {
                "how": "llama.cpp eval callback on every graph node (per-node synchronization)",
                "unprofiled": c, "counters": c, "sampler": sampler, "ops": got["ops"],
                "per_token": {"prefill": c["prompt_tokens"], "decode": got["forward_passes"]["decode"]},
                "per_node_wall_ms": got["per_node_wall_ms"], "background_cores": got["background_cores"],
                "note": (f"llama_perf_context: prompt eval {c['t_p_eval_ms']:.1f} ms for {c['n_p_eval']} tokens "
                         f"({c['t_p_eval_ms'] / max(c['n_p_eval'], 1):.2f} ms/token), eval {c['t_eval_ms']:.1f} ms "
                         f"for {c['n_eval']} tokens ({c['t_eval_ms'] / max(c['n_eval'], 1):.2f} ms/token)"
                         + (f"; llama_perf_sampler: {sampler['t_sample_ms']:.1f} ms for {sampler['n_sample']} samples"
                            if "t_sample_ms" in sampler else "")
                         + f". Per-node run: {got['per_node_wall_ms']:.0f} ms in all against "
                           f"{c['wall_ms']:.0f} ms without the callback. Prefill ms per token is per prompt token.")}
    results = {"date": time.strftime("%Y-%m-%d"), "command": args.command, "cores": psutil.cpu_count(),
               "threads": args.threads, "tokens": args.tokens,
               "model": "smollm2-135m-instruct (SmolLM2-135M-Instruct)", "versions": versions(),
               "profiles": profiles, "seconds": time.time() - started}
    text = markdown(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    if args.update_docs:
        update_docs(text, "op_profile")
    print("\n" + text)
    print(f"results: {out.with_suffix('.md')}, {out.with_suffix('.json')}"
          + ("; docs/performance.md updated (op_profile block)" if args.update_docs else "")
          + f"; {results['seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
