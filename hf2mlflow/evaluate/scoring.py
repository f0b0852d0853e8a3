"""Quality metrics against a reference answer: plain Python and rouge-score, nothing downloaded."""

from __future__ import annotations

import functools
import re
import string

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Case, punctuation and whitespace do not make an answer wrong."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    """The reference appears in the answer as whole words ("Paris." and "It is Paris" both count)."""
    return float(f" {normalize(reference)} " in f" {normalize(answer)} ")


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words)."""
    return _rouge().score(reference, answer)["rougeL"].fmeasure


METRICS = {"exact_match": exact_match, "rouge_l": rouge_l, "contains": contains}


def genai_scorers(names: list[str]) -> list:
    """The metrics as mlflow.genai scorers, for per-row assessments in the MLflow UI."""
    from mlflow.genai.scorers import scorer

    def make(name):
        metric = METRICS[name]

        @scorer(name=name)
        def score(outputs, expectations) -> float:
            return metric(outputs, expectations["expected_response"])

        return score

    return [make(name) for name in names]
