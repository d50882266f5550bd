"""Ctrl-C during a long prompt evaluation or a generation stops within one batch, and the Llama
object stays consistent: its next answer equals a fresh object's.

The interrupt comes from another thread while the main thread is busy in the engine, in the two
ways a KeyboardInterrupt reaches Python code: a real SIGINT (Python's default handler raises it
in the main thread once the native call in flight returns) and an asynchronous exception set on
the main thread (PyThreadState_SetAsyncExc, as debuggers and some servers do). Neither waits for
a convenient moment, so they land anywhere in the Python code between two native calls.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_api_inputs import FIRST_TEXT_ID, N_VOCAB, write_tiny_llama
from test_model import SAME_ENGINE_RTOL

from alpaca_cpu.llama import Llama

N_CTX = 2048
N_BATCH = 16
PROMPT_LEN = 1200  # 75 batches: long enough to be interrupted at the third
# The native call in flight when the interrupt comes may finish; no other may start. (One can
# still slip through: the check between "the interrupt is pending" and "the next native call
# starts" is not atomic in Python.)
MAX_BATCHES_AFTER_INTERRUPT = 1
# SAME_ENGINE_RTOL (from test_model: same engine, same tokens, different batch boundaries, so
# only float summation order changes) is applied here as test_model's max_rel does: as an
# absolute tolerance of SAME_ENGINE_RTOL times the largest |logit| of the expected logits.
HANG_GUARD_S = 120.0  # only so that a broken build fails instead of hanging the suite
ANSWER_TOKENS = 8


def interrupt_main_thread(how: str, main: int) -> None:
    if how == "sigint":
        signal.pthread_kill(main, signal.SIGINT)
    else:
        n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main),
                                                       ctypes.py_object(KeyboardInterrupt))
        assert n == 1


class Interrupter:
    """Wraps a Llama's Model.forward; when the `at`-th call selected by `which` starts, a helper
    thread interrupts the main thread. Counts the calls that start after the interrupt was sent.
    Call number `at + slack` waits for the interrupt, so that it always lands inside the
    operation under test, however late the helper thread runs."""

    def __init__(self, llm: Llama, how: str, at: int, slack: int,
                 which: Callable[[Sequence[int]], bool]) -> None:
        self._real = llm.model.forward
        self._how, self._at, self._slack, self._which = how, at, slack, which
        self._main = threading.get_ident()
        self._reached, self._sent = threading.Event(), threading.Event()
        self.calls = 0
        self.started_after_interrupt = 0
        self.helper = threading.Thread(target=self._interrupt, daemon=True)

    def forward(self, tokens: Sequence[int], start_pos: int = 0,
                all_logits: bool = False) -> np.ndarray:
        if self._which(tokens):
            self.calls += 1
            self.started_after_interrupt += self._sent.is_set()
            if self.calls == self._at:
                self._reached.set()
            elif self.calls == self._at + self._slack:
                assert self._sent.wait(HANG_GUARD_S)  # the KeyboardInterrupt comes out of here
        return self._real(tokens, start_pos=start_pos, all_logits=all_logits)

    def _interrupt(self) -> None:
        if self._reached.wait(HANG_GUARD_S):
            interrupt_main_thread(self._how, self._main)
            self._sent.set()


@contextmanager
def interrupted(llm: Llama, how: str, at: int, slack: int,
                which: Callable[[Sequence[int]], bool] = lambda tokens: True,
                ) -> Iterator[Interrupter]:
    """Run the block under an Interrupter; it must end in KeyboardInterrupt."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    it = Interrupter(llm, how, at, slack, which)
    llm.model.forward = it.forward  # type: ignore[method-assign]
    it.helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            yield it
    finally:
        it.helper.join(HANG_GUARD_S)
        del llm.model.forward
    assert not it.helper.is_alive()
    assert it.started_after_interrupt <= MAX_BATCHES_AFTER_INTERRUPT


def answer(llm: Llama, prompt: list[int]) -> str:
    out = llm(prompt, max_tokens=ANSWER_TOKENS, temperature=0, logit_bias={2: -np.inf})
    return out["choices"][0]["text"]


