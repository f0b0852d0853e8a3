"""The teacher-forced measure's arithmetic (hf2mlflow/quality.py): KL divergence, top-1 agreement and perplexity
per scored position, and the windows whose second half is scored."""

import numpy as np
import pytest

from hf2mlflow.quality import score_window, teacher_forced, windows


def test_identical_logits_score_zero_divergence_and_full_agreement():
    logits = np.random.default_rng(0).normal(size=(5, 11))
    scored = score_window(logits, logits.copy(), np.array([1, 2, 3, 4, 5])).summary()
    assert scored["mean_kld"] == pytest.approx(0, abs=1e-12) and scored["top1_agreement"] == 1.0
    assert scored["perplexity"] == pytest.approx(scored["reference_perplexity"]) and scored["positions"] == 5


def test_a_known_divergence():
    # Reference (0.5, 0.5) against candidate (0.9, 0.1): KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1).
    reference, candidate = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
    scored = score_window(reference, candidate, np.array([1]))
    assert scored.kld[0] == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1))
    assert scored.candidate_nll[0] == pytest.approx(-np.log(0.1))
    assert scored.reference_nll[0] == pytest.approx(-np.log(0.5))


class _Model:
    """all_logits from a fixed table: position p of any window sees token ids[p]."""

    def __init__(self, table):
        self.table = table

    def all_logits(self, ids):
        return self.table[ids]


def test_each_window_scores_its_second_half():
    rng = np.random.default_rng(1)
    reference, candidate = _Model(rng.normal(size=(50, 64))), _Model(rng.normal(size=(50, 64)))  # vocab 64
    ids = list(range(50))
    assert windows(50, 16) == [0, 16, 32]  # the partial last window is dropped
    summary = teacher_forced(reference, candidate, ids, window=16)
    assert summary["positions"] == 3 * 7  # positions 8..14 of each window predict tokens 9..15
    assert 0 < summary["mean_kld"] and 0 <= summary["top1_agreement"] <= 1


@pytest.mark.parametrize("n, window, expected", [(10, 16, "fewer than one window"), (100, 15, "even number")])
def test_bad_windows_are_refused(n, window, expected):
    with pytest.raises(ValueError, match=expected):
        windows(n, window)
