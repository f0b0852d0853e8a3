"""Teacher-forced quality of a converted model against its source model in PyTorch float32, as llama.cpp's
`llama-perplexity --kl-divergence` reports it: both read the same fixed token ids in windows, the second half
of each window is scored (every scored token sees at least half a window of context), and per scored position
the KL divergence of the candidate's next-token distribution from the reference's, whether their top tokens
agree, and each model's log-likelihood of the token that follows in the text.

A model is anything with `all_logits(ids) -> array [len(ids), vocab]` (parity.TorchModel, parity.GenAIModel,
parity.OptimumModel). The reference's scored logits are computed once and kept on disk, keyed by the digests of
the source model's files, of how it runs (library versions, dtype, attention), of the token ids and of the
window.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from hf2mlflow.thresholds import not_measured, within

TEXT = "sources/data/held_out_english.txt"  # in the package; its source and license: sources/data/README.md
EVALUATE_WINDOW = 256  # evaluate: the whole text
SLICE_TOKENS, SLICE_WINDOW = 512, 128  # convert_onnx: a short slice, 4 windows (252 scored positions)
SUMMARY_KEYS = ("mean_kld", "p99_kld", "top1_agreement", "perplexity")


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


def held_out_ids(reference, tokens: int = 0) -> list[int]:
    """The held-out text as the reference's tokenizer encodes it (no special tokens); its first `tokens` ids,
    or all of them when `tokens` is 0."""
    from importlib import resources

    ids = reference.encode(resources.files("hf2mlflow").joinpath(TEXT).read_text(encoding="utf-8"))
    return ids[:tokens] if tokens else ids


def logits_cache(source_folder: Path, reference) -> tuple[Path, str]:
    """Where the reference's logits are kept (`cache` of reference_logits and teacher_forced), keyed by the
    content of the source model's folder and by how `reference` (a parity.TorchModel loaded from it) runs: its
    torch and transformers versions, dtype and attention implementation. Compute it once per source: it reads
    every file."""
    from hf2mlflow.digest import content_digest
    from hf2mlflow.sources.tiny import home

    key = f"{content_digest(source_folder)}:{json.dumps(reference.runtime, sort_keys=True)}"
    return home() / "reference-logits", hashlib.sha256(key.encode()).hexdigest()


def _scored(window: int) -> slice:
    # Position p predicts token p + 1: score positions window/2 .. window-2 (the last has no next token).
    return slice(window // 2, window - 1)


def window_ids(ids: list[int], window: int, bos: Optional[int] = None) -> list[list[int]]:
    """The whole windows of `ids`; with `bos`, each window's first id replaced by it, as llama-perplexity does for
    a model whose tokenizer starts every text with one (a window then reads as the start of a text)."""
    chunks = [list(ids[start:start + window]) for start in windows(len(ids), window)]
    return [[bos, *chunk[1:]] for chunk in chunks] if bos is not None else chunks


def reference_logits(reference, ids: list[int], window: int, cache: Optional[tuple[Path, str]] = None,
                     bos: Optional[int] = None) -> np.ndarray:
    """The reference's logits at every scored position, [positions, vocab]. With `cache` = (folder, digest of
    the reference model), read from or written to folder/<key>.npy, the key a digest of the model's digest, the
    token ids and the window; written whole or not at all, so a killed run leaves nothing half-made to reuse."""
    path = None
    if cache:
        folder, model_digest = cache
        key = hashlib.sha256(f"{model_digest}:{window}:{bos}:".encode()
                             + np.asarray(ids, np.int64).tobytes()).hexdigest()
        path = Path(folder) / f"{key[:32]}.npy"
        if path.is_file():
            return np.load(path)
    logits = np.concatenate([np.asarray(reference.all_logits(chunk), np.float32)[_scored(window)]
                             for chunk in window_ids(ids, window, bos)])
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with partial.open("wb") as f:
            np.save(f, logits)
        partial.replace(path)
    return logits


def teacher_forced(reference, candidate, ids: list[int], window: int = EVALUATE_WINDOW,
                   cache: Optional[tuple[Path, str]] = None, bos: Optional[int] = None) -> dict:
    """Both models over `ids` window by window; the summary of every window's second half (reference_logits
    says what `cache` is, window_ids what `bos` is)."""
    ids = [int(i) for i in ids]
    expected = reference_logits(reference, ids, window, cache, bos)
    parts, row = [], 0
    for chunk in window_ids(ids, window, bos):
        got = np.asarray(candidate.all_logits(chunk))[_scored(window)]
        parts.append(score_window(expected[row:row + len(got)], got, np.asarray(chunk[window // 2 + 1:])))
        row += len(got)
    return Scored(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                    ("kld", "same_top", "reference_nll", "candidate_nll"))).summary()


def floor_problems(summary: dict, max_mean_kld: Optional[float], min_top1_agreement: Optional[float]) -> list[str]:
    """What in a teacher-forced summary falls below a quality floor ([] when nothing does); a figure that is
    missing or not finite falls below every floor."""
    def unmeasured(name: str, value) -> str:
        why = not_measured(value)
        return f"{name} not measured ({why})" if why else ""

    problems = []
    kld, top1 = summary.get("mean_kld"), summary.get("top1_agreement")
    if max_mean_kld is not None and not within(kld, max_mean_kld, greater_is_better=False):
        problems.append(unmeasured("mean KL divergence", kld)
                        or f"mean KL divergence {kld:.4g} > {max_mean_kld:g} allowed")
    if min_top1_agreement is not None and not within(top1, min_top1_agreement, greater_is_better=True):
        problems.append(unmeasured("top-1 agreement", top1)
                        or f"top-1 agreement {top1:.1%} < {min_top1_agreement:.1%} required")
    return problems
