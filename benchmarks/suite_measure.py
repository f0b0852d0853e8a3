"""benchmarks/suite.py, measured in fresh processes: one model loaded, warmed up and timed per process.

Time to first token is a one-token request for every model; decode rate is (new tokens - 1) / (answer time -
that), except for the bare loop, which sees its own first token: there it is the answer's own time after it.
`measure` runs in a spawned process (`in_fresh_process`), so each model's load time and peak RSS are its own;
rounds of such processes are summarized as medians with their min-max.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import statistics
import time
from pathlib import Path


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

    def answer(self, messages, max_tokens) -> tuple[float, int, int, float]:
        """Seconds, prompt tokens, new tokens, and NaN: when the first token came is not seen through predict."""
        start = time.perf_counter()
        (response,) = self.model.predict({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
        usage = response["usage"]
        return time.perf_counter() - start, usage["prompt_tokens"], usage["completion_tokens"], float("nan")


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
        stream, count, first = self.tokenizer.create_stream(), 0, float("nan")
        while not generator.is_done():
            generator.generate_next_token()
            stream.decode(generator.get_next_tokens()[0])
            count += 1
            if count == 1:
                first = time.perf_counter() - start
            if first_only:
                break
        return time.perf_counter() - start, len(ids), count, first

    def first_token(self, messages, max_tokens) -> float:
        return self._generate(messages, max_tokens, first_only=True)[0]

    def stream(self, messages, max_tokens) -> float:
        return float("nan")  # the loop above is already token by token

    def answer(self, messages, max_tokens) -> tuple[float, int, int, float]:
        """Seconds, prompt tokens, new tokens, and the seconds to this answer's own first token."""
        return self._generate(messages, max_tokens, first_only=False)


def measure(kind: str, path: str, prompts: list, max_tokens: int) -> dict:
    """Load, warm up, then per prompt: time to first token, latency and decode rate. Runs in a fresh process."""
    from hf2mlflow.measure import peak_rss_bytes

    start = time.perf_counter()
    runner = BareGenAIRunner(path) if kind == "genai" else PyfuncRunner(path)
    load_s = time.perf_counter() - start
    runner.answer(prompts[0], 2)
    runner.first_token(prompts[0], max_tokens)
    samples = []
    for messages in prompts:
        ttft = runner.first_token(messages, max_tokens)
        latency, prompt_tokens, new_tokens, own_first = runner.answer(messages, max_tokens)
        streamed = runner.stream(messages, max_tokens)  # greedy: the same tokens as the answer

        def rate(seconds, first, new_tokens=new_tokens):
            return (new_tokens - 1) / (seconds - first) if new_tokens > 1 and seconds > first else float("nan")

        decode_tps = rate(latency, own_first if own_first == own_first else ttft)
        samples.append({"ttft_s": ttft, "latency_s": latency, "prompt_tokens": prompt_tokens,
                        "new_tokens": new_tokens, "decode_tps": decode_tps, "stream_decode_tps": rate(streamed, ttft)})
    return {"load_s": load_s, "peak_rss_bytes": peak_rss_bytes(),
            "samples": samples}


def in_fresh_process(*args) -> dict:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def summarize(values: list[float]) -> dict:
    values = [v for v in values if v == v]  # drop NaN
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def median(values: list[float]) -> float:
    """Median of the known values (a rate is NaN where the answer took no longer than its first token)."""
    return summarize(values).get("median", float("nan"))
