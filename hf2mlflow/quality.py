"""Teacher-forced quality of a converted model against its source model in PyTorch float32, as llama.cpp's
`llama-perplexity --kl-divergence` reports it: both read the same fixed token ids in windows, the second half
of each window is scored (every scored token sees at least half a window of context), and per scored position
the KL divergence of the candidate's next-token distribution from the reference's, whether their top tokens
agree, and each model's log-likelihood of the token that follows in the text.

A model is anything with `all_logits(ids) -> array [len(ids), vocab]` (parity.TorchModel, parity.GenAIModel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Scored:
    """Per scored position: KL(reference || candidate), top-1 agreement, and each model's negative
    log-likelihood of the next token of the text."""

    kld: np.ndarray
    same_top: np.ndarray
    reference_nll: np.ndarray
    candidate_nll: np.ndarray

    def summary(self) -> dict:
        return {"positions": int(self.kld.size), "mean_kld": float(self.kld.mean()),
                "p99_kld": float(np.percentile(self.kld, 99)), "top1_agreement": float(self.same_top.mean()),
                "perplexity": float(np.exp(self.candidate_nll.mean())),
                "reference_perplexity": float(np.exp(self.reference_nll.mean()))}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def score_window(reference_logits: np.ndarray, candidate_logits: np.ndarray, next_ids: np.ndarray) -> Scored:
    """Logits [positions, vocab] of both models at the same positions, and the token that follows each."""
    if reference_logits.shape != candidate_logits.shape:
        raise ValueError(f"the models' logits differ in shape: {reference_logits.shape} against "
                         f"{candidate_logits.shape} (another vocabulary?)")
    ref, cand = log_softmax(reference_logits), log_softmax(candidate_logits)
    kld = np.maximum((np.exp(ref) * (ref - cand)).sum(axis=-1), 0.0)  # clip float rounding below zero
    rows = np.arange(len(next_ids))
    return Scored(kld, ref.argmax(-1) == cand.argmax(-1), -ref[rows, next_ids], -cand[rows, next_ids])


def windows(n_tokens: int, window: int) -> list[int]:
    """Starts of the whole windows in a text of n_tokens (llama.cpp drops the last, partial chunk too)."""
    if window < 4 or window % 2:
        raise ValueError(f"window must be an even number of tokens, at least 4; got {window}")
    if n_tokens < window:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one window of {window}")
    return list(range(0, n_tokens - window + 1, window))


def teacher_forced(reference, candidate, ids: list[int], window: int = 256) -> dict:
    """Both models over `ids` window by window; the summary of every window's second half."""
    ids = np.asarray(ids, dtype=np.int64)
    parts = []
    for start in windows(len(ids), window):
        chunk = ids[start:start + window]
        # Position p predicts token p + 1: score positions window/2 .. window-2 (the last has no next token).
        scored = slice(window // 2, window - 1)
        parts.append(score_window(np.asarray(reference.all_logits(chunk.tolist()))[scored],
                                  np.asarray(candidate.all_logits(chunk.tolist()))[scored], chunk[window // 2 + 1:]))
    return Scored(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                    ("kld", "same_top", "reference_nll", "candidate_nll"))).summary()
