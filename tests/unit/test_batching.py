"""The continuous batch scheduler's own rules, with a fake decoder that checks every row it is given (no model).

The fake's "model" answers token t with t + 1, and a sequence whose prompt starts with i starts at 1000 * i, so a
sequence's tokens say which row they came from: a row mixed up by a join, a move or a free shows at once."""

import threading
import time

import numpy as np
import pytest

from hf2mlflow.runtime.batching import (BatchLimits, BatchScheduler, CancelScope, GenerationFailed, QueueFull,
                                        concurrently)

VOCAB = 10_000


def one_hot(token: int) -> np.ndarray:
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[token] = 1.0
    return logits


class FakeDecoder:
    def __init__(self, step_seconds: float = 0.0):
        self.rows: dict[int, list] = {}  # row -> [first prompt id, positions held]
        self.gate = threading.Event()
        self.gate.set()
        self.step_seconds = step_seconds
        self.steps: list[list[int]] = []  # per decode step, the first prompt id of each row
        self.prefills: list[int] = []  # the first prompt id of each prefill

    def reserve(self, rows, positions, lengths):
        assert [self.rows[r][1] for r in range(len(lengths))] == lengths

    def prefill(self, row, prompt_ids):
        self.prefills.append(prompt_ids[0])
        self.rows[row] = [prompt_ids[0], len(prompt_ids)]
        return one_hot(1000 * prompt_ids[0])

    def decode(self, tokens, lengths):
        self.gate.wait(10)
        time.sleep(self.step_seconds)
        self.steps.append([self.rows[r][0] for r in range(len(tokens))])
        out = []
        for row, (token, length) in enumerate(zip(tokens, lengths)):
            first, held = self.rows[row]
            assert held == length and token // 1000 == first, (row, token, length, self.rows)
            self.rows[row][1] += 1
            out.append(one_hot(token + 1))
        return np.stack(out)

    def move(self, source, target, length):
        assert self.rows[source][1] == length
        self.rows[target] = list(self.rows.pop(source))

    def release(self):
        self.rows = {}


def argmax(logits) -> int:
    return int(np.argmax(logits))


def scheduler(decoder, eos_ids=(), **limits):
    return BatchScheduler(decoder, BatchLimits(**limits), context_length=512, eos_ids=set(eos_ids))


def expected(first: int, count: int) -> list[int]:
    return [1000 * first + k for k in range(count)]


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def steps_holding(decoder, first: int) -> int:
    return sum(first in rows for rows in decoder.steps)


def test_concurrent_sequences_decode_together_and_keep_their_own_tokens_and_lengths():
    decoder = FakeDecoder(step_seconds=0.002)
    s = scheduler(decoder)
    tokens = concurrently(lambda i: list(s.generate([i, 0, 0], 3 + 4 * i, argmax)), list(range(1, 7)), 6)
    assert tokens == [expected(i, 3 + 4 * i) for i in range(1, 7)]
    assert max(s.batch_sizes) >= 4


def test_a_late_sequence_joins_a_running_one_within_a_few_steps():
    decoder = FakeDecoder(step_seconds=0.005)
    s = scheduler(decoder)
    long = s.generate([1], 200, argmax)
    first = [next(long) for _ in range(5)]
    late = list(s.generate([2], 5, argmax))  # ends long before the first sequence does
    rest = list(long)
    assert first + rest == expected(1, 200) and late == expected(2, 5)
    joined = next(i for i, rows in enumerate(decoder.steps) if rows == [1, 2])
    assert joined < 10 and decoder.steps[-1] == [1]  # it joined at once and left; the first went on alone


def test_max_batch_bounds_the_rows_and_waiting_sequences_take_freed_rows():
    decoder = FakeDecoder(step_seconds=0.002)
    s = scheduler(decoder, max_batch=2)
    tokens = concurrently(lambda i: list(s.generate([i], 2 + 3 * i, argmax)), list(range(1, 6)), 5)
    assert tokens == [expected(i, 2 + 3 * i) for i in range(1, 6)]
    assert max(len(rows) for rows in decoder.steps) == 2 and set(s.batch_sizes) <= {1, 2}


def test_an_eos_token_ends_its_sequence_at_once():
    s = scheduler(FakeDecoder(), eos_ids={3003})
    assert list(s.generate([3], 50, argmax)) == [3000, 3001, 3002, 3003]


def test_a_full_queue_refuses_at_once_and_frees_as_sequences_end():
    decoder = FakeDecoder()
    decoder.gate.clear()
    s = scheduler(decoder, max_batch=2, max_queue=1)
    first = [s.generate([i], 2, argmax) for i in range(1, 4)]  # 2 generating + 1 waiting
    time.sleep(0.2)
    with pytest.raises(QueueFull, match=r"max_batch 2, max_queue 1"):
        s.generate([9], 1, argmax)
    decoder.gate.set()
    assert [list(t) for t in first] == [expected(i, 2) for i in range(1, 4)]
    assert list(s.generate([9], 1, argmax)) == [9000]


