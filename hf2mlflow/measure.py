"""One model's answers and speed, measured in a fresh process so that its load time and peak RSS are its own."""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor


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


def _ttft_streaming(model, request) -> float:
    """Seconds to the first chunk that carries text (or ends the answer): the first chunk, which only names
    the assistant role, comes before any token is generated."""
    start = time.perf_counter()
    chunks = model.predict_stream(request)
    for chunk in chunks:
        choice = chunk["choices"][0]
        if choice["delta"].get("content") or choice.get("finish_reason"):
            break
    elapsed = time.perf_counter() - start
    chunks.close()  # stops the generation
    return elapsed


def _ttft_one_token(model, request) -> float:
    start = time.perf_counter()
    model.predict({**request, "max_tokens": 1})
    return time.perf_counter() - start


def measure(model_dir: str, label: str, requests: list[dict]) -> dict:
    """Load the model from a local folder, warm it up, then per request: the answer, end-to-end latency and
    time to first token (first streamed chunk with text where the model streams, else a max_tokens=1 request)."""
    import mlflow
    from tqdm import tqdm

    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_dir)
    load_seconds = time.perf_counter() - start

    warm_up = {**requests[0], "max_tokens": 2}
    model.predict(warm_up)
    try:
        _ttft_streaming(model, warm_up)
        ttft, ttft_method = _ttft_streaming, "first streamed chunk with text"
    except Exception:  # MLflow raises when a flavor has no predict_stream
        ttft, ttft_method = _ttft_one_token, "max_tokens=1 request"

    rows = []
    for request in tqdm(requests, desc=label, unit="prompt"):
        start = time.perf_counter()
        (answer,) = model.predict(request)
        latency = time.perf_counter() - start
        rows.append({"answer": answer["choices"][0]["message"]["content"],
                     "finish_reason": answer["choices"][0]["finish_reason"],
                     "prompt_tokens": answer["usage"]["prompt_tokens"],
                     "completion_tokens": answer["usage"]["completion_tokens"],
                     "latency_s": latency, "ttft_s": ttft(model, request)})
    return {"load_seconds": load_seconds, "ttft_method": ttft_method, "rows": rows,
            "peak_rss_bytes": peak_rss_bytes()}


def measure_fresh(model_dir: str, label: str, requests: list[dict]) -> dict:
    """`measure` in a fresh (spawned) process: its load time and peak RSS are the model's own, and nothing it
    loads stays behind. Raises RuntimeError naming the model when it fails to answer."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, str(model_dir), label, requests).result()
        except Exception as exc:
            raise RuntimeError(f"model '{label}' failed while answering: {type(exc).__name__}: {exc}") from None
