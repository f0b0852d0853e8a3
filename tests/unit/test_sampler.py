"""The optimum engine's sampler (hf2mlflow/runtime/sampling.py `sampler`): temperature, then top-k, then top-p,
from a random generator of its own. Frequencies are counted over seeded draws, so every run draws the same."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf2mlflow.runtime.chat_schema import ChatRequest
from hf2mlflow.runtime.sampling import greedy, sampler

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = np.log(np.array(PROBS, dtype=np.float32))  # at temperature 1 the sampler draws from PROBS


def request(temperature=1.0, top_p=1.0, top_k=0):
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=1, temperature=temperature,
                       top_p=top_p, top_k=top_k)


def draws(logits, count, seed=0, **sampling):
    choose = sampler(request(**sampling), seed)
    return [choose(np.array(logits, dtype=np.float32)) for _ in range(count)]


def frequencies(tokens, size):
    return np.bincount(tokens, minlength=size) / len(tokens)


def softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - max(x))
    return e / e.sum()


def test_greedy_is_the_argmax():
    assert greedy(np.array([0.1, 2.0, -1.0, 1.9], dtype=np.float32)) == 1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_from_the_softmax_of_logits_over_temperature(temperature):
    expected = softmax(LOGITS / temperature)  # 0.5: [0.685, 0.247, 0.062, 0.007]; 2.0: [0.364, 0.282, 0.2, 0.115]
    got = frequencies(draws(LOGITS, 10_000, temperature=temperature), 4)
    assert np.abs(got - expected).max() < 0.02, (got, expected)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = [0.1, 2.0, -1.0, 1.9, 0.0]
    assert set(draws(logits, 300, temperature=2.0, top_k=1)) == {1}
    assert set(draws(logits, 300, temperature=2.0, top_k=2)) == {1, 3}
    got = frequencies(draws(logits, 10_000, temperature=1.0, top_k=2), 5)  # renormalized over the two
    assert abs(got[1] - softmax([2.0, 1.9])[0]) < 0.02
    assert set(draws(logits, 2000, temperature=1.0, top_k=99)) == {0, 1, 2, 3, 4}  # k beyond the vocabulary: all


@pytest.mark.parametrize("top_p, kept", [
    (0.4, {0}),  # 0.5 alone reaches 0.4
    (0.6, {0, 1}),
    (0.85, {0, 1, 2}),  # 0.5 + 0.3 = 0.8 does not reach 0.85
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_of_most_likely_tokens_that_reaches_it(top_p, kept):
    assert set(draws(LOGITS, 3000, top_p=top_p)) == kept


def test_top_p_renormalizes_over_what_it_keeps():
    got = frequencies(draws(LOGITS, 10_000, top_p=0.6), 4)
    assert abs(got[0] - 0.5 / 0.8) < 0.02 and abs(got[1] - 0.3 / 0.8) < 0.02


def test_top_k_applies_before_top_p():
    # top-k 3 leaves [0.5, 0.3, 0.15] / 0.95; top-p 0.8 of that needs 0.5/0.95 + 0.3/0.95 = 0.842: tokens 0 and 1.
    assert set(draws(LOGITS, 3000, top_k=3, top_p=0.8)) == {0, 1}
    # Without top-k, 0.5 + 0.3 = 0.8 would not reach 0.81; with it, 0.842 does.
    assert set(draws(LOGITS, 3000, top_k=3, top_p=0.81)) == {0, 1}
    assert set(draws(LOGITS, 3000, top_p=0.81)) == {0, 1, 2}


def test_a_seed_repeats_its_draws_and_samplers_share_no_random_state():
    assert draws(LOGITS, 50, seed=3) == draws(LOGITS, 50, seed=3)
    assert draws(LOGITS, 50, seed=3) != draws(LOGITS, 50, seed=4)
    a, b = sampler(request(), 3), sampler(request(), 3)
    interleaved = [(a(LOGITS), b(LOGITS)) for _ in range(50)]
    assert [x for x, _ in interleaved] == [y for _, y in interleaved] == draws(LOGITS, 50, seed=3)


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.integers(-20, 20), min_size=1, max_size=12),
       temperature=st.sampled_from([0.1, 0.7, 1.0, 2.0]), top_k=st.integers(0, 14),
       top_p=st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_a_draw_is_never_outside_the_top_k_or_the_top_p_mass(logits, temperature, top_k, top_p, seed):
    logits = [float(x) for x in logits]
    token = draws(logits, 1, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p)[0]
    assert 0 <= token < len(logits)
    if top_k:
        assert logits[token] >= sorted(logits)[-min(top_k, len(logits))]
    # Among the tokens top-k kept, those strictly more likely than the drawn one hold less than top_p.
    kept = [x for x in logits if not top_k or x >= sorted(logits)[-min(top_k, len(logits))]]
    probs = softmax([x / temperature for x in kept])
    more_likely = sum(p for x, p in zip(kept, probs) if x > logits[token])
    assert more_likely < top_p or math.isclose(more_likely, top_p, rel_tol=1e-9)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30])
def test_a_temperature_near_zero_samples_the_argmax_instead_of_failing(temperature):
    """Dividing the logits by a denormal temperature overflows; the limit of sampling is the argmax."""
    logits = [1.0, 3.0, 2.9, -1.0]
    assert draws(logits, 20, temperature=temperature) == [1] * 20
    assert draws(logits, 20, temperature=temperature, top_k=2, top_p=0.5) == [1] * 20
