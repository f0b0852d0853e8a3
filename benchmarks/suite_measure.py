"""benchmarks/suite.py, measured in fresh processes with the project's one timing harness (hf2mlflow/measure.py:
time to first token is a one-token request; decode rate is (new tokens - 1) / (answer seconds - that)); rounds of
such processes are summarized as medians with their min-max.
"""

from __future__ import annotations

import statistics

from hf2mlflow.measure import measure_fresh


def in_fresh_process(kind: str, path: str, prompts: list, max_tokens: int) -> dict:
    """One model (`kind`: hf2mlflow.measure.SERVED or BARE) loaded, warmed up and timed on every prompt, greedy, in
    a fresh process; its load time, peak RSS and one sample per prompt."""
    requests = [{"messages": messages, "max_tokens": max_tokens, "temperature": 0.0} for messages in prompts]
    result = measure_fresh(kind, path, requests, stream=True)
    samples = [{"ttft_s": r["ttft_s"], "latency_s": r["latency_s"], "prompt_tokens": r["prompt_tokens"],
                "new_tokens": r["completion_tokens"], "decode_tps": r["decode_tps"],
                "stream_decode_tps": r["stream_decode_tps"]} for r in result["rows"]]
    return {"load_s": result["load_s"], "peak_rss_bytes": result["peak_rss_bytes"], "samples": samples}


def summarize(values: list[float]) -> dict:
    values = [v for v in values if v == v]  # drop NaN
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def median(values: list[float]) -> float:
    """Median of the known values (a rate is NaN where the answer took no longer than its first token)."""
    return summarize(values).get("median", float("nan"))
