"""A scheduler that lets concurrent generations of one loaded model run as one batch.

Callers (threads: the scoring server's, a DataFrame's rows, the `n` choices of a request) each ask for the
tokens of one sequence; one worker thread takes the waiting sequences that may share a batch, hands them to
the engine's `run_batch`, and routes every new token back to its caller as it comes. The batch is static:
a sequence that arrives while a batch runs waits for the next one.

Sequences share a batch only where that cannot change what they generate: the same group (greedy, or the
same sampling settings without a seed) and room for every row within the context length. A seeded sampled
sequence always runs alone, so its seed gives the same answer under any load.
Pure Python: it ships with the logged pyfunc model.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator

_DONE = object()


class QueueFull(RuntimeError):
    """More sequences wait than the queue holds; the caller should answer 503 and let the client retry."""


@dataclass
class Sequence:
    """One sequence to generate: its prompt, how many new tokens it may take, whom it can batch with (None:
    no one), and the engine's search options for it (the same within a group)."""

    prompt_ids: list[int]
    max_new_tokens: int
    group: Hashable
    options: dict = field(default_factory=dict)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    cancelled: bool = False

    def emit(self, token: int) -> None:
        self.out.put(token)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 8
    max_queue: int = 32
    # Wait this long after the first sequence arrives for others to join (the rows of a DataFrame arrive
    # within microseconds of each other); short against one decode step.
    gather_seconds: float = 0.02


class BatchScheduler:
    def __init__(self, run_batch: Callable[[list[Sequence]], None], limits: BatchLimits, context_length: int,
                 name: str = "batching"):
        self._run_batch = run_batch
        self.limits = limits
        self.context_length = context_length
        self.name = name
        self._waiting: deque[Sequence] = deque()
        self._running = 0
        self._ready = threading.Condition()
        # How many sequences each batch carried: {rows: batches}. Read by tests and benchmarks.
        self.batch_sizes: Counter = Counter()
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, group: Hashable,
                 options: dict | None = None) -> Iterator[int]:
        """Queue one sequence (QueueFull, at once, when the queue is full) and return its new tokens as the
        batch it runs in produces them. Closing the iterator early (a stop string was found) frees its row:
        a batch ends when no row wants more tokens."""
        sequence = Sequence(list(prompt_ids), max_new_tokens, group, dict(options or {}))
        with self._ready:
            # Room for a full batch and a full queue behind it, counted together while a batch forms.
            if self._running + len(self._waiting) >= self.limits.max_batch + self.limits.max_queue:
                raise QueueFull(f"{self._running} sequences are generating and {len(self._waiting)} waiting "
                                f"(max_batch {self.limits.max_batch}, max_queue {self.limits.max_queue})")
            self._waiting.append(sequence)
            self._ready.notify()
        return self._tokens_of(sequence)

    @staticmethod
    def _tokens_of(sequence: Sequence) -> Iterator[int]:
        try:
            while (item := sequence.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            sequence.cancelled = True

    def _fits(self, batch: list[Sequence], candidate: Sequence) -> bool:
        rows = batch + [candidate]
        return (max(len(s.prompt_ids) for s in rows) + max(s.max_new_tokens for s in rows)) <= self.context_length

    def _take(self) -> list[Sequence]:
        first = self._waiting.popleft()
        batch = [first]
        if first.group is not None:
            for sequence in list(self._waiting):
                if len(batch) >= self.limits.max_batch:
                    break
                if sequence.group == first.group and self._fits(batch, sequence):
                    self._waiting.remove(sequence)
                    batch.append(sequence)
        return batch

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
            if self.limits.max_batch > 1:
                time.sleep(self.limits.gather_seconds)
            with self._ready:
                batch = self._take()
                self._running = len(batch)
            self.batch_sizes[len(batch)] += 1
            start = time.perf_counter()
            try:
                self._run_batch(batch)
            except BaseException as exc:  # the callers raise it; the scheduler goes on
                for sequence in batch:
                    sequence.out.put(exc)
            finally:
                with self._ready:
                    self._running = 0
                for sequence in batch:
                    sequence.out.put(_DONE)
            if len(batch) > 1:
                print(f"[{self.name}] {len(batch)} sequences in one batch, {time.perf_counter() - start:.2f} s",
                      file=sys.stderr, flush=True)


def concurrently(function: Callable, items: list, max_workers: int) -> list:
    """[function(item) for item in items], run in up to `max_workers` threads so that their generations can
    share batches; the first exception is raised."""
    if len(items) <= 1 or max_workers <= 1:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), max_workers), thread_name_prefix="row") as pool:
        return list(pool.map(function, items))