def test_closing_a_sequence_frees_its_row_and_errors_reach_the_callers():
    decoder = FakeDecoder(step_seconds=0.002)
    s = scheduler(decoder)
    tokens = s.generate([1], 500, argmax)
    assert next(tokens) == 1000
    tokens.close()
    assert list(s.generate([2], 2, argmax)) == expected(2, 2)  # the scheduler went on
    assert decoder.steps[-1] == [2]

    class Broken(FakeDecoder):
        def decode(self, tokens, lengths):
            raise RuntimeError("the runtime broke")

    s = scheduler(Broken())
    with pytest.raises(RuntimeError, match="the runtime broke"):
        list(s.generate([1], 2, argmax))
    with pytest.raises(RuntimeError, match="the runtime broke"):
        list(s.generate([1], 2, argmax))


def test_a_sequence_longer_than_the_context_is_refused_before_it_queues():
    with pytest.raises(ValueError, match="exceed the context length 512"):
        scheduler(FakeDecoder()).generate([1] * 500, 20, argmax)


def test_sequences_queued_together_start_in_one_step_or_not_at_all():
    decoder = FakeDecoder(step_seconds=0.002)
    s = scheduler(decoder, max_batch=4, max_queue=1)
    streams = s.generate_together([([i], 6, argmax) for i in range(1, 5)])
    assert [list(t) for t in streams] == [expected(i, 6) for i in range(1, 5)]
    assert decoder.steps[0] == [1, 2, 3, 4]  # the first decode step already carries every row
    with pytest.raises(QueueFull):  # 6 > max_batch + max_queue: none of them is queued
        s.generate_together([([i], 2, argmax) for i in range(1, 7)])
    assert list(s.generate([7], 2, argmax)) == expected(7, 2)


def test_a_stream_closed_or_dropped_before_its_first_token_frees_its_row_within_a_step():
    decoder = FakeDecoder(step_seconds=0.001)
    s = scheduler(decoder)
    for drop in (lambda stream: stream.close(), lambda stream: None):  # closed; dropped (garbage-collected)
        decoder.steps.clear()
        stream = s.generate([1], 400, argmax)
        wait_until(lambda: steps_holding(decoder, 1) > 0)  # decoding, and nothing read yet
        drop(stream)
        del stream
        held = steps_holding(decoder, 1)
        wait_until(lambda: decoder.rows == {})  # the scheduler went idle
        assert steps_holding(decoder, 1) <= held + 1  # at most the step under way when it was closed


def test_a_closed_or_dropped_stream_still_waiting_in_the_queue_is_dropped_unstarted():
    decoder = FakeDecoder(step_seconds=0.001)
    s = scheduler(decoder, max_batch=1, max_queue=2)
    running = s.generate([1], 400, argmax)
    assert next(running) == 1000
    closed, dropped = s.generate([2], 400, argmax), s.generate([3], 400, argmax)
    closed.close()
    del dropped
    late = s.generate([4], 3, argmax)  # the queue has room again at once
    running.close()
    assert list(late) == expected(4, 3)
    assert decoder.prefills == [1, 4]  # 2 and 3 never took a row


def test_a_cancel_scope_ends_from_another_thread_the_streams_its_thread_waits_on():
    decoder = FakeDecoder(step_seconds=0.001)
    s = scheduler(decoder, max_batch=2)
    running = s.generate([1], 400, argmax)
    assert next(running) == 1000
    scope, got = CancelScope(), []

    def client():  # as a server's producer thread: blocked reading, it cannot close its streams itself
        with scope:
            decoding, queued = s.generate([2], 400, argmax), s.generate([3], 400, argmax)  # no row for 3
            got.append(next(decoding))
            got.extend(queued)
            got.extend(decoding)

    thread = threading.Thread(target=client)
    thread.start()
    wait_until(lambda: got)  # 2 decodes and 3 waits for a row
    scope.cancel()
    held = steps_holding(decoder, 2)
    thread.join(5)
    assert not thread.is_alive() and got[0] == 2000
    steps = len(decoder.steps)
    wait_until(lambda: len(decoder.steps) > steps + 3)  # 1 decodes on
    assert steps_holding(decoder, 2) <= held + 1
    running.close()
    assert list(s.generate([4], 2, argmax)) == expected(4, 2)
    assert 3 not in decoder.prefills


def failing_after(count: int, message: str = "probabilities contain NaN"):
    """A chooser that picks greedily `count` times, then fails, as a sampler does on logits holding NaN."""
    chosen = 0

    def choose(logits):
        nonlocal chosen
        chosen += 1
        if chosen > count:
            raise ValueError(message)
        return argmax(logits)

    return choose


