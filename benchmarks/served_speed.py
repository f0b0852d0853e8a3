"""Served speed: the logged pyfunc against the bare runtime it wraps, before and after continuous batching,
side by side in one run, with the project's one timing harness (hf2mlflow/measure.py).

    python -m benchmarks.served_speed                 # trained SmolLM2-135M-Instruct and the 4-layer
                                                      # Phi-3-mini-shaped model, cpu-int4, 3 rounds
    python -m benchmarks.served_speed --quick         # tiny-phi3, one round, no "before" model (the tests)
    python -m benchmarks.served_speed --update-docs   # and rewrite its block in docs/performance.md

"Before" is the same conversion logged with the runtime of commit BEFORE_COMMIT (static batches; a lone
sequence decoding beside a copy of itself; a 20 ms join wait); "after" is this checkout's runtime. Two tables:
- a lone request, one at a time, fresh processes in interleaved rounds: the bare onnxruntime-genai loop
  (hf2mlflow.measure.BareGenAIRunner, with the served engine's session options), the pyfunc before and after,
  and (trained model) the transformers flavor in float32;
- staggered load behind `mlflow models serve` (trained model): one client alone, then 8 clients arriving one
  every --stagger seconds, --load_tokens new tokens each; latency, total tokens/s, and how many greedy answers
  equal the same request alone.
Writes benchmarks/results/served_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from hf2mlflow import PROJECT_ROOT
from hf2mlflow.measure import BARE, SERVED, bare_session_options, logged_session_options

from benchmarks.docs_blocks import update_docs
from hf2mlflow.measure import cpu_name
from benchmarks.suite_sections import _free_port, speed_rounds
from benchmarks.suite_setup import models_store, prompt_of_length

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
BEFORE_COMMIT = "d5f3bf6"  # the last commit with static batching (hf2mlflow/runtime/genai_chat.py, batching.py)
BARE_LOOP, BEFORE, AFTER, TRANSFORMERS = ("bare onnxruntime-genai loop", "pyfunc, before (static batching)",
                                          "pyfunc, after (continuous batching)", "transformers flavor, float32")
LONG_ANSWERS = ["Write a long story about a dragon who learns to cook.", "Explain in detail how a car engine works.",
                "Describe a walk through a forest in autumn, in many sentences.",
                "Write a detailed guide to planting a vegetable garden.", "Tell me the history of the bicycle.",
                "Write a long letter to a friend about your holiday by the sea.",
                "Explain step by step how bread is made.", "Describe your ideal city in great detail."]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of fresh processes")
    parser.add_argument("--max_tokens", type=int, default=128, help="new tokens of a lone request, trained model")
    parser.add_argument("--load_tokens", type=int, default=128, help="new tokens per request under staggered load")
    parser.add_argument("--stagger", type=float, default=0.5, help="seconds between the 8 clients' arrivals")
    parser.add_argument("--quick", action="store_true", help="tiny-phi3, one round, no 'before': a smoke run")
    parser.add_argument("--output_dir", default=str(RESULTS), help="where served_speed.{md,json} go")
    parser.add_argument("--update-docs", action="store_true", help="rewrite its block in docs/performance.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write served_speed.md (and the docs block) again from served_speed.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.max_tokens, args.load_tokens, args.stagger = 1, 64, 64, 0.05
    return args


def runtime_at(commit: str, work: Path) -> Path:
    """hf2mlflow/runtime/ as it was at `commit`, from git, in a folder of its own."""
    out = work / f"runtime-{commit}"
    listing = subprocess.run(["git", "ls-tree", "--name-only", commit, "hf2mlflow/runtime/"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True)
    if listing.returncode != 0 or not listing.stdout.strip():
        raise SystemExit(f"cannot read hf2mlflow/runtime/ at commit {commit} from git ({listing.stderr.strip()}); "
                         f"run from a full clone of the repository, or with --quick")
    for name in listing.stdout.split():
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=PROJECT_ROOT, capture_output=True,
                                  text=True, check=True).stdout
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
    return out


def with_runtime(model: Path, runtime: Path, dst: Path) -> Path:
    """A copy of a logged pyfunc folder that runs `runtime`'s code, as the package `hf2mlflow_before` (a process
    that has imported this checkout's hf2mlflow would not import another hf2mlflow.runtime)."""
    shutil.copytree(model, dst)
    package = dst / "code" / "hf2mlflow_before"
    shutil.copytree(runtime / "hf2mlflow" / "runtime", package / "runtime")
    (package / "__init__.py").write_text("")
    for path in [*package.rglob("*.py"), dst / "onnx_chat_pyfunc.py"]:
        source = path if path.is_relative_to(package) else runtime / "hf2mlflow" / "runtime" / path.name
        path.write_text(source.read_text().replace("hf2mlflow.runtime", "hf2mlflow_before.runtime"))
    return dst


