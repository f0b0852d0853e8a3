"""Continuous batching: concurrent generations of one loaded model decode together, and a sequence that arrives
while others decode joins them at the next step.

Callers (threads: the scoring server's, a DataFrame's rows, the `n` choices of a request) each ask for the
tokens of one sequence. One worker thread owns the decoder (kv_slots.SlotDecoder): between decode steps it
prefills each newly arrived prompt into a free cache row, then decodes one token for every running row at once,
and routes each new token to its caller as it comes. A row is freed as soon as its sequence ends (EOS, its
length, or its caller closed or dropped its stream), and the last row moves into the gap. A failure stays with
its sequence: a prompt's prefill or a row's choice of token fails that sequence alone; a decode step that fails
fails the rows it carried. The scheduler goes on either way.

Every row chooses its own tokens (greedy, or sampled from its own seeded generator), and a prompt is always
prefilled alone, so what a sequence generates does not depend on what else runs beside it.
Pure Python: it ships with the logged pyfunc model.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter, deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Protocol

_DONE = object()


class QueueFull(RuntimeError):
    """More sequences wait than the queue holds; the caller should answer 503 and let the client retry."""


class GenerationFailed(RuntimeError):
    """What failed while generating one sequence (its prefill, its choice of a token, or the decode step it was
    in); the original error is its __cause__."""


class Decoder(Protocol):
    def reserve(self, rows: int, positions: int, lengths: list[int]) -> None: ...
    def prefill(self, row: int, prompt_ids: list[int]): ...
    def decode(self, tokens: list[int], lengths: list[int]): ...
    def move(self, source: int, target: int, length: int) -> None: ...
    def release(self) -> None: ...


@dataclass(eq=False)
class Sequence:
    """One sequence to generate: its prompt, how many new tokens it may take, and how it chooses a token from a
    row of logits. `length` counts the positions its cache row holds; `last` is its newest token."""

    prompt_ids: list[int]
    max_new_tokens: int
    choose: Callable
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    cancelled: bool = False  # set by any thread; the worker reads it between steps
    finished: bool = False
    error: GenerationFailed | None = None
    produced: int = 0
    length: int = 0
    last: int = -1


class TokenStream:
    """The new tokens of one sequence, as they come. Closing it, or dropping it, cancels the sequence at any point
    of its life, before its first token too: the scheduler frees its row, or drops it from the queue, at its next
    step. (A generator would not do: closing or collecting one that has not started runs none of its code.)"""

    def __init__(self, sequence: Sequence):
        self._sequence = sequence
        self._ended = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        if self._ended:
            raise StopIteration
        item = self._sequence.out.get()
        if item is _DONE or isinstance(item, BaseException):
            self._ended = True
            self.close()
            if item is _DONE:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        # Only a flag: it may run in any thread, from __del__ too, so it takes no lock.
        self._sequence.cancelled = True

    def __del__(self):
        self.close()


class CancelScope:
    """Cancels from any thread the sequences queued inside `with scope:` (in the thread that entered it). A stream
    waiting for its next token cannot be closed from another thread (a running generator refuses close()); a
    server whose client went away cancels its scope instead, and the waiting stream ends within a step, even
    while its sequence waits in the queue."""

    def __init__(self):
        self.cancelled = False
        self._sequences: list[Sequence] = []
        self._lock = threading.Lock()

    def __enter__(self) -> CancelScope:
        self._token = _scope.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _scope.reset(self._token)

    def add(self, sequence: Sequence) -> None:
        with self._lock:
            sequence.cancelled = sequence.cancelled or self.cancelled
            self._sequences.append(sequence)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for sequence in self._sequences:
                sequence.cancelled = True


_scope: ContextVar[CancelScope | None] = ContextVar("hf2mlflow_cancel_scope", default=None)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 8
    max_queue: int = 32


class BatchScheduler:
    def __init__(self, decoder: Decoder, limits: BatchLimits, context_length: int, eos_ids: set[int],
                 name: str = "batching"):
        self.decoder = decoder
        self.limits = limits
        self.context_length = context_length
        self.eos_ids = set(eos_ids)
        self.name = name
        self._waiting: deque[Sequence] = deque()
        self._running = 0
        self._ready = threading.Condition()
        # Decode steps by how many rows they carried: {rows: steps}. Read by tests and benchmarks.
        self.batch_sizes: Counter = Counter()
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, choose: Callable) -> TokenStream:
        """Queue one sequence (QueueFull, at once, when the queue is full) and return its new tokens as they
        come. Closing or dropping the stream early (a stop string was found, the client went) frees its row at
        the next step. A failure while generating it raises GenerationFailed from the stream."""
        return self.generate_together([(prompt_ids, max_new_tokens, choose)])[0]

    def generate_together(self, requests: list[tuple[list[int], int, Callable]]) -> list[TokenStream]:
        """Queue several sequences (prompt ids, new tokens, chooser) at once, all or none: those that fit start
        in the same step. Their tokens, one iterator each, as `generate` gives them."""
        sequences = []
        for prompt_ids, max_new_tokens, choose in requests:
            if len(prompt_ids) + max_new_tokens > self.context_length:
                raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new ones exceed the context "
                                 f"length {self.context_length}")
            sequences.append(Sequence(list(prompt_ids), max_new_tokens, choose))
        with self._ready:
            # Cancelled sequences still queued take no room: the worker drops them at its next step.
            waiting = sum(not s.cancelled for s in self._waiting)
            if self._running + waiting + len(sequences) > self.limits.max_batch + self.limits.max_queue:
                raise QueueFull(f"{self._running} sequences are generating and {waiting} waiting "
                                f"(max_batch {self.limits.max_batch}, max_queue {self.limits.max_queue})")
            self._waiting.extend(sequences)
            self._ready.notify()
        scope = _scope.get()
        for sequence in sequences if scope else ():
            scope.add(sequence)
        return [TokenStream(sequence) for sequence in sequences]

    @staticmethod
    def _fail(sequence: Sequence, what: str, exc: Exception) -> None:
        """`sequence` ends with an error saying what failed; its caller raises it after the tokens it had."""
        sequence.error = GenerationFailed(f"{what} failed: {type(exc).__name__}: {exc}")
        sequence.error.__cause__ = exc
        sequence.finished = True

    def _emit(self, sequence: Sequence, logits) -> None:
        try:
            token = sequence.choose(logits)
        except Exception as exc:  # a sampler's error (NaN logits, ...) is this row's alone
            self._fail(sequence, "choosing the next token", exc)
            return
        sequence.out.put(token)
        sequence.produced += 1
        sequence.last = token
        sequence.finished = token in self.eos_ids or sequence.produced >= sequence.max_new_tokens

    def _start(self, sequence: Sequence, running: list[Sequence]) -> None:
        """Prefill `sequence` into the row after the running ones and choose its first token. The prefill writes
        only that row, so its failure is this sequence's alone."""
        try:
            # Rows beyond those in use cost no memory until written (the cache is zero-filled lazily).
            self.decoder.reserve(self.limits.max_batch, len(sequence.prompt_ids) + sequence.max_new_tokens,
                                 [s.length for s in running])
            logits = self.decoder.prefill(len(running), sequence.prompt_ids)
        except Exception as exc:
            self._fail(sequence, "the prompt's prefill", exc)
            sequence.out.put(sequence.error)
            return
        sequence.length = len(sequence.prompt_ids)
        running.append(sequence)
        self._emit(sequence, logits)  # a failure here ends it at the next retire, like any ended row

    def _step(self, running: list[Sequence]) -> None:
        try:
            logits = self.decoder.decode([s.last for s in running], [s.length for s in running])
        except Exception as exc:  # shared by the rows in it, and only by them
            for sequence in running:
                self._fail(sequence, "the decode step", exc)
            return
        self.batch_sizes[len(running)] += 1
        for row, sequence in enumerate(running):
            sequence.length += 1
            if not sequence.cancelled:
                self._emit(sequence, logits[row])

    def _retire(self, running: list[Sequence]) -> None:
        """Free the rows of ended sequences; the last row moves into each gap."""
        for row in reversed(range(len(running))):
            sequence = running[row]
            if sequence.finished or sequence.cancelled:
                last = running.pop()
                if row < len(running):
                    self.decoder.move(len(running), row, last.length)
                    running[row] = last
                sequence.out.put(sequence.error or _DONE)

    def _work(self) -> None:
        running: list[Sequence] = []
        together, since = 0, time.perf_counter()  # how many decoded together, since when (for the log)
        while True:
            with self._ready:
                for sequence in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(sequence)
                    sequence.out.put(_DONE)
                while not self._waiting and not running:
                    self._ready.wait()
                joining = []
                while self._waiting and len(running) + len(joining) < self.limits.max_batch:
                    joining.append(self._waiting.popleft())
                self._running = len(running) + len(joining)
            try:
                for sequence in joining:
                    if sequence.cancelled:
                        sequence.out.put(_DONE)
                    else:
                        self._start(sequence, running)
                self._retire(running)
                if running:
                    self._step(running)
                    self._retire(running)
            except BaseException as exc:  # the callers raise it; the scheduler goes on
                for sequence in running + joining:
                    sequence.out.put(exc)
                running = []
            if len(running) != together:
                if together > 1:
                    print(f"[{self.name}] {together} sequences in one batch, {time.perf_counter() - since:.2f} s",
                          file=sys.stderr, flush=True)
                together, since = len(running), time.perf_counter()
            if not running:
                self.decoder.release()
                with self._ready:
                    self._running = 0


def concurrently(function: Callable, items: list, max_workers: int) -> list:
    """[function(item) for item in items], run in up to `max_workers` threads so that their generations can
    share batches; the first exception is raised."""
    if len(items) <= 1 or max_workers <= 1:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), max_workers), thread_name_prefix="row") as pool:
        return list(pool.map(function, items))
