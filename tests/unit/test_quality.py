"""The teacher-forced measure's arithmetic (hf2mlflow/quality.py): KL divergence, top-1 agreement and perplexity
per scored position, and the windows whose second half is scored."""

from types import SimpleNamespace

import numpy as np
import pytest

from hf2mlflow.quality import floor_problems, reference_logits, score_window, teacher_forced, window_ids, windows


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


class _Causal:
    """A causal fake model over a vocabulary of 3 tokens: its logits at position t of the ids it reads are
    formula(t, ids[t], ids[t - 1]), with ids[t - 1] taken as 0 at t = 0."""

    def __init__(self, formula):
        self.formula, self.calls = formula, 0

    def all_logits(self, ids):
        self.calls += 1
        return np.array([self.formula(t, ids[t], ids[t - 1] if t else 0) for t in range(len(ids))], float)


def _reference():
    return _Causal(lambda t, token, previous: (t, 2 * token, previous))


def _candidate():
    return _Causal(lambda t, token, previous: (2 * previous, t, token))


# Two windows of 6 and a partial one (dropped). Each window's positions 3 and 4 are scored (its second half but the
# last position, which has no next token), and predict the tokens at 4 and 5.
IDS = [2, 1, 0, 1, 0, 1,  1, 2, 2, 0, 1, 2,  0, 1]
# The formulas worked out at t = 3 and 4 of the first window, then of the second; e.g. the first window at t = 3:
# ids[3] = 1 and ids[2] = 0, so the reference's logits are (3, 2 * 1, 0) and the candidate's (2 * 0, 3, 1).
REFERENCE_ROWS = np.array([[3, 2, 0], [4, 0, 1], [3, 0, 2], [4, 2, 0]], float)
CANDIDATE_ROWS = np.array([[0, 3, 1], [2, 4, 0], [4, 3, 0], [0, 4, 1]], float)
NEXT_TOKENS = [0, 1, 1, 2]  # ids[4], ids[5] of each window
REFERENCE_P = np.exp(REFERENCE_ROWS) / np.exp(REFERENCE_ROWS).sum(axis=1, keepdims=True)
CANDIDATE_P = np.exp(CANDIDATE_ROWS) / np.exp(CANDIDATE_ROWS).sum(axis=1, keepdims=True)
KLD = (REFERENCE_P * np.log(REFERENCE_P / CANDIDATE_P)).sum(axis=1)  # KL(reference || candidate)
REFERENCE_NLL = -np.log(REFERENCE_P[[0, 1, 2, 3], NEXT_TOKENS])
CANDIDATE_NLL = -np.log(CANDIDATE_P[[0, 1, 2, 3], NEXT_TOKENS])


def test_the_reference_logits_are_those_of_each_windows_second_half():
    assert windows(len(IDS), 6) == [0, 6]  # the partial last window is dropped
    assert reference_logits(_reference(), IDS, 6).tolist() == REFERENCE_ROWS.tolist()


def test_each_scored_position_against_the_token_that_follows_it():
    scored = score_window(REFERENCE_ROWS, CANDIDATE_ROWS, np.array(NEXT_TOKENS))
    assert scored.kld == pytest.approx(KLD) and scored.kld.min() > 0
    # The reference's top token is 0 everywhere, the candidate's 1, 1, 0, 1.
    assert scored.same_top.tolist() == [False, False, True, False]
    assert scored.reference_nll == pytest.approx(REFERENCE_NLL)
    assert scored.candidate_nll == pytest.approx(CANDIDATE_NLL)


def test_the_summary_of_a_text_read_window_by_window():
    summary = teacher_forced(_reference(), _candidate(), IDS, window=6)
    low, high = np.sort(KLD)[2:]
    assert summary == pytest.approx({
        "positions": 4, "mean_kld": KLD.mean(),
        "p99_kld": low + 0.97 * (high - low),  # linear between the 3rd and 4th of 4: rank 0.99 * 3 = 2.97
        "top1_agreement": 0.25,
        "perplexity": np.exp(CANDIDATE_NLL.mean()), "reference_perplexity": np.exp(REFERENCE_NLL.mean())})


def test_each_window_starts_with_bos_where_the_tokenizer_adds_one():
    assert window_ids(IDS, 6, bos=9) == [[9, 1, 0, 1, 0, 1], [9, 2, 2, 0, 1, 2]]


@pytest.mark.parametrize("n, window, expected", [(10, 16, "fewer than one window"), (100, 15, "even number")])
def test_bad_windows_are_refused(n, window, expected):
    with pytest.raises(ValueError, match=expected):
        windows(n, window)


def test_reference_logits_are_computed_once_per_model_ids_and_window(tmp_path):
    reference, candidate = _reference(), _candidate()
    ids, cache = [i % 3 for i in range(40)], (tmp_path, "digest-of-the-model")
    first = teacher_forced(reference, candidate, ids, window=8, cache=cache)
    assert reference.calls == 5 and len(list(tmp_path.glob("*.npy"))) == 1
    assert teacher_forced(reference, candidate, ids, window=8, cache=cache) == first and reference.calls == 5
    # Another window, other ids or another model's digest: computed anew, kept beside the first.
    reference_logits(reference, ids, 10, cache)
    reference_logits(reference, ids[::-1], 8, cache)
    reference_logits(reference, ids, 8, (tmp_path, "another-model"))
    assert reference.calls == 5 + 4 + 5 + 5 and len(list(tmp_path.glob("*.npy"))) == 4
    assert not list(tmp_path.glob("*.partial"))  # written whole, then renamed


def test_the_reference_logits_key_follows_the_libraries_the_dtype_and_the_attention_used(tmp_path, monkeypatch):
    """After an upgrade, or with another dtype or attention kernel, the reference is computed anew, never read
    from logits another setup made."""
    from hf2mlflow import parity
    from hf2mlflow.quality import logits_cache

    (tmp_path / "config.json").write_text("{}")
    model = SimpleNamespace(dtype="torch.float32", config=SimpleNamespace(_attn_implementation="sdpa"))
    model.eval = lambda: model
    versions = {"torch": "2.5.0", "transformers": "4.50.0"}
    monkeypatch.setattr(parity, "version", versions.get)

    def key():
        return logits_cache(tmp_path, parity.TorchModel(model, tokenizer=None))[1]

    keys = [key(), key()]
    versions["torch"] = "2.6.0"
    keys.append(key())
    versions["transformers"] = "4.51.0"
    keys.append(key())
    model.dtype = "torch.bfloat16"
    keys.append(key())
    model.config._attn_implementation = "eager"
    keys.append(key())
    assert keys[0] == keys[1] and len(set(keys)) == 5


def test_the_reference_logits_key_follows_the_source_models_files(tmp_path):
    from hf2mlflow.quality import logits_cache

    reference = SimpleNamespace(runtime={"torch": "2.5.0"})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = logits_cache(tmp_path, reference)[1]
    assert logits_cache(tmp_path, reference)[1] == before
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert logits_cache(tmp_path, reference)[1] != before


def test_floor_problems_name_each_figure_against_its_floor():
    summary = {"mean_kld": 0.4, "top1_agreement": 0.6}
    assert floor_problems(summary, None, None) == []
    assert floor_problems(summary, 0.5, 0.5) == []
    assert floor_problems(summary, 0.1, 0.7) == ["mean KL divergence 0.4 > 0.1 allowed",
                                                 "top-1 agreement 60.0% < 70.0% required"]
