"""The one timing harness: every speed the project reports (evaluate, the sweep, benchmarks/suite.py,
benchmarks/served_speed.py, benchmarks/llama_cpp_peer.py) is measured with these definitions.

- Time to first token: the seconds a request for one new token takes, end to end (prompt processing, the first
  token, and whatever wraps the runtime), greedy.
- Decode rate: (new tokens - 1) / (answer seconds - time to first token), on the same prompt: the tokens after
  the first, per second.
- End-to-end rate: new tokens / answer seconds.

A runner answers chat messages: `PyfuncRunner` through a logged model as users call it (the served path: what
`mlflow models serve` runs per request), `BareGenAIRunner` with onnxruntime-genai alone on the same files (the
bare runtime). `measure_fresh` runs one in a fresh process, so its load time and peak RSS are its own.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SERVED, BARE = "pyfunc", "genai"  # runner kinds


def peak_rss_bytes() -> int:
    """This process's own peak RSS. VmHWM starts afresh at exec; ru_maxrss does not: after fork and exec it
    still holds the parent's size at the fork, so a small child would report its parent's footprint."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def decode_rate(answer_s: float, ttft_s: float, new_tokens: int) -> float:
    """Tokens after the first per second; NaN where there were none or the answer took no longer than its first
    token."""
    return (new_tokens - 1) / (answer_s - ttft_s) if new_tokens > 1 and answer_s > ttft_s else float("nan")


@dataclass
class Answer:
    seconds: float
    prompt_tokens: int
    new_tokens: int
    text: str
    finish_reason: str


class PyfuncRunner:
    """A logged model through mlflow.pyfunc, as users and `mlflow models serve` call it."""

    def __init__(self, path: str):
        import mlflow

        self.model = mlflow.pyfunc.load_model(path)

    def answer(self, request: dict, max_tokens: int) -> Answer:
        start = time.perf_counter()
        (response,) = self.model.predict({**request, "max_tokens": max_tokens})
        seconds = time.perf_counter() - start
        choice, usage = response["choices"][0], response["usage"]
        return Answer(seconds, usage["prompt_tokens"], usage["completion_tokens"], choice["message"]["content"],
                      choice["finish_reason"])

    def stream_seconds(self, request: dict, max_tokens: int) -> float:
        """Seconds to stream the whole answer through predict_stream; NaN where the flavor does not stream."""
        start = time.perf_counter()
        try:
            for _ in self.model.predict_stream({**request, "max_tokens": max_tokens}):
                pass
        except Exception:  # MLflow raises where a flavor has no predict_stream (the transformers chat task)
            return float("nan")
        return time.perf_counter() - start


class BareGenAIRunner:
    """The same ONNX files with onnxruntime-genai alone: the loop its own examples show, greedy."""

    def __init__(self, path: str, session_options: dict | None = None):
        import onnxruntime_genai as og

        from hf2mlflow.runtime.genai_chat import open_model

        self.og = og
        (config,) = Path(path).rglob("genai_config.json")
        self.model = open_model(config.parent, session_options)
        self.tokenizer = og.Tokenizer(self.model)

    def answer(self, request: dict, max_tokens: int) -> Answer:
        start = time.perf_counter()
        prompt = self.tokenizer.apply_chat_template(json.dumps(request["messages"]), add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        stream, text, count = self.tokenizer.create_stream(), [], 0
        while not generator.is_done():
            generator.generate_next_token()
            text.append(stream.decode(generator.get_next_tokens()[0]))
            count += 1
        return Answer(time.perf_counter() - start, len(ids), count, "".join(text),
                      "length" if count >= max_tokens else "stop")

    def stream_seconds(self, request: dict, max_tokens: int) -> float:
        return float("nan")  # the loop above is already token by token


def open_runner(kind: str, path: str):
    if kind not in (SERVED, BARE):
        raise ValueError(f"runner kind '{kind}' is unknown; allowed: {SERVED}, {BARE}")
    return PyfuncRunner(path) if kind == SERVED else BareGenAIRunner(path)


def measure(kind: str, path: str, requests: list[dict], label: str = "", stream: bool = False) -> dict:
    """Load, warm up, then per request (its own max_tokens, else 64): the answer, its time to first token,
    answer seconds and decode rate (and, with `stream`, the decode rate through predict_stream)."""
    from tqdm import tqdm

    start = time.perf_counter()
    runner = open_runner(kind, path)
    load_s = time.perf_counter() - start
    runner.answer(requests[0], 2)
    rows = []
    for request in tqdm(requests, desc=label or kind, unit="prompt"):
        max_tokens = int(request.get("max_tokens", 64))
        ttft = runner.answer(request, 1).seconds
        answer = runner.answer(request, max_tokens)
        row = {"answer": answer.text, "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
               "completion_tokens": answer.new_tokens, "latency_s": answer.seconds, "ttft_s": ttft,
               "decode_tps": decode_rate(answer.seconds, ttft, answer.new_tokens),
               "e2e_tps": answer.new_tokens / answer.seconds}
        if stream:
            row["stream_decode_tps"] = decode_rate(runner.stream_seconds(request, max_tokens), ttft,
                                                   answer.new_tokens)
        rows.append(row)
    return {"load_s": load_s, "rows": rows, "peak_rss_bytes": peak_rss_bytes()}


def measure_fresh(kind: str, path: str, requests: list[dict], label: str = "", stream: bool = False) -> dict:
    """`measure` in a fresh (spawned) process: its load time and peak RSS are the model's own, and nothing it
    loads stays behind. Raises RuntimeError naming the model when it fails to answer."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, kind, str(path), requests, label, stream).result()
        except Exception as exc:
            raise RuntimeError(f"model '{label or path}' failed while answering: {type(exc).__name__}: {exc}"
                               ) from None
