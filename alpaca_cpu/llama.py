"""`Llama`: a llama-cpp-python-shaped generation API over the native engine.

Same names, arguments and OpenAI-shaped return values as llama-cpp-python's `Llama` for the
parts users rely on: tokenize/detokenize, create_completion (also `__call__`),
create_chat_completion, streaming, stop strings, logprobs, save/load of state.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

from .chat_format import get_chat_formatter
from .llama_compat import split_compat_args
from .model import Model
from .sampling import SamplingParams, sample, token_logprobs
from .stop_strings import StopStringFilter
from .structured import Constraint, Grammar, advance_beside, spare_core
from .tokenizer import StreamingDecoder, Tokenizer, check_unicode
from .tool_calls import ToolPlan, request_constraint

MAX_TOKENS_LIMIT = 1 << 31  # beyond this a max_tokens value is a mistake, not a request


def _check_nul(text: str, what: str) -> None:
    """Refuse NUL characters (C strings end there, so they are usually an injection or a bug).
    Lone surrogates are refused by check_unicode, which Tokenizer.encode runs too."""
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"{what} contains a NUL character at index {nul}")


def _check_seed(seed: object) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral)
                             or seed < 0):
        raise ValueError(f"seed = {seed!r}, expected None or an integer >= 0")


class _Turn:
    """Whose turn it is to generate with a Llama: one generation at a time, the others wait.

    A generation holds the turn from its prompt to its end, across the yields of a stream, so
    this is a plain Lock: any thread may release it, because a stream may be resumed (and
    closed) from another thread than the one that started it. A generation started by the
    thread that last ran the holder goes ahead without the turn instead of waiting for itself
    forever (say, a second stream opened while the first is unfinished): Llama._sync keeps
    both correct, at the cost of re-evaluating their contexts when they alternate. A stream
    left unfinished holds the turn until it is closed or garbage-collected.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.thread: int | None = None  # the thread that last ran the holder

    def acquire(self) -> bool:
        """Take the turn (True), or go ahead without it (False; see above)."""
        me = threading.get_ident()
        if self.thread == me:
            if not self._lock.acquire(blocking=False):
                return False
        else:
            self._lock.acquire()
        self.thread = me
        return True

    def release(self) -> None:
        self.thread = None
        self._lock.release()


