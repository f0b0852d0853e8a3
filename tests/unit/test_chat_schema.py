"""The request parser: any JSON body parses into a bounded request or gets a refusal that says what was wrong."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf2mlflow.runtime.chat_schema import (MAX_CONTENT_CHARS, MAX_MESSAGES, MAX_N, PROMPT_KEYS, REQUEST_KEYS, ROLES,
                                           ChatRequest, ChatRequestError, parse_prompt_request, parse_request)

DEFAULTS = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0}

# Any JSON value, and request bodies built from the schema's own keys with values of any type.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES) | json_values,
                                           "content": st.text(max_size=30) | json_values}), max_size=4)
bodies = st.dictionaries(st.sampled_from(REQUEST_KEYS + ("extra",)), json_values, max_size=6).flatmap(
    lambda body: st.builds(lambda m: {**body, "messages": m}, messages | json_values))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_request_parses_or_gets_a_clear_refusal(body):
    try:
        request = parse_request(body, DEFAULTS)
    except ChatRequestError as exc:
        assert str(exc)  # a refusal says what was wrong
        return
    assert isinstance(request, ChatRequest)
    assert 1 <= len(request.messages) <= MAX_MESSAGES
    assert all(m["role"] in ROLES and isinstance(m["content"], str) and m["content"] for m in request.messages)
    assert 1 <= request.max_tokens and 1 <= request.n <= MAX_N and 0.0 <= request.temperature <= 2.0
    assert 0 < request.top_p <= 1.0 and request.top_k >= 0 and len(request.stop) <= 4
    assert all(isinstance(s, str) and s for s in request.stop)


@pytest.mark.parametrize("body, expected", [
    ({"messages": [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)}, f"at most {MAX_MESSAGES}"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_CONTENT_CHARS + 1)}]}, f"at most {MAX_CONTENT_CHARS}"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "'stop' must be a string or a list"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}}, "'stop' must be a string or a list"),
])
def test_request_size_and_shape_are_bounded(body, expected):
    with pytest.raises(ChatRequestError, match=expected):
        parse_request(body, DEFAULTS)


prompt_rows = st.dictionaries(st.sampled_from(PROMPT_KEYS + ("extra",)), json_values, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_rows, st.dictionaries(st.sampled_from(PROMPT_KEYS[1:]), json_values, max_size=3))
def test_any_prompt_row_and_params_parse_or_get_a_clear_refusal(row, params):
    try:
        request = parse_prompt_request(row, DEFAULTS, params)
    except ChatRequestError as exc:
        assert str(exc)
        return
    assert isinstance(request.prompt, str) and request.prompt and request.messages == []
    assert 1 <= request.max_tokens and 0.0 <= request.temperature <= 2.0 and len(request.stop) <= 4


def test_a_prompt_rows_settings_win_over_params_which_win_over_the_targets():
    row = {"prompt": "<|user|>Hi<|end|><|assistant|>", "max_tokens": 3, "top_k": None}
    request = parse_prompt_request(row, DEFAULTS, {"max_tokens": 9, "temperature": 0.5, "seed": -1, "stop": []})
    assert request.prompt == row["prompt"]  # as it is: no template, no stripping
    assert (request.max_tokens, request.temperature, request.top_k, request.seed) == (3, 0.5, 0, None)
    with pytest.raises(ChatRequestError, match="unknown request field.*messages.*allowed: prompt, max_tokens"):
        parse_prompt_request({"prompt": "Hi", "messages": []}, DEFAULTS)
    with pytest.raises(ChatRequestError, match="'prompt' is not valid Unicode"):
        parse_prompt_request({"prompt": "\ud800"}, DEFAULTS)
