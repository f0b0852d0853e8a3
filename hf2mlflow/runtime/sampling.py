"""How the next token is chosen from a row of next-token logits: greedy, or sampled as a request says.
Pure numpy: it ships with the logged pyfunc model."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from hf2mlflow.runtime.chat_schema import ChatRequest


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def sampler(request: ChatRequest, seed: Optional[int]) -> Callable[[np.ndarray], int]:
    """Temperature, then top-k, then top-p (nucleus) sampling, from its own random generator: a seed repeats
    its answer, and concurrent requests do not share random state."""
    rng = np.random.default_rng(seed)

    def choose(logits: np.ndarray) -> int:
        scores = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # a tiny temperature sends all but the top score to -inf: the argmax
            scores = (scores - scores.max()) / request.temperature
        if request.top_k:
            k = min(request.top_k, scores.size)
            scores[scores < np.partition(scores, -k)[-k]] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if request.top_p < 1.0:
            order = np.argsort(-probs)
            before = np.cumsum(probs[order]) - probs[order]  # mass of the more likely tokens
            probs[order[before >= request.top_p]] = 0.0  # keep the smallest set that reaches top_p
            probs /= probs.sum()
        return int(rng.choice(probs.size, p=probs))

    return choose


def chooser(request: ChatRequest, seed: Optional[int]) -> Callable[[np.ndarray], int]:
    """The request's way of choosing tokens: greedy, or a sampler seeded with `seed`."""
    return sampler(request, seed) if request.do_sample else greedy
