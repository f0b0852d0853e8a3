"""What every chat engine shares (hf2mlflow/runtime/chat_engine.py), with a scripted engine whose tokens decode to
given pieces of text: the stop-string hold-back while streaming, finish reasons, usage, and each choice's seed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf2mlflow.runtime.batching import BatchLimits, BatchScheduler
from hf2mlflow.runtime.chat_engine import ChatEngine
from hf2mlflow.runtime.chat_schema import ChatRequest, ChatRequestError
from tests.unit.test_batching import FakeDecoder, argmax, steps_holding, wait_until

HELLO = [{"role": "user", "content": "hi"}]
EOS = None  # a piece that is the end-of-sequence token


class ScriptedEngine(ChatEngine):
    """Token i decodes to pieces[i] (an EOS piece is the end-of-sequence token). Records the seeds it was asked
    for and calls `before_token(i)` just before it hands out token i, after the caller took every delta so far."""

    model_name = "scripted"

    def __init__(self, pieces, context_length=1000, prompt=(1, 2, 3), before_token=None):
        self.pieces, self.context_length, self.prompt = list(pieces), context_length, list(prompt)
        self.eos_ids = {i for i, piece in enumerate(self.pieces) if piece is EOS}
        self.before_token = before_token or (lambda i: None)
        self.consumed, self.seeds, self.max_lengths = 0, [], []

    def _encode(self, messages):
        return self.prompt

    def _tokens(self, prompt_ids, request, seed, max_length):
        self.seeds.append(seed)
        self.max_lengths.append(max_length)
        for i in range(min(len(self.pieces), max_length - len(prompt_ids))):
            self.before_token(i)
            self.consumed = i + 1
            yield i

    def _text_decoder(self):
        return lambda token: self.pieces[token]


def request(stop=(), max_tokens=100, **fields):
    return ChatRequest(messages=HELLO, max_tokens=max_tokens, stop=tuple(stop), **fields)


def streamed(pieces, stop=(), **fields):
    """(the content deltas, the finish reason, the completion tokens) of a streamed answer."""
    *body, last = ScriptedEngine(pieces).stream(request(stop, **fields))
    assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in body[1:]]
    return deltas, last["choices"][0]["finish_reason"], last["usage"]["completion_tokens"]


def answered(pieces, stop=(), **fields):
    """(the content, the finish reason, the completion tokens) of the whole answer."""
    response = ScriptedEngine(pieces).chat(request(stop, **fields))
    (choice,) = response["choices"]
    return choice["message"]["content"], choice["finish_reason"], response["usage"]["completion_tokens"]


def test_a_stop_string_split_across_chunks_is_never_streamed():
    deltas, finish, tokens = streamed(["Hel", "lo S", "TOP"], stop=["STOP"])
    # Three characters (the stop string's length - 1) are held back until they cannot start "STOP".
    assert deltas == ["Hell", "o "]
    assert "".join(deltas) == "Hello " and not any("S" in d for d in deltas)
    assert (finish, tokens) == ("stop", 3)
    assert answered(["Hel", "lo S", "TOP"], stop=["STOP"]) == ("Hello ", "stop", 3)


def test_a_stop_string_one_character_per_token_ends_generation_at_its_last_character():
    engine = ScriptedEngine(["The answer", " is S", "T", "O", "P", " and more", " and more"])
    *body, last = engine.stream(request(["STOP"]))
    assert "".join(c["choices"][0]["delta"]["content"] for c in body[1:]) == "The answer is "
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == 5
    assert engine.consumed == 5  # nothing generated after the stop string


def test_a_partial_match_that_is_no_stop_string_is_released_once_it_cannot_be_one():
    released = []  # (token about to be generated, text streamed so far)
    deltas = []

    def before_token(i):
        released.append((i, "".join(deltas)))

    engine = ScriptedEngine(["Hello ", "ST", "OVE", " hot"], before_token=before_token)
    for c in engine.stream(request(["STOP"])):  # each delta is taken as it comes
        deltas.append(c["choices"][0]["delta"].get("content") or "")
        finish = c["choices"][0]["finish_reason"]
    assert "".join(deltas) == "Hello STOVE hot" and finish == "length"
    # "ST" could start "STOP" until "OVE" came: the S was held back until then, and released right after.
    assert released == [(0, ""), (1, "Hel"), (2, "Hello"), (3, "Hello ST")]


def test_multiple_stop_strings_the_first_one_generated_ends_the_answer():
    assert answered(["Sure", ".\n", "\nUser:", " next"], stop=["User:", "\n\n"]) == ("Sure.", "stop", 3)
    # Two in one piece: the earlier one cuts.
    assert answered(["a User: b\n\nc"], stop=["\n\n", "User:"]) == ("a ", "stop", 1)
    # Generation ends at the token that completes a stop string, even when a longer one began earlier.
    assert answered(["A", "B", "C", "D"], stop=["ABCD", "C"]) == ("AB", "stop", 3)
    # Both completed by the same token: the earlier one cuts.
    assert answered(["AB", "CD"], stop=["ABCD", "C"]) == ("", "stop", 2)


def test_without_stop_strings_every_piece_streams_at_once_and_empty_pieces_send_nothing():
    deltas, finish, tokens = streamed(["Hi", "", " there", "!"])
    assert deltas == ["Hi", " there", "!"] and (finish, tokens) == ("length", 4)


@pytest.mark.parametrize("pieces, stop, expected", [
    (["STOP here"], ["STOP"], ("", "stop", 1)),  # the stop string first: an empty answer
    ([EOS, "never"], ["STOP"], ("", "stop", 1)),  # EOS first
    (["Hello", EOS, " never"], ["STOP"], ("Hello", "stop", 2)),  # EOS releases the held-back text
    (["Hello ST"], ["STOP"], ("Hello ST", "length", 1)),  # out of tokens: so does the end
    (["xSTO", "Py"], ["STOPPED", "STOP"], ("x", "stop", 2)),  # the shorter one matches first
    ([], ["STOP"], ("", "length", 0)),
])
def test_edges(pieces, stop, expected):
    assert answered(pieces, stop) == expected
    deltas, finish, tokens = streamed(pieces, stop)
    assert ("".join(deltas), finish, tokens) == expected and "" not in deltas


def test_max_tokens_and_the_context_length_bound_the_answer():
    engine = ScriptedEngine(["a"] * 50, context_length=10)
    engine.chat(request(max_tokens=4))
    engine.chat(request(max_tokens=100))
    assert engine.max_lengths == [3 + 4, 10]  # the prompt is 3 tokens
    assert answered(["a"] * 50, max_tokens=4) == ("aaaa", "length", 4)
    with pytest.raises(ChatRequestError, match="the prompt is 10 tokens; this model's context length is 10"):
        ScriptedEngine(["a"], context_length=10, prompt=range(10)).chat(request())


class BatchedEngine(ScriptedEngine):
    """Its tokens come from a batch scheduler over tests/unit/test_batching.py's fake decoder (prompt 1, 2, 3: the
    rows the fake records as 1)."""

    def __init__(self):
        super().__init__(["x"] * 1000)
        self.decoder = FakeDecoder(step_seconds=0.001)
        self.scheduler = BatchScheduler(self.decoder, BatchLimits(), self.context_length, set())

    def _tokens(self, prompt_ids, request, seed, max_length):
        return self.scheduler.generate(prompt_ids, max_length - len(prompt_ids), argmax)


def test_a_stream_closed_right_after_its_role_chunk_cancels_its_sequence():
    engine = BatchedEngine()
    chunks = engine.stream(request(max_tokens=400))
    assert next(chunks)["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # queued, nothing read
    wait_until(lambda: steps_holding(engine.decoder, 1) > 0)
    chunks.close()
    held = steps_holding(engine.decoder, 1)
    wait_until(lambda: engine.decoder.rows == {})  # the scheduler went idle
    assert steps_holding(engine.decoder, 1) <= held + 1  # at most the step under way when it was closed


def test_each_choice_gets_the_seed_plus_its_index():
    engine = ScriptedEngine(["a", "b"])
    response = engine.chat(request(n=3, seed=7, temperature=1.0))
    assert sorted(engine.seeds) == [7, 8, 9] and [c["index"] for c in response["choices"]] == [0, 1, 2]
    assert response["usage"]["completion_tokens"] == 6
    engine = ScriptedEngine(["a"])
    list(engine.stream(request(n=2)))
    assert engine.seeds == [None, None]


# Texts and stop strings over a small alphabet, so that stop strings and partial matches are frequent.
texts = st.text(alphabet="ABS x", max_size=24)
stop_strings = st.text(alphabet="ABS", min_size=1, max_size=4)


@st.composite
def chunked(draw, text):
    """`text` cut into pieces at any points (empty pieces included, as a decoder gives for partial characters)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def first_stop(pieces, stops):
    """The answer as the spec says it: generation ends after the first piece by which some stop string has been
    generated, and the answer is the text before the earliest stop string in the text up to there."""
    text = ""
    for piece in pieces:
        text += piece
        found = [text.find(s) for s in stops if s in text]
        if found:
            return text[:min(found)], "stop"
    return text, "length"


