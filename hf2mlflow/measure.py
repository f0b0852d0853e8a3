"""The one timing harness: every speed the project reports (evaluate, the sweep, benchmarks/suite.py,
benchmarks/served_speed.py, benchmarks/llama_cpp_peer.py) is measured with these definitions.

- Time to first token: the seconds a request for one new token takes, end to end (prompt processing, the first
  token, and whatever wraps the runtime), greedy.
- Decode rate: (new tokens - 1) / (answer seconds - time to first token), on the same prompt: the tokens after
  the first, per second.
- End-to-end rate: new tokens / answer seconds.

A runner answers chat messages: `PyfuncRunner` through a logged model as users call it (the served path: what
`mlflow models serve` runs per request), `BareGenAIRunner` with onnxruntime-genai alone on the same files and
the served engine's session options (the bare runtime). `measure_fresh` runs one in a fresh process, so its load
time and peak RSS are its own.
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



def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()

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


def logged_session_options(path: Path) -> dict:
    """The session options the served engine opens the graph with: model_config.session_options of the logged
    pyfunc folder at `path` ({} for a bare onnxruntime-genai folder, which has no MLmodel)."""
    import mlflow
    from mlflow.pyfunc import MODEL_CONFIG  # the MLmodel key of log_model's model_config ("config")

    if not (Path(path) / "MLmodel").is_file():
        return {}
    flavor = mlflow.models.Model.load(str(path)).flavors.get("python_function", {})
    return dict((flavor.get(MODEL_CONFIG) or {}).get("session_options") or {})


def bare_session_options(session_options: dict, threads: int | None = None) -> dict:
    """What the bare runtime opens the graph with: the served engine's `session_options`, intra_op_num_threads
    replaced by `threads` where given. Where neither sets a thread count, 0: onnxruntime's own default (one
    thread per physical core), which the served engine's session keeps; onnxruntime-genai, left alone, takes
    half the logical cores instead (one on two cores). Spinning and graph optimization are onnxruntime's
    defaults on both sides (spin, ORT_ENABLE_ALL) unless `session_options` says otherwise."""
    options = {k: v for k, v in session_options.items() if v is not None}
    if threads is not None:
        options["intra_op_num_threads"] = threads
    options.setdefault("intra_op_num_threads", 0)
    return options


def timed_tokens(tokens, start: float, is_end, max_tokens: int) -> tuple[float, float, list[int]]:
    """Take up to `max_tokens` from a runtime's token stream (stopping before an end token where `is_end` is
    given): (seconds from `start` to the first token, to the last, the tokens)."""
    out, first = [], 0.0
    for token in tokens:
        if not out:
            first = time.perf_counter() - start
        if is_end is not None and is_end(token):
            break
        out.append(token)
        if len(out) >= max_tokens:
            break
    return first, time.perf_counter() - start, out


class BareGenAIRunner:
    """The same ONNX files with onnxruntime-genai alone: the loop its own examples show, greedy, opened with
    `bare_session_options` (the served engine's session options; `threads` replaces their thread count)."""

    def __init__(self, path: str, session_options: dict | None = None, threads: int | None = None):
        import onnxruntime_genai as og

        from hf2mlflow.runtime.genai_chat import open_model
        from hf2mlflow.runtime.slot_chat import eos_ids

        self.og = og
        (config,) = Path(path).rglob("genai_config.json")
        self.session_options = bare_session_options(session_options or {}, threads)
        self.model = open_model(config.parent, self.session_options)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = eos_ids(json.loads(config.read_text()))

    def encode(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(t) for t in self.tokenizer.encode(prompt)]

    def generate(self, ids: list[int], max_tokens: int, stop_at_end: bool) -> tuple[float, float, list[int]]:
        """(seconds to the first token, seconds to the last, tokens) for prompt `ids`; without `stop_at_end` end of
        sequence is masked, so exactly `max_tokens` come."""
        start = time.perf_counter()
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": len(ids) + max_tokens, "do_sample": False}
        if not stop_at_end:
            options["min_length"] = len(ids) + max_tokens
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)

        def tokens():
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])

        return timed_tokens(tokens(), start, self.eos.__contains__ if stop_at_end else None, max_tokens)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens) if tokens else ""

    def answer(self, request: dict, max_tokens: int) -> Answer:
        start = time.perf_counter()
        ids = self.encode(request["messages"])
        _, _, tokens = self.generate(ids, max_tokens, stop_at_end=True)
        text = self.text(tokens)
        return Answer(time.perf_counter() - start, len(ids), len(tokens), text,
                      "length" if len(tokens) >= max_tokens else "stop")

    def stream_seconds(self, request: dict, max_tokens: int) -> float:
        return float("nan")  # the loop above is already token by token


def open_runner(kind: str, path: str):
    if kind not in (SERVED, BARE):
        raise ValueError(f"runner kind '{kind}' is unknown; allowed: {SERVED}, {BARE}")
    return PyfuncRunner(path) if kind == SERVED else BareGenAIRunner(path, logged_session_options(Path(path)))


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