def prepare(model: str, work: Path, before: bool, transformers: bool) -> dict:
    """Convert and log `model` to cpu-int4 (and the transformers flavor in float32); name -> what to measure."""
    import mlflow

    from hf2mlflow.convert.step import ConvertArgs, convert
    from hf2mlflow.log_model.pyfunc import LogPyfuncArgs, log_pyfunc
    from hf2mlflow.log_model.transformers_flavor import LogTransformersArgs, log_transformers
    from hf2mlflow.runtime.manifest import folder_bytes

    tag = Path(model).name
    uri = log_pyfunc(LogPyfuncArgs(convert_run_id=convert(ConvertArgs(model=model, target="cpu-int4")),
                                   registered_model_name=f"served-speed-{tag}"))
    after = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(work / f"{tag}-after")))
    models = {BARE_LOOP: {"kind": BARE, "path": str(after)}}
    if before:
        models[BEFORE] = {"kind": SERVED, "path": str(with_runtime(after, runtime_at(BEFORE_COMMIT, work),
                                                                    work / f"{tag}-before"))}
    models[AFTER] = {"kind": SERVED, "path": str(after)}
    if transformers:
        uri = log_transformers(LogTransformersArgs(model=model, registered_model_name=f"served-speed-{tag}-hf"))
        models[TRANSFORMERS] = {"kind": SERVED, "path": mlflow.artifacts.download_artifacts(
            uri, dst_path=str(work / f"{tag}-transformers"))}
    for info in models.values():
        info["size_bytes"] = folder_bytes(Path(info["path"]))
    return models


