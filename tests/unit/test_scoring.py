"""The quality metrics evaluate logs (hf2mlflow/evaluate/scoring.py): exact match and containment after
normalizing case, punctuation and whitespace; ROUGE-L F1 over words."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf2mlflow.evaluate.scoring import METRICS, contains, exact_match, normalize, rouge_l


@pytest.mark.parametrize("text, expected", [
    ("  Paris.  ", "paris"),
    ("Hello,   WORLD!\n", "hello world"),
    ("It's 3.5°C", "it s 3 5°c"),  # ASCII punctuation is a word break; other symbols stay
    ("New\tYork", "new york"),
    ("...", ""),
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    ("Paris.", "paris", 1.0),
    ("  PARIS ", "Paris", 1.0),
    ("Paris, France", "Paris", 0.0),
    ("Pariss", "Paris", 0.0),
])
def test_exact_match(answer, reference, expected):
    assert exact_match(answer, reference) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    ("It is Paris.", "Paris", 1.0),
    ("Paris.", "paris", 1.0),
    ("I love New York, really", "new york", 1.0),
    ("The capital is Parisian", "Paris", 0.0),  # whole words only
    ("comparison", "paris", 0.0),
    ("A New Yorker", "New York", 0.0),
    ("York New", "New York", 0.0),  # in order
    ("", "Paris", 0.0),
])
def test_contains_is_whole_words_in_order(answer, reference, expected):
    assert contains(answer, reference) == expected


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat on the mat" = 5 words: precision 5/5, recall 5/6, F1 = 10/11.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    expected = 2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6)  # LCS "the on the"
    assert rouge_l("the mat on the cat", "the cat sat on the mat") == pytest.approx(expected)
    assert rouge_l("Paris.", "paris") == 1.0  # case and punctuation do not count
    assert rouge_l("London", "Paris") == 0.0
    assert rouge_l("", "Paris") == 0.0 and rouge_l("!!!", "???") == 0.0  # no words: nothing in common


def test_the_metrics_evaluate_logs():
    assert set(METRICS) == {"exact_match", "rouge_l", "contains"}


words = st.lists(st.sampled_from(["paris", "Paris", "the", "capital", "is", "of", "France"]), max_size=6)
spacing = st.sampled_from([" ", "  ", ", ", ". ", "\n", "! "])


@st.composite
def phrases(draw):
    parts = draw(words)
    return "".join(p + draw(spacing) for p in parts).strip()


@settings(max_examples=150, deadline=None)
@given(phrases(), phrases())
def test_scores_are_bounded_and_agree_with_each_other(answer, reference):
    scores = {name: metric(answer, reference) for name, metric in METRICS.items()}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["exact_match"] in (0.0, 1.0) and scores["contains"] in (0.0, 1.0)
    if normalize(reference):
        if scores["exact_match"]:
            assert scores["contains"] == 1.0 and scores["rouge_l"] == pytest.approx(1.0)
        if scores["rouge_l"] == 0.0:
            assert scores["contains"] == 0.0
    assert rouge_l(answer, reference) == pytest.approx(rouge_l(reference, answer))  # F1 is symmetric
    assert exact_match(answer, reference) == exact_match(reference, answer)
