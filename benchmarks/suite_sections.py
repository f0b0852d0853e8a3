"""benchmarks/suite.py, the sections: each competitor's figures, one function per comparison.

speed_rounds: sections 1-3 (every model in fresh processes, interleaved rounds); parity: section 3 (greedy
tokens against PyTorch); served: section 4 (`mlflow models serve` under concurrent clients; batching.py uses
it too); prompt_lengths: section 6. Section 5, the conversions, comes from the setup's convert_onnx runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

from hf2mlflow.measure import SERVED
from benchmarks.suite_measure import in_fresh_process, median, summarize
from benchmarks.suite_setup import prompt_of_length


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
            "latency_s": summarize([statistics.median([s["latency_s"] for s in m["samples"]]) for m in measured]),
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
    out, names = {}, [name for name, info in models.items() if "target" in info and info["kind"] == SERVED]
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
                    raise RuntimeError(f"mlflow models serve did not come up: {log.read_text()[-2000:]}") from None
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
