"""Threads: two Llama objects used at once answer as each does alone; one object used from two
threads serialises whole generations (no corruption); streams may be resumed from another
thread or interleaved in one; Model.forward is safe from two threads on one model.

Answers are compared exactly with sequential runs: on these F32 models the engine gives
bit-identical logits however a context is split into batches, so any difference is a bug.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_api_inputs import FIRST_TEXT_ID, N_VOCAB, write_tiny_llama

import alpaca_cpu
from alpaca_cpu.llama import Llama

N_CTX = 512
N_TOKENS = 24
HANG_GUARD_S = 120.0  # only so that a deadlock fails instead of hanging the suite
NO_EOS = {2: -np.inf}  # every answer runs to max_tokens, so they are long enough to overlap


def run_threads(*jobs: Callable[[], Any]) -> list[Any]:
    """Run each job in its own thread, all released at once; their results, in order.
    A job's exception is raised here."""
    start = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = jobs[i]()
        except Exception as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads), "deadlock"
    if errors:
        raise errors[0]
    return results


def prompts(n: int, seed: int) -> list[list[int]]:
    """Token-id prompts whose first ids all differ, so no two share a cached prefix (their
    answers then never depend on what ran before)."""
    rng = np.random.default_rng(seed)
    first = rng.choice(np.arange(FIRST_TEXT_ID, N_VOCAB), n, replace=False)
    return [[int(f)] + rng.integers(FIRST_TEXT_ID, N_VOCAB, 20 + 7 * i).tolist()
            for i, f in enumerate(first)]


def answers(llm: Llama, batch: Sequence[list[int]]) -> list[str]:
    """Alternately greedy and seeded sampling, so both paths are compared."""
    out = []
    for i, p in enumerate(batch):
        kwargs = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": i}
        r = llm(p, max_tokens=N_TOKENS, logit_bias=NO_EOS, **kwargs)
        out.append(r["choices"][0]["text"])
    return out


def record_forwards(llm: Llama) -> list[tuple[int, int, int]]:
    """(thread, start_pos, n_tokens) of every forward call the object makes from now on."""
    calls: list[tuple[int, int, int]] = []
    real = llm.model.forward

    def forward(tokens: Sequence[int], start_pos: int = 0, all_logits: bool = False) -> Any:
        calls.append((threading.get_ident(), start_pos, len(tokens)))
        return real(tokens, start_pos=start_pos, all_logits=all_logits)

    llm.model.forward = forward  # type: ignore[method-assign]
    return calls