def run_elsewhere(fn: Callable[[], Any]) -> Any:
    """fn() in another thread: proves no lock or turn was left behind by the interrupted call."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(HANG_GUARD_S)
    assert not worker.is_alive(), "the model is still held by the interrupted call"
    return result[0]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=3)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    rng = np.random.default_rng(11)
    return [1] + rng.integers(FIRST_TEXT_ID, N_VOCAB, PROMPT_LEN - 1).tolist()


@pytest.fixture(scope="module")
def fresh(tiny_path: Path, prompt: list[int]) -> dict[str, Any]:
    """What a fresh object computes: logits after the prompt, a short and a long answer."""
    llm = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH)
    logits = llm.eval(prompt).copy()
    long = llm(prompt, max_tokens=200, temperature=0, logit_bias={2: -np.inf})
    return {"logits": logits, "answer": answer(Llama(tiny_path, n_ctx=N_CTX), prompt),
            "long": long["choices"][0]["text"]}


def assert_consistent(llm: Llama, tiny_path: Path, logits_kept: bool) -> None:
    """The cache bookkeeping tells the truth (the invariants in Llama.__init__): the cache holds
    the K/V of _tokens, and _logits, if kept, are what a fresh object computes after _tokens.

    logits_kept: whether _logits must be there. Llama._sync sets _logits to None before it
    extends _tokens and sets the new logits after, so an interrupt that lands in between
    (inside an evaluation) may leave None; one that comes while a stream is suspended at a
    yield finds every evaluation finished, and the logits after the last token kept.
    """
    assert llm._tokens, "nothing evaluated is kept"
    if logits_kept:
        assert llm._logits is not None, "the logits after the last token were dropped"
    if llm._logits is not None:
        expected = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH).eval(llm._tokens)
        np.testing.assert_allclose(llm._logits, expected,
                                   atol=SAME_ENGINE_RTOL * np.abs(expected).max())
    # The K/V of every kept token, whether or not _logits were kept: a copy of the cache,
    # given one more token, computes only that token and gets a fresh object's logits.
    probe = [*llm._tokens, FIRST_TEXT_ID]
    copy = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH)
    copy.load_state(llm.save_state())
    got = copy.eval(probe)
    assert copy.last_eval.n_reused == len(llm._tokens)
    expected = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH).eval(probe)
    np.testing.assert_allclose(got, expected, atol=SAME_ENGINE_RTOL * np.abs(expected).max())


@pytest.mark.parametrize("how", ["sigint", "async"])
def test_interrupted_prompt_evaluation(how: str, tiny_path: Path, prompt: list[int],
                                       fresh: dict[str, Any]) -> None:
    llm = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH)
    llm("something else first", max_tokens=3)  # the cache holds another context
    with interrupted(llm, how, at=3, slack=5):
        llm.eval(prompt)
    kept = len(llm._tokens)
    assert llm._tokens == prompt[:kept] and kept < len(prompt)  # stopped part-way, in order
    assert_consistent(llm, tiny_path, logits_kept=False)  # it may land inside an evaluation

    logits = run_elsewhere(lambda: llm.eval(prompt))
    assert llm.last_eval.n_reused == kept  # what was evaluated before the interrupt is reused
    np.testing.assert_allclose(logits, fresh["logits"],
                               atol=SAME_ENGINE_RTOL * np.abs(fresh["logits"]).max())
    assert answer(llm, prompt) == fresh["answer"]


@pytest.mark.parametrize("how", ["sigint", "async"])
def test_interrupted_generation(how: str, tiny_path: Path, prompt: list[int],
                                fresh: dict[str, Any]) -> None:
    llm = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH)
    received = []
    with interrupted(llm, how, at=5, slack=10, which=lambda tokens: len(tokens) == 1):
        for chunk in llm(prompt, max_tokens=200, temperature=0, logit_bias={2: -np.inf},
                         stream=True):
            received.append(chunk["choices"][0]["text"])
    assert "".join(received)  # text came before the interrupt (else the next line is vacuous)
    assert fresh["long"].startswith("".join(received))  # what came before the interrupt is right
    assert len(llm._tokens) < len(prompt) + 200
    assert_consistent(llm, tiny_path, logits_kept=False)  # it may land inside an evaluation
    assert run_elsewhere(lambda: answer(llm, prompt)) == fresh["answer"]


def test_interrupted_chat_stream_is_closed_like_the_chat_cli_does(
        tiny_path: Path, prompt: list[int], fresh: dict[str, Any]) -> None:
    """Ctrl-C in the consumer's code, while the stream is suspended: alpaca-chat catches it
    and closes the stream; the model must then be free for the next turn."""
    llm = Llama(tiny_path, n_ctx=N_CTX, n_batch=N_BATCH, chat_format="chatml")
    stream = llm.create_chat_completion([{"role": "user", "content": "tell me a story"}],
                                        max_tokens=50, stream=True)
    try:
        for n, _ in enumerate(stream):
            if n == 3:
                interrupt_main_thread("sigint", threading.get_ident())
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    assert n == 3
    assert_consistent(llm, tiny_path, logits_kept=True)  # it came while the stream was suspended
    assert run_elsewhere(lambda: answer(llm, prompt)) == fresh["answer"]


@pytest.mark.real_model
def test_interrupted_prompt_evaluation_real_model(smollm2_path: Path) -> None:
    text = "Tell me about llamas. " * 12
    llm = Llama(smollm2_path, n_ctx=256, n_batch=4)
    ids = llm.tokenize(text.encode())
    with interrupted(llm, "sigint", at=3, slack=10):
        llm(text, max_tokens=4, temperature=0)
    assert llm._tokens == ids[: len(llm._tokens)] and len(llm._tokens) < len(ids)
    expected = Llama(smollm2_path, n_ctx=256)(text, max_tokens=4, temperature=0)
    assert llm(text, max_tokens=4, temperature=0)["choices"][0]["text"] \
        == expected["choices"][0]["text"]
