"""The batch scheduler's own rules, with a fake engine that records every batch it is given (no model)."""

import threading

import pytest

from hf2mlflow.runtime.batching import BatchLimits, BatchScheduler, QueueFull, concurrently


class FakeEngine:
    """Emits 100 + step for every row until the row's max_new_tokens, while `gate` is open."""

    def __init__(self):
        self.batches: list[list[int]] = []  # the prompts' first ids, per batch
        self.gate = threading.Event()
        self.gate.set()

    def run_batch(self, batch):
        self.batches.append([s.prompt_ids[0] for s in batch])
        self.gate.wait(10)
        for step in range(max(s.max_new_tokens for s in batch)):
            if all(s.cancelled for s in batch):
                return
            for s in batch:
                if step < s.max_new_tokens and not s.cancelled:
                    s.emit(100 + step)


def scheduler(engine, **limits):
    return BatchScheduler(engine.run_batch, BatchLimits(**{"gather_seconds": 0.05, **limits}), context_length=64)


def test_concurrent_sequences_of_one_group_share_a_batch_and_keep_their_lengths():
    engine = FakeEngine()
    s = scheduler(engine)
    tokens = concurrently(lambda i: list(s.generate([i], 2 + i, ("greedy",))), list(range(4)), 4)
    assert tokens == [[100 + k for k in range(2 + i)] for i in range(4)]
    assert sorted(engine.batches[0]) == [0, 1, 2, 3] and s.batch_sizes == {4: 1}


def test_groups_never_mix_and_a_seeded_sequence_runs_alone():
    engine = FakeEngine()
    s = scheduler(engine)
    groups = [("greedy",), ("sample", 0.7, 1.0, 0), ("greedy",), None, None, ("sample", 0.7, 1.0, 0)]
    concurrently(lambda i: list(s.generate([i], 3, groups[i])), list(range(6)), 6)
    batches = sorted(sorted(b) for b in engine.batches)
    assert batches == [[0, 2], [1, 5], [3], [4]]


def test_max_batch_and_context_length_bound_a_batch():
    engine = FakeEngine()
    s = scheduler(engine, max_batch=2)
    concurrently(lambda i: list(s.generate([i], 3, ("greedy",))), list(range(5)), 5)
    assert sorted(len(b) for b in engine.batches) == [1, 2, 2]
    engine = FakeEngine()
    s = scheduler(engine)
    # 40 prompt tokens + 30 new ones do not fit a context of 64 beside a row that may take 30 more.
    concurrently(lambda args: list(s.generate(*args)), [([1] * 40, 10, ("greedy",)), ([2] * 5, 30, ("greedy",))], 2)
    assert sorted(engine.batches) == [[1], [2]]


def test_a_full_queue_refuses_at_once_and_frees_as_batches_end():
    engine = FakeEngine()
    engine.gate.clear()
    s = scheduler(engine, max_batch=2, max_queue=1)
    first = [s.generate([i], 1, ("greedy",)) for i in range(3)]  # 2 generating + 1 waiting
    with pytest.raises(QueueFull, match=r"max_batch 2, max_queue 1"):
        s.generate([9], 1, ("greedy",))
    engine.gate.set()
    assert [list(t) for t in first] == [[100], [100], [100]]
    assert list(s.generate([9], 1, ("greedy",))) == [100]


def test_closing_every_sequence_ends_the_batch_and_errors_reach_the_callers():
    engine = FakeEngine()
    s = scheduler(engine)
    tokens = s.generate([1], 50, ("greedy",))
    assert next(tokens) == 100
    tokens.close()
    assert list(s.generate([2], 2, ("greedy",))) == [100, 101]  # the scheduler went on

    def broken(batch):
        raise RuntimeError("the runtime broke")

    s = BatchScheduler(broken, BatchLimits(), context_length=64)
    with pytest.raises(RuntimeError, match="the runtime broke"):
        list(s.generate([1], 2, ("greedy",)))
    with pytest.raises(RuntimeError, match="the runtime broke"):
        list(s.generate([1], 2, ("greedy",)))
