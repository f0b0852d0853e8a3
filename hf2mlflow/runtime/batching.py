"""Continuous batching: concurrent generations of one loaded model decode together, and a sequence that arrives
while others decode joins them at the next step.

Callers (threads: the scoring server's, a DataFrame's rows, the `n` choices of a request) each ask for the
tokens of one sequence. One worker thread owns the decoder (kv_slots.SlotDecoder): between decode steps it
prefills each newly arrived prompt into a free cache row, then decodes one token for every running row at once,
and routes each new token to its caller as it comes. A row is freed as soon as its sequence ends (EOS, its
length, or its caller closed or dropped its stream), and the last row moves into the gap. A failure stays with
its sequence: a prompt's prefill or a row's choice of token fails that sequence alone; a decode step that fails
fails the rows it carried. The scheduler goes on either way.

A request that fans out (a DataFrame's rows, the `n` choices of each) is admitted as a whole (`admit`): it
holds room for up to max_batch sequences while it runs, and its own sequences wait for one another there instead
of failing on a queue they fill themselves; other clients meet a full queue (QueueFull) only when their own work
does not fit beside what is already held.

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
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
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
    ended: bool = False  # its caller was handed its last item
    error: GenerationFailed | None = None
    produced: int = 0
    length: int = 0
    last: int = -1
    admission: Admission | None = None  # the request whose room it runs in; None: it takes queue room of its own


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
    """Cancels from any thread the sequences queued inside `with scope:` (in the thread that entered it, and in
    the threads `concurrently` runs from there). A stream waiting for its next token cannot be closed from another
    thread (a running generator refuses close()); a server whose client went away cancels its scope instead, and
    the waiting stream ends within a step, even while its sequence waits in the queue. Cancelling a scope cancels
    the scopes entered inside it too."""

    def __init__(self):
        self.cancelled = False
        self._sequences: list[Sequence] = []
        self._lock = threading.Lock()
        self._parent: CancelScope | None = None
        self._entered = threading.local()  # one scope may be entered in several threads at once

    def __enter__(self) -> CancelScope:
        self._parent = _scope.get()
        self._entered.token = _scope.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _scope.reset(self._entered.token)

    def add(self, sequence: Sequence) -> None:
        with self._lock:
            sequence.cancelled = sequence.cancelled or self.cancelled
            self._sequences.append(sequence)
        if self._parent is not None:
            self._parent.add(sequence)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for sequence in self._sequences:
                sequence.cancelled = True


_scope: ContextVar[CancelScope | None] = ContextVar("hf2mlflow_cancel_scope", default=None)


class Admission:
    """The room one request holds in a scheduler while it runs: `slots` of its sequences queue or run at a time;
    each next one waits for one of them to end."""

    def __init__(self, scheduler: BatchScheduler, slots: int):
        self.scheduler = scheduler
        self.slots = slots
        self._free = threading.Semaphore(slots)

    def enter(self, count: int) -> None:
        if count > self.slots:  # it would wait for itself forever
            raise ValueError(f"{count} sequences queued together exceed the {self.slots} this request holds")
        for _ in range(count):
            self._free.acquire()

    def leave(self) -> None:
        self._free.release()


_admission: ContextVar[Admission | None] = ContextVar("hf2mlflow_admission", default=None)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 8
    max_queue: int = 32
    max_request_sequences: int = 256


class BatchScheduler:
    def __init__(self, decoder: Decoder, limits: BatchLimits, context_length: int, eos_ids: set[int],
                 name: str = "batching"):
        self.decoder = decoder
        self.limits = limits
        self.context_length = context_length
        self.eos_ids = set(eos_ids)
        self.name = name
        self._waiting: deque[Sequence] = deque()
        self._own: set[Sequence] = set()  # queued or running sequences outside any admission
        self._held = 0  # room the open admissions hold
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
        in the same step. Their tokens, one iterator each, as `generate` gives them. Inside `admit`, they wait
        for room in the request's own instead."""
        sequences = []
        for prompt_ids, max_new_tokens, choose in requests:
            if len(prompt_ids) + max_new_tokens > self.context_length:
                raise ValueError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new ones exceed the context "
                                 f"length {self.context_length}")
            sequences.append(Sequence(list(prompt_ids), max_new_tokens, choose))
        admission = _admission.get()
        if admission is not None and admission.scheduler is self:
            admission.enter(len(sequences))
            for sequence in sequences:
                sequence.admission = admission
        with self._ready:
            if admission is None or admission.scheduler is not self:
                self._check_room(len(sequences))
                self._own.update(sequences)
            self._waiting.extend(sequences)
            self._ready.notify()
        scope = _scope.get()
        for sequence in sequences if scope else ():
            scope.add(sequence)
        return [TokenStream(sequence) for sequence in sequences]

    def _check_room(self, count: int) -> None:
        """QueueFull unless `count` more sequences fit beside those queued or running and the room admissions
        hold. Called holding self._ready."""
        # Cancelled sequences still queued take no room: the worker drops them at its next step.
        own = sum(not s.cancelled for s in self._own)
        if own + self._held + count > self.limits.max_batch + self.limits.max_queue:
            raise QueueFull(f"{own} sequences are generating or waiting and requests hold room for {self._held} "
                            f"more (max_batch {self.limits.max_batch}, max_queue {self.limits.max_queue})")

    @contextmanager
    def admit(self, sequences: int):
        """Hold room for one request's `sequences` (its rows x n) while it runs: up to max_batch of them queue at
        a time, and each next one waits for one of its own to end, so a request never fails on a queue it fills
        itself. QueueFull, at once, when other work leaves no room for it. Inside another admission to this
        scheduler (batch inference admits its partition, then each row's request), it joins that one."""
        if (outer := _admission.get()) is not None and outer.scheduler is self:
            yield outer
            return
        slots = max(1, min(sequences, self.limits.max_batch))
        with self._ready:
            self._check_room(slots)
            self._held += slots
        token = _admission.set(admission := Admission(self, slots))
        try:
            yield admission
        finally:
            _admission.reset(token)
            with self._ready:
                self._held -= slots

    def _end(self, sequence: Sequence, item) -> None:
        """Hand `sequence` its last item (_DONE, or its error) and give back the room it took."""
        if sequence.ended:
            return
        sequence.ended = True
        sequence.out.put(item)
        if sequence.admission is not None:
            sequence.admission.leave()
        else:
            with self._ready:
                self._own.discard(sequence)

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
            self._end(sequence, sequence.error)
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
                self._end(sequence, sequence.error or _DONE)

    def _work(self) -> None:
        running: list[Sequence] = []
        together, since = 0, time.perf_counter()  # how many decoded together, since when (for the log)
        while True:
            with self._ready:
                dropped = [s for s in self._waiting if s.cancelled]
                for sequence in dropped:
                    self._waiting.remove(sequence)
                while not self._waiting and not running and not dropped:
                    self._ready.wait()
                joining = []
                while self._waiting and len(running) + len(joining) < self.limits.max_batch:
                    joining.append(self._waiting.popleft())
            for sequence in dropped:
                self._end(sequence, _DONE)
            try:
                for sequence in joining:
                    if sequence.cancelled:
                        self._end(sequence, _DONE)
                    else:
                        self._start(sequence, running)
                self._retire(running)
                if running:
                    self._step(running)
                    self._retire(running)
            except BaseException as exc:  # the callers raise it; the scheduler goes on
                for sequence in running + joining:
                    self._end(sequence, exc)
                running = []
            if len(running) != together:
                if together > 1:
                    print(f"[{self.name}] {together} sequences in one batch, {time.perf_counter() - since:.2f} s",
                          file=sys.stderr, flush=True)
                together, since = len(running), time.perf_counter()
            if not running:
                self.decoder.release()


def concurrently(function: Callable, items: list, max_workers: int) -> list:
    """[function(item) for item in items], run in up to `max_workers` threads (each in a copy of the caller's
    context: its admission and cancel scope) so that their generations can share batches. The first exception is
    raised, and once one item fails the sequences the others queued are cancelled: their answers would be thrown
    away."""
    scope = CancelScope()

    def run(item):
        with scope:
            try:
                return function(item)
            except BaseException:
                scope.cancel()
                raise

    if len(items) <= 1 or max_workers <= 1:
        return [run(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items), max_workers), thread_name_prefix="row") as pool:
        futures = [pool.submit(copy_context().run, run, item) for item in items]
        return [future.result() for future in futures]
