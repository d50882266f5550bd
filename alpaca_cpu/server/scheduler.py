"""Continuous batching: one thread owns the model and its sequence slots.

Requests wait in a bounded queue; a free slot takes the next one at the start of a step (the
slot whose cached tokens share the longest prefix with its prompt, so a multi-turn chat
re-evaluates only its new tokens). Every step is one `Model.forward_batch`: the next token of
every decoding slot, then prompt chunks of the slots still prefilling (the shortest first, so a
short request is not stuck behind long ones) up to `n_batch` tokens in all. A request cancelled
by its client (or by a shutdown) leaves at the next step and frees its slot. Each step's results
go back to the request's handler through its `emit` callback, as typed events.

A request may carry a Constraint (structured output): its slot's logits row is masked in place
before sampling, and the sampled token advances it on a worker thread while the next
forward_batch runs (which releases the GIL), or just before it when no core is spare
(structured.spare_core).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..llama import GenerationStep, Llama, StepMaker
from ..sampling import SamplingParams, sample
from ..structured import Constraint, spare_core


class QueueFullError(RuntimeError):
    """More requests are waiting than the queue holds (the server answers 503)."""


class ShuttingDownError(RuntimeError):
    """The scheduler no longer takes requests."""


@dataclass(frozen=True)
class Failed:
    """A request that failed inside the scheduler (the server answers 500 with the message)."""

    message: str


@dataclass(frozen=True)
class Embedded:
    """An embedding request's result: one L2-normalised vector per input, and token count."""

    vectors: list[list[float]]
    n_tokens: int


Event = GenerationStep | Failed | Embedded


@dataclass
class GenerationRequest:
    """A completion to run: prompt ids, sampling, when to stop; events go to `emit`."""

    prompt: list[int]
    params: SamplingParams
    seed: int | None
    max_tokens: int | None
    stops: list[str]
    logprobs: int | None  # top alternatives per token; None: no logprobs
    emit: Callable[[Event], None]
    # the grammar's walk, first mask computed; None: free text. The scheduler's thread (and
    # its mask worker) own it once submitted.
    constraint: Constraint | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class EmbeddingRequest:
    """Token ids of each input to embed; the result goes to `emit` as one Embedded event."""

    inputs: list[list[int]]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


Request = GenerationRequest | EmbeddingRequest