def generations(calls: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Split forward calls into generations: with prompts that share no prefix, each one
    starts at position 0."""
    runs: list[list[tuple[int, int, int]]] = []
    for call in calls:
        if call[1] == 0:
            runs.append([])
        runs[-1].append(call)
    return runs


def assert_not_interleaved(calls: list[tuple[int, int, int]], n_generations: int) -> None:
    runs = generations(calls)
    assert len(runs) == n_generations
    for run in runs:
        assert len({thread for thread, _, _ in run}) == 1  # one thread from start to end
        for (_, pos, n), (_, next_pos, _) in itertools.pairwise(run):
            assert next_pos == pos + n  # and nothing else touched the cache in between


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=4)


@pytest.fixture(scope="module")
def jobs() -> tuple[list[list[int]], list[list[int]]]:
    return prompts(4, seed=1), prompts(4, seed=2)


@pytest.fixture(scope="module")
def alone(tiny_path: Path, jobs: tuple[list[list[int]], list[list[int]]]) -> list[list[str]]:
    """Each job's answers, run alone on a fresh object."""
    return [answers(Llama(tiny_path, n_ctx=N_CTX), batch) for batch in jobs]


def test_two_objects_in_two_threads(tiny_path: Path, jobs: tuple[list[list[int]], ...],
                                    alone: list[list[str]]) -> None:
    a, b = Llama(tiny_path, n_ctx=N_CTX), Llama(tiny_path, n_ctx=N_CTX)
    assert run_threads(lambda: answers(a, jobs[0]), lambda: answers(b, jobs[1])) == alone


def test_one_object_from_two_threads_is_serialised(
        tiny_path: Path, jobs: tuple[list[list[int]], ...], alone: list[list[str]]) -> None:
    llm = Llama(tiny_path, n_ctx=N_CTX)
    calls = record_forwards(llm)
    assert run_threads(lambda: answers(llm, jobs[0]), lambda: answers(llm, jobs[1])) == alone
    assert len({thread for thread, _, _ in calls}) == 2
    assert_not_interleaved(calls, n_generations=len(jobs[0]) + len(jobs[1]))


def test_a_stream_holds_the_object_until_it_ends(
        tiny_path: Path, jobs: tuple[list[list[int]], ...], alone: list[list[str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's call, made while a stream is half-way, waits for the stream's end."""
    llm = Llama(tiny_path, n_ctx=N_CTX)
    calls = record_forwards(llm)
    half_way = threading.Event()
    # The stream pauses half-way until the other call is under way, so that it cannot end
    # before the other thread even starts (on this tiny model it often would): under way means
    # waiting for the turn (it tries to take the turn's lock once the stream is half-way) or,
    # should nothing make it wait, having made its first forward call (recorded in `calls`
    # first, so the stream's next call lands after it and assert_not_interleaved sees it).
    other_under_way = threading.Event()
    streamer_thread: list[int] = []

    class WatchedLock:
        """The turn's lock, telling when a thread starts to wait for it after half-way."""

        def __init__(self, lock: Any) -> None:
            self._lock = lock

        def acquire(self, blocking: bool = True) -> bool:
            if blocking and half_way.is_set():
                other_under_way.set()
            return self._lock.acquire(blocking)

        def release(self) -> None:
            self._lock.release()

    monkeypatch.setattr(llm._turn, "_lock", WatchedLock(llm._turn._lock))
    recorded_forward = llm.model.forward

    def forward(tokens: Sequence[int], start_pos: int = 0, all_logits: bool = False) -> Any:
        out = recorded_forward(tokens, start_pos=start_pos, all_logits=all_logits)
        if threading.get_ident() not in streamer_thread:
            other_under_way.set()
        return out

    llm.model.forward = forward  # type: ignore[method-assign]

    def streamer() -> str:
        streamer_thread.append(threading.get_ident())
        text = ""
        for i, chunk in enumerate(llm(jobs[0][0], max_tokens=N_TOKENS, temperature=0,
                                      logit_bias=NO_EOS, stream=True)):
            text += chunk["choices"][0]["text"]
            if i == 3:
                half_way.set()
                assert other_under_way.wait(HANG_GUARD_S), "the other call never started"
        return text

    def other() -> list[str]:
        assert half_way.wait(HANG_GUARD_S)
        return answers(llm, jobs[1])

    assert run_threads(streamer, other) == [alone[0][0], alone[1]]
    assert_not_interleaved(calls, n_generations=1 + len(jobs[1]))


def test_stream_resumed_in_another_thread(tiny_path: Path, jobs: tuple[list[list[int]], ...],
                                          alone: list[list[str]]) -> None:
    """A server may take each chunk in whichever worker thread is free."""
    llm = Llama(tiny_path, n_ctx=N_CTX)
    stream = iter(llm(jobs[0][0], max_tokens=N_TOKENS, temperature=0, logit_bias=NO_EOS,
                      stream=True))
    head = run_threads(lambda: [next(stream)["choices"][0]["text"] for _ in range(3)])[0]
    tail = run_threads(lambda: [c["choices"][0]["text"] for c in stream])[0]
    assert "".join(head + tail) == alone[0][0]
    # The stream ended in another thread than it began: the object must be free for anyone.
    assert run_threads(lambda: answers(llm, jobs[1]))[0] == alone[1]


def test_interleaved_streams_in_one_thread(tiny_path: Path,
                                           jobs: tuple[list[list[int]], ...],
                                           alone: list[list[str]]) -> None:
    """Two streams of one object consumed in turn by one thread: neither may wait for the
    other (a deadlock) nor read the other's cache."""
    llm = Llama(tiny_path, n_ctx=N_CTX)
    streams = [iter(llm(batch[0], max_tokens=N_TOKENS, temperature=0, logit_bias=NO_EOS,
                        stream=True)) for batch in jobs]
    texts, done = ["", ""], [False, False]
    while not all(done):
        for i, stream in enumerate(streams):
            chunk = None if done[i] else next(stream, None)
            done[i] = chunk is None
            texts[i] += chunk["choices"][0]["text"] if chunk else ""
    assert texts == [alone[0][0], alone[1][0]]
    assert answers(llm, jobs[1]) == alone[1]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_model_forward_from_many_threads(tiny_path: Path, n_threads: int) -> None:
    """Full evaluations from position 0 on one Model from 4 threads at once: the native mutex
    keeps each whole, so every result equals the sequential one."""
    model = alpaca_cpu.Model(tiny_path, n_ctx=N_CTX, n_threads=n_threads)
    batches = prompts(8, seed=3)
    expected = [model.forward(p, all_logits=True) for p in batches]

    def job(k: int) -> list[tuple[int, bool]]:
        """(batch, equal to the sequential result) for every batch, starting at batch k."""
        return [(i, np.array_equal(model.forward(batches[i], all_logits=True), expected[i]))
                for i in list(range(k, len(batches))) + list(range(k))]

    results = run_threads(*[lambda k=k: job(k) for k in range(4)])
    for k, result in enumerate(results):
        assert sorted(i for i, _ in result) == list(range(len(batches)))
        for i, same in result:
            assert same, f"thread {k}, batch {i}: logits differ from the sequential run"


@pytest.mark.real_model
def test_two_real_models_in_two_threads(smollm2_path: Path) -> None:
    questions = [["The capital of France is", "Llamas live in"],
                 ["My favourite colour is", "Once upon a time"]]

    def ask(llm: Llama, batch: list[str]) -> list[str]:
        return [llm(q, max_tokens=8, temperature=0)["choices"][0]["text"] for q in batch]

    expected = [ask(Llama(smollm2_path, n_ctx=128), batch) for batch in questions]
    a, b = Llama(smollm2_path, n_ctx=128), Llama(smollm2_path, n_ctx=128)
    assert run_threads(lambda: ask(a, questions[0]), lambda: ask(b, questions[1])) == expected