def test_a_sampling_error_fails_only_its_own_sequence():
    decoder = FakeDecoder(step_seconds=0.001)
    s = scheduler(decoder)
    streams = s.generate_together([([1], 12, argmax), ([2], 12, failing_after(4)), ([3], 12, argmax),
                                   ([4], 12, failing_after(0))])
    assert list(streams[0]) == expected(1, 12) and list(streams[2]) == expected(3, 12)
    got = []
    with pytest.raises(RuntimeError, match="choosing the next token failed: ValueError: probabilities contain NaN"):
        got.extend(streams[1])
    assert got == expected(2, 4)  # its tokens up to the failure, then the failure
    with pytest.raises(RuntimeError, match="probabilities contain NaN"):  # failing on its very first token
        list(streams[3])
    assert list(s.generate([5], 3, argmax)) == expected(5, 3)


def test_a_prefill_error_fails_only_its_own_sequence():
    class BadPrompt(FakeDecoder):
        def prefill(self, row, prompt_ids):
            if prompt_ids[0] == 13:
                raise RuntimeError("this prompt broke the graph")
            return super().prefill(row, prompt_ids)

    decoder = BadPrompt(step_seconds=0.001)
    s = scheduler(decoder)
    running = s.generate([1], 30, argmax)
    assert next(running) == 1000
    joining = s.generate_together([([2], 10, argmax), ([13], 10, argmax), ([3], 10, argmax)])
    assert [list(joining[0]), list(joining[2])] == [expected(2, 10), expected(3, 10)]
    assert [1000, *running] == expected(1, 30)
    with pytest.raises(RuntimeError, match="the prompt's prefill failed: RuntimeError: this prompt broke the graph"):
        list(joining[1])


def test_a_decode_error_fails_the_rows_of_that_step_and_the_scheduler_serves_on():
    class BreaksOnce(FakeDecoder):
        broken = False

        def decode(self, tokens, lengths):
            if len(self.steps) == 2 and not self.broken:
                self.broken = True
                raise RuntimeError("the runtime broke")
            return super().decode(tokens, lengths)

    decoder = BreaksOnce()
    decoder.gate.clear()
    s = scheduler(decoder, max_batch=2)
    in_step = s.generate_together([([1], 50, argmax), ([2], 50, argmax)])
    waiting = s.generate([3], 4, argmax)  # no row for it yet: it is not in the failing step
    decoder.gate.set()
    for stream, first in zip(in_step, (1, 2)):
        got = []
        with pytest.raises(RuntimeError, match="the decode step failed: RuntimeError: the runtime broke"):
            got.extend(stream)
        assert got == expected(first, 3)  # the prefill's token and two steps' worth
    assert list(waiting) == expected(3, 4)
    assert list(s.generate([4], 3, argmax)) == expected(4, 3)


def test_an_admitted_request_fans_out_beyond_the_queue_and_keeps_its_room():
    """A request's own sequences (rows x n) wait for one another instead of failing on a queue they fill
    themselves; the room it holds (max_batch rows) is not given to other clients, who get QueueFull beyond it."""
    decoder = FakeDecoder(step_seconds=0.001)
    decoder.gate.clear()
    s = scheduler(decoder, max_batch=2, max_queue=1)
    results = {}

    def request():
        with s.admit(6):
            results["tokens"] = concurrently(lambda i: list(s.generate([i], 3, argmax)), list(range(1, 7)), 6)

    thread = threading.Thread(target=request)
    thread.start()
    wait_until(lambda: decoder.prefills)
    time.sleep(0.2)
    assert len(decoder.prefills) <= 2  # at most two run (the decoder is held); the others wait in the request
    other = s.generate([7], 2, argmax)  # the one place left beside the request's two
    with pytest.raises(QueueFull):
        s.generate([8], 2, argmax)
    with pytest.raises(QueueFull, match=r"max_batch 2, max_queue 1"):
        with s.admit(2):
            pass
    decoder.gate.set()
    thread.join(10)
    assert results["tokens"] == [expected(i, 3) for i in range(1, 7)]
    assert list(other) == expected(7, 2)
    assert max(len(rows) for rows in decoder.steps) <= 2
    with s.admit(3):  # all the room is free again, and an admission inside another one joins it
        with s.admit(3):
            assert concurrently(lambda i: list(s.generate([i], 2, argmax)), [1, 2, 3], 3) == [
                expected(i, 2) for i in (1, 2, 3)]


def test_a_failing_item_cancels_the_sequences_its_siblings_queued():
    """concurrently: once one item fails, the others' sequences are cancelled (their answers would be thrown
    away), within a step."""
    decoder = FakeDecoder(step_seconds=0.001)
    s = scheduler(decoder, max_batch=4)

    def item(i):
        if i == 0:
            wait_until(lambda: steps_holding(decoder, 1) > 0)
            raise GenerationFailed("this row failed")
        return list(s.generate([i], 400, argmax))

    with pytest.raises(GenerationFailed, match="this row failed"):
        concurrently(item, [0, 1, 2], 3)
    assert steps_holding(decoder, 1) < 100
    wait_until(lambda: decoder.rows == {})
