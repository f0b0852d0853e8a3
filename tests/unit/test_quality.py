"""The teacher-forced measure's arithmetic (hf2mlflow/quality.py): KL divergence, top-1 agreement and perplexity
per scored position, and the windows whose second half is scored."""

from types import SimpleNamespace

import numpy as np
import pytest

from hf2mlflow.quality import floor_problems, reference_logits, score_window, teacher_forced, windows


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


class _Counting(_Model):
    def __init__(self, table):
        super().__init__(table)
        self.calls = 0

    def all_logits(self, ids):
        self.calls += 1
        return super().all_logits(ids)


def test_reference_logits_are_computed_once_per_model_ids_and_window(tmp_path):
    rng = np.random.default_rng(2)
    reference, candidate = _Counting(rng.normal(size=(40, 40))), _Model(rng.normal(size=(40, 40)))
    ids, cache = list(range(40)), (tmp_path, "digest-of-the-model")
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