@settings(max_examples=300, deadline=None)
@given(st.data(), texts, stop_strings)
def test_any_chunking_streams_the_text_cut_at_the_stop_string(data, text, stop):
    pieces = data.draw(chunked(text))
    deltas, finish, _ = streamed(pieces, [stop])
    expected = text[:text.find(stop)] if stop in text else text
    assert "".join(deltas) == expected and finish == ("stop" if stop in text else "length")
    assert answered(pieces, [stop])[:2] == (expected, finish)


@settings(max_examples=300, deadline=None)
@given(st.data(), texts, st.lists(stop_strings, max_size=4))
def test_any_chunking_with_several_stop_strings_streams_what_the_whole_answer_holds(data, text, stops):
    pieces = data.draw(chunked(text))
    deltas, finish, tokens = streamed(pieces, stops)
    assert ("".join(deltas), finish) == first_stop(pieces, stops)
    assert answered(pieces, stops) == ("".join(deltas), finish, tokens)
    assert "" not in deltas


@settings(max_examples=200, deadline=None)
@given(st.data(), texts, st.lists(stop_strings, max_size=4))
def test_no_more_than_the_longest_stop_string_less_one_character_is_ever_held_back(data, text, stops):
    pieces = data.draw(chunked(text))
    hold = max((len(s) for s in stops), default=1) - 1
    deltas = []

    def before_token(i):
        # Everything generated so far has been decoded; all but `hold` characters of it must have been sent.
        assert len("".join(pieces[:i])) - len("".join(deltas)) <= hold

    for c in ScriptedEngine(pieces, before_token=before_token).stream(request(stops)):
        deltas.append(c["choices"][0]["delta"].get("content") or "")