class Server:
    """`mlflow models serve` of a model folder on 127.0.0.1, stopped on exit."""

    def __init__(self, path: str, log: Path):
        import os

        self.port = _free_port()
        self.log = log
        env = dict(os.environ, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
        with open(log, "w") as out:
            self.proc = subprocess.Popen(["mlflow", "models", "serve", "-m", path, "--env-manager", "local",
                                          "--host", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def __enter__(self):
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow models serve did not come up: {self.log.read_text()[-2000:]}") \
                        from None
                time.sleep(0.5)

    def __exit__(self, *exc):
        import os

        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=60)

    def ask(self, question: str, max_tokens: int) -> dict:
        body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                           "temperature": 0.0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        answer = answer if isinstance(answer, dict) else answer[0]
        return {"start": start, "end": time.perf_counter(), "tokens": answer["usage"]["completion_tokens"],
                "text": answer["choices"][0]["message"]["content"]}


def _load_figures(answers: list[dict], alone: list[dict]) -> dict:
    latencies = sorted(a["end"] - a["start"] for a in answers)
    wall = max(a["end"] for a in answers) - min(a["start"] for a in answers)
    return {"tokens_per_s": sum(a["tokens"] for a in answers) / wall,
            "latency_p50_s": latencies[len(latencies) // 2],
            "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "new_tokens": sum(a["tokens"] for a in answers),
            "same_as_alone": sum(a["text"] == b["text"] for a, b in zip(answers, alone)), "clients": len(answers)}


def staggered(path: str, log: Path, questions: list[str], max_tokens: int, stagger: float) -> dict:
    """One client alone (each question in turn); one client per question arriving `stagger` s apart; then all of
    them at once (the most the server decodes together)."""
    with Server(path, log) as server:
        server.ask(questions[0], 2)  # warm-up
        alone = [server.ask(q, max_tokens) for q in questions]

        def clients(gap: float) -> list[dict]:
            def client(i):
                time.sleep(i * gap)
                return server.ask(questions[i], max_tokens)

            with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
                return list(pool.map(client, range(len(questions))))

        load, burst = clients(stagger), clients(0.0)
    one_client = sum(a["tokens"] for a in alone) / sum(a["end"] - a["start"] for a in alone)
    figures = {"one_client_tokens_per_s": one_client, "staggered": _load_figures(load, alone),
               "at_once": _load_figures(burst, alone)}
    for key in ("staggered", "at_once"):
        figures[key]["vs_one_client"] = figures[key]["tokens_per_s"] / one_client
    return figures


def lone_table(label: str, figures: dict) -> list[str]:
    bare = figures[BARE_LOOP]
    lines = [f"**{label}**", "", "| runtime | first token ms | decode tok/s | answer s | first token vs bare | "
             "decode vs bare | answer vs bare | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['ttft_ms']['median']:.0f} | {f['decode_tps']['median']:.1f} | "
                     f"{f['latency_s']['median']:.2f} | {f['ttft_ms']['median'] / bare['ttft_ms']['median']:.2f}x | "
                     f"{f['decode_tps']['median'] / bare['decode_tps']['median']:.2f}x | "
                     f"{f['latency_s']['median'] / bare['latency_s']['median']:.2f}x | "
                     f"{f['peak_rss_gib']['median'] * 1024:.0f} |")
    return lines + [""]


def report(r: dict) -> str:
    lines = [f"Measured {r['date']} with `{r['command']}` ({r['machine']}), cpu-int4, greedy; harness: "
             f"hf2mlflow/measure.py (first token: a one-token request; decode: the tokens after it; an answer ends "
             f"at end of sequence or at its new-token count). Lone requests: medians of {r['rounds']} interleaved "
             f"rounds of fresh processes. Before: the runtime of commit {BEFORE_COMMIT}."
             + (f" The bare loop (hf2mlflow.measure.BareGenAIRunner) opens the graph with the served engine's "
                f"session options, {json.dumps(r['session_options'])} (intra_op_num_threads 0: onnxruntime's "
                f"default, one thread per physical core, as the served engine's session keeps it)."
                if "session_options" in r else ""), ""]
    for label, figures in r["lone"].items():
        lines += lone_table(label, figures)
    if r["load"]:
        lines += [f"**Load behind `mlflow models serve`** ({r['load_model']}): {r['load_clients']} clients arriving "
                  f"one every {r['stagger']} s (staggered) or all at once, {r['load_tokens']} new tokens each; one "
                  f"client: the same requests one after another", "",
                  "| runtime | clients | p50 latency s | p95 latency s | tokens/s | vs one client | "
                  "answers equal alone |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, f in r["load"].items():
            lines.append(f"| {name} | one | | | {f['one_client_tokens_per_s']:.1f} | 1.00x | |")
            for key, label in (("staggered", "staggered"), ("at_once", "at once")):
                g = f[key]
                lines.append(f"| {name} | {label} | {g['latency_p50_s']:.2f} | {g['latency_p95_s']:.2f} | "
                             f"{g['tokens_per_s']:.1f} | {g['vs_one_client']:.2f}x | "
                             f"{g['same_as_alone']}/{g['clients']} |")
        if BEFORE in r["load"] and AFTER in r["load"]:
            ratio = r["load"][AFTER]["staggered"]["latency_p95_s"] / r["load"][BEFORE]["staggered"]["latency_p95_s"]
            lines += ["", f"Staggered p95 latency, after / before: {ratio:.2f}x."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import mlflow
    import psutil
    from transformers import AutoTokenizer

    from hf2mlflow.sources.tiny import phi3_mini_shape_path

    args = parse_args(argv)
    if args.render:
        return write(json.loads((Path(args.output_dir) / "served_speed.json").read_text()), args)
    before = not args.quick
    results = {"date": time.strftime("%Y-%m-%d"), "command": "python -m benchmarks.served_speed"
               + (" --quick" if args.quick else ""), "rounds": args.rounds,
               "machine": f"{psutil.cpu_count()} cores, {cpu_name()}", "lone": {}, "load": {},
               "load_tokens": args.load_tokens, "stagger": args.stagger}
    questions = LONG_ANSWERS[:3] if args.quick else LONG_ANSWERS
    with models_store("cpu", mlflow.get_tracking_uri()) as work:
        trained = "tiny-phi3" if args.quick else "smollm2-135m-instruct"
        models = prepare(trained, work, before, transformers=True)
        results["session_options"] = bare_session_options(logged_session_options(Path(models[AFTER]["path"])))
        prompts = [[{"role": "user", "content": q}] for q in questions[:4]]
        lone = speed_rounds(models, prompts, args.max_tokens, args.rounds)
        results["lone"][f"{trained}, {args.max_tokens} new tokens, {len(prompts)} prompts one at a time"] = lone
        if not args.quick:
            shape = phi3_mini_shape_path(4)
            models4 = prepare(str(shape), work, before, transformers=False)
            prompt = prompt_of_length(AutoTokenizer.from_pretrained(shape), 166)
            lone4 = speed_rounds(models4, [prompt], 96, args.rounds)
            results["lone"]["4-layer Phi-3-mini-shaped model, a 166-token prompt, 96 new tokens"] = lone4
        for name in (BEFORE, AFTER):
            if name in models:
                print(f"[load] {name}: {len(questions)} clients, one every {args.stagger} s", flush=True)
                results["load"][name] = staggered(models[name]["path"], work / f"serve-{len(results['load'])}.log",
                                                  questions, args.load_tokens, args.stagger)
        results["load_model"], results["load_clients"] = trained, len(questions)
    for figures in results["lone"].values():
        for f in figures.values():
            f.pop("samples")
    return write(results, args)


def write(results: dict, args) -> dict:
    text = report(results)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "served_speed.json").write_text(json.dumps(results, indent=1))
    (out / "served_speed.md").write_text(text)
    if args.update_docs:
        update_docs(text, "served_speed")
    print("\n" + text + f"\nresults: {out.resolve()} (served_speed.md, served_speed.json)"
          + ("; docs/performance.md updated" if args.update_docs else ""))
    return results


if __name__ == "__main__":
    main()