@dataclass
class LlamaState:
    """A snapshot of the evaluated context: tokens, their KV cache, the last logits, the RNG."""

    tokens: list[int]
    kv: bytes
    logits: np.ndarray | None
    rng_state: dict[str, Any]
    n_ctx: int


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability, with those of the `top` most likely tokens."""

    token: str  # the token's text
    logprob: float
    top: dict[str, float]  # token text -> log-probability


@dataclass(frozen=True)
class GenerationStep:
    """One step of a completion inside the library; the API shapes steps into OpenAI dicts.

    A step per generated token, then a last step (token None) that carries the finish reason
    and any text held back until the end (an unfinished character, a possible stop string).
    """

    text: str  # the text delta; never part of a stop string, and "" while one may be pending
    token: int | None  # the generated token id; None in the last step
    logprobs: TokenLogprob | None  # when the caller asked for logprobs
    n_completion: int  # tokens generated so far
    finish_reason: str | None = None  # in the last step only: "stop" or "length"


@dataclass(frozen=True)
class Completion:
    """A whole completion, collected from its steps."""

    text: str
    finish_reason: str
    n_prompt: int
    n_completion: int
    logprobs: list[tuple[TokenLogprob, int]]  # with the text offset of each token


def _openai_logprobs(entries: list[tuple[TokenLogprob, int]]) -> dict[str, Any]:
    return {"tokens": [e.token for e, _ in entries],
            "text_offset": [offset for _, offset in entries],
            "token_logprobs": [e.logprob for e, _ in entries],
            "top_logprobs": [e.top for e, _ in entries]}


def _openai_usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.n_prompt, "completion_tokens": done.n_completion,
            "total_tokens": done.n_prompt + done.n_completion}


@dataclass
class EvalStats:
    """What the last prompt evaluation did (reused prefix vs newly computed tokens)."""

    n_reused: int = 0
    n_evaluated: int = 0
    seconds: float = 0.0


class StepMaker:
    """Turns a completion's sampled tokens into GenerationSteps, deciding when it ends: an
    end-of-generation token or a stop string ("stop"), max_tokens or a full context
    ("length"). Used by Llama's generator and by the server's scheduler (push-driven)."""

    def __init__(self, llama: Llama, n_prompt: int, max_tokens: int | None,
                 stop: Sequence[str], logprobs: int | None, context_shift: bool = False) -> None:
        self._llama = llama
        self._decoder = StreamingDecoder(llama.tokenizer_, from_start=False)
        self._stops = StopStringFilter(stop)
        self._logprobs = logprobs
        self._room = None if context_shift else llama.n_ctx() - n_prompt
        self.limit = max_tokens if max_tokens is not None else (1 << 62)
        self.n = 0
        self.finish = "length"
        self.done = self.limit <= 0

    def push(self, tok: int, logits: np.ndarray) -> GenerationStep | None:
        """The step of a sampled token (None for an end-of-generation token, which ends it)."""
        if self._llama.tokenizer_.is_eog(tok):
            self.finish, self.done = "stop", True
            return None
        self.n += 1
        lp = None
        if self._logprobs is not None:
            lp = self._llama._logprob_entry(tok, logits, self._logprobs)
        step = GenerationStep(self._stops.push(self._decoder.feed(tok)), tok, lp, self.n)
        if self._stops.stopped:
            self.finish, self.done = "stop", True
        elif self.n >= self.limit:
            self.done = True
        elif self._room is not None and self.n >= self._room:
            self.done = True  # like llama-cpp-python: prompt + completion never exceed n_ctx
        return step

    def last(self) -> GenerationStep:
        """The last step: the text held back, and the finish reason."""
        stops = self._stops
        tail = "" if stops.stopped else stops.push(self._decoder.flush()) + stops.flush()
        return GenerationStep(tail, None, None, self.n, self.finish)


class Llama:
    """Load a GGUF model and generate text.

    >>> llm = Llama("model.gguf", n_ctx=2048, seed=1)
    >>> llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    """

    def __init__(self, model_path: str | os.PathLike[str], n_ctx: int = 2048,
                 n_threads: int | None = None, seed: int | None = None,
                 chat_format: str | None = None, verbose: bool = False, *,
                 n_batch: int = 512, kv_type: str = "f16", n_seq_max: int = 1,
                 **llama_cpp_args: Any) -> None:
        """llama_cpp_args: llama-cpp-python's other constructor arguments, honoured, ignored
        or refused by name (TypeError) as alpaca_cpu/llama_compat.py lists. n_seq_max: KV
        slots of n_ctx positions each, for batched serving (slot 0 is this object's)."""
        t0 = time.perf_counter()
        kv_type = split_compat_args(llama_cpp_args).get("kv_type", kv_type)
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise ValueError(f"n_batch = {n_batch!r}, expected a positive integer")
        _check_seed(seed)
        self.model_path = str(model_path)
        self.verbose = verbose
        self.n_batch = n_batch
        self._model = Model(model_path, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type,
                            n_slots=n_seq_max)
        self._mask_beside = spare_core(self._model.n_threads)  # structured output's masks
        md = self._model.metadata
        self.tokenizer_ = Tokenizer.from_metadata(md)
        # llama-cpp-python exposes scalar metadata as strings.
        self.metadata: dict[str, str] = {k: str(v) for k, v in md.items()
                                          if not isinstance(v, list)}
        self._chat = get_chat_formatter(chat_format, md)
        self.chat_format = chat_format
        self._rng = np.random.default_rng(seed)
        # What the cache holds. Invariants, kept even when an exception (Ctrl-C) stops an
        # update half-way: _tokens lists ids whose K/V are in the cache (position = index;
        # positions beyond it may hold anything), and _logits is None or the logits after
        # _tokens[-1]. Both change only under _lock.
        self._tokens: list[int] = []
        self._logits: np.ndarray | None = None
        self._lock = threading.RLock()  # held while the cache changes (one step, not a stream)
        self._turn = _Turn()  # one generation at a time (held across a stream's yields)
        self.last_eval = EvalStats()
        self.load_seconds = time.perf_counter() - t0
        if verbose:
            print(f"alpaca_cpu: loaded {self.model_path} in {self.load_seconds:.2f} s "
                  f"({self._model.isa}, {self._model.n_threads} threads, n_ctx {n_ctx})",
                  file=sys.stderr)

    # ---- model facts ---------------------------------------------------------------------

    @property
    def model(self) -> Model:
        return self._model

    def n_ctx(self) -> int:
        return self._model.n_ctx

    def n_vocab(self) -> int:
        return self._model.config.n_vocab

    def token_bos(self) -> int:
        return -1 if self.tokenizer_.bos_id is None else self.tokenizer_.bos_id

    def token_eos(self) -> int:
        return -1 if self.tokenizer_.eos_id is None else self.tokenizer_.eos_id

    # ---- text <-> tokens -----------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of UTF-8 `text`; ValueError names the offset of the first invalid byte.

        NUL bytes are tokenized like any other byte (they are valid UTF-8), so that the ids
        of detokenize()'s output can always be had back.
        """
        if not isinstance(text, (bytes, bytearray)):
            raise ValueError(f"tokenize() takes bytes, got {type(text).__name__}")  # noqa: TRY004
        data = bytes(text)
        try:
            decoded = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the text is not valid UTF-8: byte {data[e.start]:#04x} at offset "
                             f"{e.start} ({e.reason})") from None
        return self.tokenizer_.encode(decoded, add_bos=add_bos and self.tokenizer_.add_bos,
                                      special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        ids = self._check_ids(tokens)
        return self.tokenizer_.decode(ids, special=special) if ids else b""

    def _check_ids(self, tokens: Sequence[int], max_len: int | None = None) -> list[int]:
        """The ids as a list of ints; ValueError for anything else, or for more than max_len."""
        # ValueError, not TypeError, for every bad input at the API (docs/design.md, section 13).
        if isinstance(tokens, (str, bytes, bytearray)) \
                or not isinstance(tokens, (Sequence, np.ndarray)):
            raise ValueError(f"token ids must be a sequence of integers, got "  # noqa: TRY004
                             f"{type(tokens).__name__}")
        n_vocab = self.n_vocab()
        out: list[int] | None = None
        if isinstance(tokens, np.ndarray):
            if tokens.ndim == 1 and tokens.dtype.kind in "iu":
                out = tokens.tolist()
        elif set(map(type, tokens)) <= {int}:  # plain ints, the usual case (a bool is no int)
            out = list(tokens)
        if out is not None and (not out or (0 <= min(out) and max(out) < n_vocab)):
            return self._check_len(out, max_len)
        out = []  # the slow way, which names the first bad item
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, Integral):
                raise ValueError(f"token ids must be integers; item {i} is {t!r}")  # noqa: TRY004
            if not 0 <= t < n_vocab:
                raise ValueError(f"token id {t} at index {i} is outside [0, {n_vocab})")
            out.append(int(t))
        return self._check_len(out, max_len)

    @staticmethod
    def _check_len(ids: list[int], max_len: int | None) -> list[int]:
        if max_len is not None and len(ids) > max_len:
            raise ValueError(f"{len(ids)} tokens do not fit the context of {max_len}")
        return ids

    # ---- evaluation ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the evaluated context (the next prompt is evaluated from scratch)."""
        with self._lock:
            self._logits = None
            self._tokens = []

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `tokens` and return the logits after the last one.

        The longest prefix shared with what was evaluated before is reused; only the rest is
        computed, in batches of n_batch (an interrupt stops between batches and leaves the
        object consistent).
        """
        tokens = self._check_ids(tokens, self.n_ctx())
        if not tokens:
            raise ValueError("cannot evaluate an empty list of tokens")
        with self._lock:
            return self._sync(tokens, record=True)

    def _sync(self, tokens: list[int], record: bool = False) -> np.ndarray:
        """eval() on checked ids, with _lock held; record: set last_eval."""
        t0 = time.perf_counter()
        n_cached = len(self._tokens)
        if tokens[:n_cached] == self._tokens:  # the usual case (next token, next turn): no loop
            reuse = n_cached
        else:
            reuse = next((i for i, (a, b) in enumerate(zip(self._tokens, tokens)) if a != b),
                         min(n_cached, len(tokens)))
        reuse = min(reuse, len(tokens) - 1)  # the last token is always run: we need its logits
        if reuse < n_cached:
            self._logits = None
            del self._tokens[reuse:]
        logits = None
        for start in range(reuse, len(tokens), self.n_batch):
            batch = tokens[start : start + self.n_batch]
            logits = self._model.forward(batch, start_pos=start)
            # In this order, an interrupt between any two lines breaks no invariant.
            self._logits = None
            self._tokens.extend(batch)
            self._logits = logits
        if record:
            self.last_eval = EvalStats(reuse, len(tokens) - reuse, time.perf_counter() - t0)
        assert logits is not None
        return logits

    @staticmethod
    def _shifted(tokens: list[int], n_keep: int) -> list[int]:
        """A full context made room in: keep the first n_keep tokens, drop the oldest half of
        the rest (the tokens after the kept ones move, so the cache recomputes them)."""
        keep = min(max(n_keep, 0), len(tokens) - 2)
        rest = tokens[keep:]
        return tokens[:keep] + rest[len(rest) // 2 :]

    # ---- generation ----------------------------------------------------------------------

    def generate(self, tokens: Sequence[int], *, temp: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, logit_bias: Mapping[int, float] | None = None,
                 seed: int | None = None, context_shift: bool = False,
                 n_keep: int = 0) -> Iterator[int]:
        """Yield sampled token ids after `tokens`, forever or until the context is full.

        With context_shift, a full context keeps its first n_keep tokens, drops the oldest half
        of the rest and goes on. The caller stops the iteration (EOG, stop strings, max_tokens).
        Arguments are checked now, not at the first token.
        """
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        params.validate(self.n_vocab())
        rng = self._rng_for(seed)
        ids = self._check_ids(tokens, self.n_ctx())
        if not ids:
            raise ValueError("cannot generate after an empty list of tokens")
        return self._token_ids(self._generate(ids, params, rng, context_shift, n_keep, None))

    def _rng_for(self, seed: int | None) -> np.random.Generator:
        """The generator a call samples with: its own for a seed, else this object's."""
        _check_seed(seed)
        return np.random.default_rng(seed) if seed is not None else self._rng

    @staticmethod
    def _token_ids(steps: Iterator[tuple[int, np.ndarray]]) -> Iterator[int]:
        try:
            for tok, _ in steps:
                yield tok
        finally:
            steps.close()  # now, not whenever the garbage collector gets to it: frees the turn

    def _generate(self, tokens: list[int], params: SamplingParams, rng: np.random.Generator,
                  context_shift: bool, n_keep: int,
                  constraint: Constraint | None) -> Iterator[tuple[int, np.ndarray]]:
        """Each sampled token with the logits it was sampled from.

        Under a constraint the logits are masked in place before sampling, and the mask of the
        next step is computed while the forward pass runs (docs/design.md, section 15).

        The generation keeps its own context and brings the cache to it before every step, so
        it stays right even if something else used the model while it was suspended at a
        yield (see _Turn); normally only the new token is computed.
        """
        ctx = list(tokens)
        held = False
        try:
            held = self._turn.acquire()
            with self._lock:
                logits = self._sync(ctx, record=True)
            while True:
                if constraint is not None:
                    with self._lock:
                        if self._logits is logits:
                            self._logits = None  # the cache's logits are about to be masked
                    constraint.apply(logits)
                tok = sample(logits, params, rng, ctx)
                yield tok, logits
                if held:
                    self._turn.thread = threading.get_ident()
                if len(ctx) >= self.n_ctx():
                    if not context_shift:
                        return
                    ctx = self._shifted(ctx, n_keep)
                ctx.append(tok)
                if constraint is None:
                    with self._lock:
                        logits = self._sync(ctx)
                else:
                    logits = advance_beside(constraint, tok, self._locked_sync, ctx,
                                            beside=self._mask_beside)
        finally:
            if held:
                self._turn.release()

    def _locked_sync(self, tokens: list[int]) -> np.ndarray:
        with self._lock:
            return self._sync(tokens)

    def _completion_steps(self, prompt_tokens: list[int], max_tokens: int | None,
                          params: SamplingParams, rng: np.random.Generator,
                          stop: Sequence[str], logprobs: int | None, context_shift: bool,
                          n_keep: int, constraint: Constraint | None = None,
                          ) -> Iterator[GenerationStep]:
        """A step per generated token, then a last step with the finish reason and the text
        held back until the end. Text never contains part of a stop string."""
        steps = StepMaker(self, len(prompt_tokens), max_tokens, stop, logprobs, context_shift)
        if not steps.done:
            gen = self._generate(prompt_tokens, params, rng, context_shift, n_keep, constraint)
            try:
                for tok, logits in gen:
                    step = steps.push(tok, logits)
                    if step is not None:
                        yield step
                    if steps.done:
                        break
            finally:
                gen.close()
        yield steps.last()

    def _logprob_entry(self, tok: int, logits: np.ndarray, top: int) -> TokenLogprob:
        lps = token_logprobs(logits)
        best = np.argsort(-lps)[: max(top, 0)]
        piece = self.tokenizer_.token_to_piece
        return TokenLogprob(
            token=piece(tok).decode("utf-8", "replace"),
            logprob=float(lps[tok]),
            top={piece(int(i)).decode("utf-8", "replace"): float(lps[i]) for i in best},
        )

    def _collect(self, steps: Iterator[GenerationStep], n_prompt: int,
                 echo_text: str = "") -> Completion:
        """A whole completion from its steps (echo_text first); prints timings when verbose."""
        t0 = time.perf_counter()
        parts, lps, offset = [echo_text], [], len(echo_text)
        try:
            for step in steps:
                if step.logprobs is not None:
                    lps.append((step.logprobs, offset))
                parts.append(step.text)
                offset += len(step.text)
                if step.finish_reason is not None:
                    self._timing(n_prompt, step.n_completion,
                                 time.perf_counter() - t0 - self.last_eval.seconds)
                    return Completion("".join(parts), step.finish_reason, n_prompt,
                                      step.n_completion, lps)
        finally:
            steps.close()  # also when interrupted: frees the model now
        raise AssertionError("the last step of a completion has a finish reason")

    # ---- completions ---------------------------------------------------------------------

    def _check_common(self, max_tokens: int | None, logprobs: int | None,
                      stop: str | Sequence[str] | None) -> list[str]:
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int)
                                       or not 0 <= max_tokens < MAX_TOKENS_LIMIT):
            raise ValueError(f"max_tokens = {max_tokens!r}, expected None or an integer in "
                             f"[0, {MAX_TOKENS_LIMIT})")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= self.n_vocab()):
            raise ValueError(f"logprobs = {logprobs!r}, expected None or an integer in "
                             f"[0, {self.n_vocab()}]")
        if stop is None:
            stops = []
        elif isinstance(stop, Sequence) and not isinstance(stop, str):
            stops = list(stop)
        else:
            stops = [stop]  # a string, or something else that is refused below
        if not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        return stops

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            _check_nul(prompt, "the prompt")
            tokens = self.tokenizer_.encode(prompt, special=True, what="the prompt")
        elif isinstance(prompt, (bytes, bytearray)):  # a Sequence[int], but surely meant as text
            raise ValueError("the prompt must be a str or a list of token ids, not bytes "  # noqa: TRY004
                             "(decode it first)")
        else:
            tokens = self._check_ids(prompt)
        if not tokens:
            raise ValueError("the prompt is empty (no tokens); pass some text")
        if len(tokens) > self.n_ctx():
            raise ValueError(f"the prompt has {len(tokens)} tokens, more than the context of "
                             f"{self.n_ctx()}; use a larger n_ctx or a shorter prompt")
        return tokens

    def _start(self, prompt: str | Sequence[int], params: SamplingParams, *,
               max_tokens: int | None, stop: str | Sequence[str] | None, seed: int | None,
               logprobs: int | None, context_shift: bool, n_keep: int,
               grammar: Grammar | str | None = None,
               ) -> tuple[list[int], Iterator[GenerationStep]]:
        """Check a completion's arguments now; its prompt tokens and its (lazy) steps."""
        stops = self._check_common(max_tokens, logprobs, stop)
        rng = self._rng_for(seed)
        tokens = self._prompt_tokens(prompt)
        params.validate(self.n_vocab())
        constraint = None
        if grammar is not None:  # checked and its first mask computed now, before any token
            if isinstance(grammar, str):
                grammar = Grammar.from_string(grammar)
            elif not isinstance(grammar, Grammar):
                raise ValueError(f"grammar must be a GBNF string or a Grammar, got "
                                 f"{type(grammar).__name__}")
            constraint = Constraint(grammar, self.tokenizer_)
        return tokens, self._completion_steps(tokens, max_tokens, params, rng, stops, logprobs,
                                              context_shift, n_keep, constraint)

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 256,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
                          min_p: float = 0.05, repeat_penalty: float = 1.0,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          stop: str | Sequence[str] | None = None, seed: int | None = None,
                          stream: bool = False, logprobs: int | None = None, echo: bool = False,
                          logit_bias: Mapping[int, float] | None = None, *,
                          repeat_last_n: int = 64, context_shift: bool = False,
                          n_keep: int = 0, grammar: Grammar | str | None = None,
                          ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete `prompt` (text or token ids); OpenAI `text_completion` shape.

        max_tokens=None generates until an end-of-generation token, a stop string or a full
        context (which, with context_shift=True, is shifted instead). `grammar` (a GBNF string
        or a Grammar) constrains the text; "length" then means it is a valid prefix only.
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        tokens, steps = self._start(prompt, params, max_tokens=max_tokens, stop=stop, seed=seed,
                                    logprobs=logprobs, context_shift=context_shift,
                                    n_keep=n_keep, grammar=grammar)
        echo_text = ""
        if echo:
            echo_text = (prompt if isinstance(prompt, str)
                         else self.detokenize(tokens).decode("utf-8", "replace"))
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_path}
        if stream:
            return self._stream_completion(meta, steps, echo_text, logprobs)
        done = self._collect(steps, len(tokens), echo_text)
        choice = {"text": done.text, "index": 0, "finish_reason": done.finish_reason,
                  "logprobs": _openai_logprobs(done.logprobs) if logprobs is not None else None}
        return {**meta, "choices": [choice], "usage": _openai_usage(done)}

    __call__ = create_completion

    def _timing(self, n_prompt: int, n_completion: int, t_gen: float) -> None:
        if self.verbose:
            e = self.last_eval
            pp = e.n_evaluated / e.seconds if e.seconds > 0 else 0.0
            tg = n_completion / t_gen if t_gen > 0 else 0.0
            print(f"alpaca_cpu: prompt {n_prompt} tokens ({e.n_reused} reused, {e.n_evaluated} "
                  f"evaluated, {pp:.1f} t/s); generated {n_completion} tokens ({tg:.1f} t/s)",
                  file=sys.stderr)

    def _stream_completion(self, meta: dict[str, Any], steps: Iterator[GenerationStep],
                           echo_text: str, logprobs: int | None) -> Iterator[dict[str, Any]]:
        def chunk(text: str, finish: str | None, lp: Any = None) -> dict[str, Any]:
            return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp,
                                         "finish_reason": finish}]}
        offset = 0
        if echo_text:
            offset = len(echo_text)
            yield chunk(echo_text, None)
        try:
            for step in steps:
                if step.text or step.logprobs is not None:
                    lp = (_openai_logprobs([(step.logprobs, offset)])
                          if logprobs is not None and step.logprobs is not None else None)
                    offset += len(step.text)
                    yield chunk(step.text, None, lp)
                if step.finish_reason is not None:
                    yield chunk("", step.finish_reason)
                    return
        finally:
            steps.close()  # a stream dropped half-way frees the model now

    # ---- chat ----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation rendered with this model's chat format (`tools` reach
        a Jinja template that uses them)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(  # noqa: TRY004
                f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(  # noqa: TRY004
                    f"messages[{i}] must be a dict with string 'role' and 'content'")
            for field in ("role", "content"):
                _check_nul(m[field], f"messages[{i}][{field!r}]")
                check_unicode(m[field], f"messages[{i}][{field!r}]")
        if tools is not None:
            text = self._chat.render(messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools)  # type: ignore[call-arg]
        else:
            text = self._chat.render(messages, add_generation_prompt=add_generation_prompt)
        bos = self.tokenizer_.bos_id
        starts_with_bos = bos is not None and text.startswith(self.tokenizer_.tokens[bos])
        return self._check_length(self.tokenizer_.encode(
            text, add_bos=self.tokenizer_.add_bos and not starts_with_bos, special=True))

    def _check_length(self, tokens: list[int]) -> list[int]:
        if len(tokens) > self.n_ctx():
            raise ValueError(f"the conversation has {len(tokens)} tokens, more than the context "
                             f"of {self.n_ctx()}")
        return tokens

    def create_chat_completion(self, messages: Sequence[Mapping[str, str]],
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, stream: bool = False,
                               stop: str | Sequence[str] | None = None, seed: int | None = None,
                               max_tokens: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0,
                               logit_bias: Mapping[int, float] | None = None, *,
                               repeat_last_n: int = 64, context_shift: bool = False,
                               response_format: Mapping[str, Any] | None = None,
                               tools: Sequence[Mapping[str, Any]] | None = None,
                               tool_choice: str | Mapping[str, Any] | None = None,
                               grammar: Grammar | str | None = None,
                               ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation; OpenAI `chat.completion` shape (or chunks when streaming).

        `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"schema": ..., "strict": ...}}) or `grammar` constrains the answer; with `tools`, the
        model's call comes back in `message.tool_calls` (finish_reason "tool_calls").
        """
        template = getattr(self._chat, "template", None)
        constraint, plan = request_constraint(response_format, tools, tool_choice, template)
        if grammar is not None:
            if constraint is not None:
                raise ValueError("grammar cannot be combined with response_format or tools")
            constraint = grammar
        if plan is not None:
            use_tools = plan.syntax.name != "generic" and plan.mode != "none"
            tokens = self.render_chat(plan.prompt_messages(messages),
                                      tools=plan.tools if use_tools else None)
        else:
            tokens = self.render_chat(messages)
        stops = self._check_common(max_tokens, None, stop)
        if constraint is None:  # under a constraint the grammar ends the text (EOG tokens);
            stops += list(self._chat.stop)  # the format's stop text may be JSON content there
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        tokens, steps = self._start(tokens, params, max_tokens=max_tokens, stop=stops, seed=seed,
                                    logprobs=None, context_shift=context_shift, n_keep=0,
                                    grammar=constraint)
        cid = f"chatcmpl-{uuid.uuid4()}"
        if stream:
            return self._stream_chat(cid, steps, plan)
        created = int(time.time())
        done = self._collect(steps, len(tokens))
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        finish = done.finish_reason
        calls = (plan.parse(done.text) if plan is not None and plan.mode != "none"
                 and finish == "stop" else None)
        if calls:
            message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, \
                "tool_calls"
        return {"id": cid, "object": "chat.completion", "created": created,
                "model": self.model_path,
                "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                             "message": message}],
                "usage": _openai_usage(done)}

    def _stream_chat(self, cid: str, steps: Iterator[GenerationStep],
                     plan: ToolPlan | None = None) -> Iterator[dict[str, Any]]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_path,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}
        finish: list[str] = []

        def texts() -> Iterator[str]:
            for step in steps:
                if step.text:
                    yield step.text
                if step.finish_reason is not None:
                    finish.append(step.finish_reason)
                    return

        try:
            yield chunk({"role": "assistant"}, None)
            called = False
            if plan is None or plan.mode == "none":
                pieces: Iterator[tuple[str | None, dict[str, Any] | None]] = (
                    (t, None) for t in texts())
            else:
                pieces = plan.stream(texts())
            for content, call in pieces:
                if call is not None:
                    called = True
                    yield chunk({"tool_calls": [call]}, None)
                elif content:
                    yield chunk({"content": content}, None)
            reason = finish[0] if finish else "stop"
            yield chunk({}, "tool_calls" if called and reason == "stop" else reason)
        finally:
            steps.close()

    # ---- embeddings ----------------------------------------------------------------------

    def embed(self, input: str | Sequence[str], normalize: bool = False,
              truncate: bool = True, return_count: bool = False) -> Any:
        """The mean over its tokens of the model's final (normed) hidden state, per text.

        A vector (list of floats) for a string, a list of them for a list of strings; with
        normalize, each has L2 norm 1; truncate: a text longer than the context keeps its
        first n_ctx tokens (else ValueError); return_count: also the number of tokens.
        Uses the KV cache: the next generation evaluates its prompt from scratch.
        """
        texts = [input] if isinstance(input, str) else input
        if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence) \
                or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("embed() takes a string or a non-empty list of strings")
        vectors, total = [], 0
        for i, text in enumerate(texts):
            tokens = self.embedding_tokens(text, truncate, f"input[{i}]")
            with self._lock:
                self._tokens, self._logits = [], None  # the cache is overwritten below
                vectors.append(self.pool_embedding(self._model.forward_batch(
                    tokens, [0] * len(tokens), range(len(tokens)),
                    want=np.ones(len(tokens), bool), hidden=True), normalize))
            total += len(tokens)
        out: Any = vectors[0] if isinstance(input, str) else vectors
        return (out, total) if return_count else out

    def embedding_tokens(self, text: str, truncate: bool, what: str) -> list[int]:
        """The tokens embed() runs for a text (BOS first, like the prompt of a completion)."""
        _check_nul(text, what)
        tokens = self.tokenizer_.encode(text, add_bos=self.tokenizer_.add_bos, what=what)
        if not tokens:
            raise ValueError(f"{what} is empty (no tokens)")
        if len(tokens) > self.n_ctx():
            if not truncate:
                raise ValueError(f"{what} has {len(tokens)} tokens, more than the context of "
                                 f"{self.n_ctx()}")
            tokens = tokens[: self.n_ctx()]
        return tokens

    @staticmethod
    def pool_embedding(hidden: np.ndarray, normalize: bool) -> list[float]:
        """Mean of (n_tokens, dim) hidden states; L2-normalised when asked."""
        v = hidden.astype(np.float64).mean(axis=0)
        if normalize:
            v /= max(float(np.linalg.norm(v)), 1e-12)
        return v.tolist()

    def create_embedding(self, input: str | Sequence[str],
                         model: str | None = None) -> dict[str, Any]:
        """OpenAI `embedding` list shape; vectors mean-pooled and L2-normalised (llama-cpp-
        python leaves them unnormalised here; OpenAI's are normalised)."""
        vectors, total = self.embed([input] if isinstance(input, str) else input,
                                    normalize=True, return_count=True)
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": v, "index": i}
                         for i, v in enumerate(vectors)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # ---- state ---------------------------------------------------------------------------

    def save_state(self) -> LlamaState:
        with self._lock:
            return LlamaState(tokens=list(self._tokens), kv=self._model.save_kv(len(self._tokens)),
                              logits=None if self._logits is None else self._logits.copy(),
                              rng_state=self._rng.bit_generator.state, n_ctx=self.n_ctx())

    def load_state(self, state: LlamaState) -> None:
        if state.n_ctx > self.n_ctx() or len(state.tokens) > self.n_ctx():
            raise ValueError(f"the state holds {len(state.tokens)} tokens of a context of "
                             f"{state.n_ctx}, more than this model's {self.n_ctx()}")
        tokens = self._check_ids(state.tokens)
        logits = None
        if state.logits is not None:
            logits = np.array(state.logits, dtype=np.float32)
            if logits.shape != (self.n_vocab(),):
                raise ValueError(f"the state's logits have shape {logits.shape}, expected "
                                 f"({self.n_vocab()},)")
        rng = type(self._rng.bit_generator)()  # check the RNG state on a scratch generator
        try:
            rng.state = state.rng_state
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise ValueError(f"the state's rng_state is not a {type(rng).__name__} state: "
                             f"{e}") from None
        with self._lock:
            before = self._tokens, self._logits
            # The cache is unknown while it is overwritten (see the invariants in __init__).
            self._logits = None
            self._tokens = []
            try:
                self._model.load_kv(state.kv, len(tokens))
            except ValueError:  # refused before anything was written: the cache is unchanged
                self._tokens, self._logits = before
                raise
            self._tokens = tokens
            self._logits = logits
            self._rng.bit_generator.state = rng.state