class _Slot:
    """One KV slot: the tokens its cache holds, and the request it serves (if any)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.tokens: list[int] = []  # ids whose K/V the slot holds, position = index
        self.last_used = 0.0
        self.req: GenerationRequest | None = None
        self.context: list[int] = []  # prompt + generated ids (the penalties' history)
        self.steps: StepMaker | None = None
        self.rng: np.random.Generator | None = None
        self.next_token: int | None = None  # sampled, its K/V not yet computed

    @property
    def prefilling(self) -> bool:
        return self.req is not None and self.next_token is None

    def remaining_prompt(self) -> int:
        assert self.req is not None
        return len(self.req.prompt) - len(self.tokens)


@dataclass
class Stats:
    """Counters for /metrics (read by other threads: plain ints and floats)."""

    prompt_tokens: int = 0  # prompt tokens of finished or running requests
    evaluated_tokens: int = 0  # prompt tokens computed (not reused from a slot's cache)
    generated_tokens: int = 0
    steps: int = 0
    cancelled: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))

    def decode_rate(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last window_s seconds."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window_s]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


def _emit_each(events: list[tuple[Callable[[Event], None], Event]]) -> None:
    for emit, event in events:
        emit(event)


class Scheduler:
    """Owns `llama`'s model (its n_seq_max slots); run() is the loop of the owning thread."""

    def __init__(self, llama: Llama, max_queue: int = 64, n_batch: int = 256) -> None:
        self.llama = llama
        self.model = llama.model
        self.n_ctx = llama.n_ctx()
        self.max_queue = max_queue
        self.n_batch = n_batch
        self.slots = [_Slot(i) for i in range(self.model.n_slots)]
        self.stats = Stats()
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seed_rng = np.random.default_rng()
        # advances constrained slots' masks while forward_batch runs, where a core is spare
        # for it (one thread: it only has to finish before the forward pass does)
        self.mask_beside = spare_core(self.model.n_threads)
        # hands a step's events to their requests' emit callbacks, in order; a server may
        # replace it to deliver them together (alpaca_cpu.server.app: one wake-up per step)
        self.deliver: Callable[[list[tuple[Callable[[Event], None], Event]]], None] = _emit_each
        self._masks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alpaca-mask")

    # ---- the handlers' side (any thread) ------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="alpaca-scheduler", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request; QueueFullError when max_queue requests already wait."""
        with self._cv:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting")
            self._queue.append(req)
            self._cv.notify()

    def wake(self) -> None:
        """Make the loop look at the requests again (a cancel while it waits)."""
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Take no more requests, cancel the ones queued or running, and end the loop."""
        with self._cv:
            self._stopping = True
            for req in self._queue:
                req.cancelled.set()
            for slot in self.slots:
                if slot.req is not None:
                    slot.req.cancelled.set()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._masks.shutdown(wait=False)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy_slots(self) -> int:
        return sum(slot.req is not None for slot in self.slots)

    # ---- the loop (the scheduler's thread) ----------------------------------------------

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self.busy_slots:
                    self._cv.wait()
                if self._stopping and not self._queue and not self.busy_slots:
                    return
                admitted = self._admit()
            for req in admitted:
                self._embed(req)
            try:
                self._step()
            except Exception as e:  # noqa: BLE001  (fails the running requests, not the server)
                for slot in self.slots:
                    if slot.req is not None:
                        slot.req.emit(Failed(f"{type(e).__name__}: {e}"))
                        self._free(slot)
                    slot.tokens = []  # what the step had written is unknown
                    self.model.rewind_slot(slot.index, 0)

    def _admit(self) -> list[EmbeddingRequest]:
        """Drop cancelled requests; give free slots to queued ones (under the lock). Returns
        the embedding requests to run now."""
        for slot in self.slots:
            if slot.req is not None and slot.req.cancelled.is_set():
                self.stats.cancelled += 1
                self._free(slot)
        embeds = []
        while self._queue:
            req = self._queue[0]
            if req.cancelled.is_set():
                self._queue.popleft()
                self.stats.cancelled += 1
                continue
            if isinstance(req, EmbeddingRequest):
                embeds.append(self._queue.popleft())
                continue
            free = [s for s in self.slots if s.req is None]
            if not free:
                break
            self._queue.popleft()
            self._assign(req, max(free, key=lambda s: (_common_prefix(s.tokens, req.prompt),
                                                      -s.last_used)))
        return embeds

    def _assign(self, req: GenerationRequest, slot: _Slot) -> None:
        # Reuse the cached prefix; the last prompt token is always run (its logits are needed).
        keep = min(_common_prefix(slot.tokens, req.prompt), len(req.prompt) - 1)
        self.model.rewind_slot(slot.index, keep)
        del slot.tokens[keep:]
        slot.req = req
        slot.context = list(req.prompt)
        slot.steps = StepMaker(self.llama, len(req.prompt), req.max_tokens, req.stops,
                               req.logprobs)
        seed = req.seed if req.seed is not None else int(self._seed_rng.integers(1 << 63))
        slot.rng = np.random.default_rng(seed)
        slot.next_token = None
        self.stats.prompt_tokens += len(req.prompt)
        self.stats.evaluated_tokens += len(req.prompt) - keep
        if slot.steps.done:  # max_tokens = 0
            req.emit(slot.steps.last())
            self._free(slot)

    def _free(self, slot: _Slot) -> None:
        slot.req = None
        slot.steps = None
        slot.next_token = None
        slot.last_used = time.perf_counter()

    def _step(self) -> None:
        """One forward_batch: every decoding slot's next token, then prompt chunks."""
        tokens: list[int] = []
        seqs: list[int] = []
        positions: list[int] = []
        want: list[bool] = []
        owners: list[_Slot] = []  # the slot of each wanted row
        advancing: list[tuple[_Slot, Constraint, int]] = []  # and the token each consumes
        prefilling = sorted((s for s in self.slots if s.prefilling), key=_Slot.remaining_prompt)
        for slot in self.slots:
            if slot.req is not None and slot.next_token is not None:
                if slot.req.constraint is not None:
                    advancing.append((slot, slot.req.constraint, slot.next_token))
                tokens.append(slot.next_token)
                seqs.append(slot.index)
                positions.append(len(slot.tokens))
                want.append(True)
                owners.append(slot)
                slot.tokens.append(slot.next_token)
                slot.next_token = None
        budget = self.n_batch - len(tokens)
        for slot in prefilling:
            if budget <= 0:
                break
            assert slot.req is not None
            start = len(slot.tokens)
            chunk = slot.req.prompt[start : start + budget]
            budget -= len(chunk)
            tokens += chunk
            seqs += [slot.index] * len(chunk)
            positions += range(start, start + len(chunk))
            done = start + len(chunk) == len(slot.req.prompt)
            want += [False] * (len(chunk) - 1) + [done]
            if done:
                owners.append(slot)
            slot.tokens += chunk
        if not tokens:
            return
        # The masks of the next rows are computed beside the forward pass where a core is
        # spare (else before it: see structured.spare_core); both are done before any row is
        # sampled (a failed forward still waits for the worker).
        pairs = [(c, tok) for _, c, tok in advancing]
        beside = bool(pairs) and self.mask_beside
        pending = self._masks.submit(_advance_all, pairs) if beside else None
        errors = [] if beside else _advance_all(pairs)
        try:
            logits = self.model.forward_batch(tokens, seqs, positions, want=np.array(want))
        finally:
            if pending is not None:
                errors = pending.result()
        failures = {slot.index: f"{type(e).__name__}: {e}"
                    for (slot, _, _), e in zip(advancing, errors) if e is not None}
        self.stats.steps += 1
        n_generated = 0
        out: list[tuple[Callable[[Event], None], Event]] = []  # this step's events, in order
        for row, slot in zip(logits, owners):
            req, steps = slot.req, slot.steps
            assert req is not None and steps is not None and slot.rng is not None
            if slot.index in failures:  # this request's grammar failed; the others go on
                out.append((req.emit, Failed(failures[slot.index])))
                self._free(slot)
                continue
            if req.constraint is not None:
                req.constraint.apply(row)  # in place: this row belongs to this slot alone
            tok = sample(row, req.params, slot.rng, slot.context)
            step = steps.push(tok, row)
            if step is not None:
                n_generated += 1
                out.append((req.emit, step))
            if steps.done:
                out.append((req.emit, steps.last()))
                self._free(slot)
            else:
                slot.next_token = tok
                slot.context.append(tok)
        self.deliver(out)
        self.stats.generated_tokens += n_generated
        self.stats.recent.append((time.perf_counter(), n_generated))

    def _embed(self, req: EmbeddingRequest) -> None:
        """Run an embedding request now, in the least recently used free slot (or the least
        recently used one; its prefix cache is lost, not its request)."""
        if req.cancelled.is_set():
            return
        free = [s for s in self.slots if s.req is None] or []
        if not free:  # every slot busy: wait for the next free one
            with self._cv:
                self._queue.appendleft(req)
            return
        slot = min(free, key=lambda s: s.last_used)
        try:
            vectors = []
            for ids in req.inputs:
                self.model.rewind_slot(slot.index, 0)
                slot.tokens = []
                hidden = self.model.forward_batch(ids, [slot.index] * len(ids), range(len(ids)),
                                                  want=np.ones(len(ids), bool), hidden=True)
                vectors.append(Llama.pool_embedding(hidden, normalize=True))
            self.model.rewind_slot(slot.index, 0)
            slot.last_used = time.perf_counter()
            n = sum(map(len, req.inputs))
            self.stats.prompt_tokens += n
            self.stats.evaluated_tokens += n
            req.emit(Embedded(vectors, n))
        except Exception as e:  # noqa: BLE001  (reported to the request, not raised)
            req.emit(Failed(f"{type(e).__name__}: {e}"))

    def snapshot(self) -> dict[str, Any]:
        """The numbers /metrics shows."""
        return {"queue_depth": self.queue_depth, "busy_slots": self.busy_slots,
                "n_slots": len(self.slots), "decode_tokens_per_second": self.stats.decode_rate()}


def _advance_all(pairs: Sequence[tuple[Constraint, int]]) -> list[BaseException | None]:
    """Each constraint consumes its token (the next mask computed); an error is returned in its
    place, so one request's failure does not stop the others' masks."""
    errors: list[BaseException | None] = []
    for constraint, tok in pairs:
        try:
            constraint.advance(tok)
            errors.append(None)
        except Exception as e:  # noqa: BLE001  (reported to that request)
            errors.append(e)
    return errors


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
