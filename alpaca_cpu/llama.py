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
from typing import Any

import numpy as np

from .chat_format import get_chat_formatter
from .model import Model
from .sampling import SamplingParams, sample, token_logprobs
from .stop_strings import StopStringFilter
from .tokenizer import StreamingDecoder, Tokenizer

MAX_TOKENS_LIMIT = 1 << 31  # beyond this a max_tokens value is a mistake, not a request


@dataclass
class LlamaState:
    """A snapshot of the evaluated context: tokens, their KV cache, the last logits, the RNG."""

    tokens: list[int]
    kv: bytes
    logits: np.ndarray | None
    rng_state: dict[str, Any]
    n_ctx: int


@dataclass
class EvalStats:
    """What the last prompt evaluation did (reused prefix vs newly computed tokens)."""

    n_reused: int = 0
    n_evaluated: int = 0
    seconds: float = 0.0


class Llama:
    """Load a GGUF model and generate text.

    >>> llm = Llama("model.gguf", n_ctx=2048, seed=1)
    >>> llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    """

    def __init__(self, model_path: str | os.PathLike[str], n_ctx: int = 2048,
                 n_threads: int | None = None, seed: int | None = None,
                 chat_format: str | None = None, verbose: bool = False, *,
                 n_batch: int = 512, kv_type: str = "f16") -> None:
        t0 = time.perf_counter()
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise ValueError(f"n_batch = {n_batch!r}, expected a positive integer")
        self.model_path = str(model_path)
        self.verbose = verbose
        self.n_batch = n_batch
        self._model = Model(model_path, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type)
        md = self._model.metadata
        self.tokenizer_ = Tokenizer.from_metadata(md)
        # llama-cpp-python exposes scalar metadata as strings.
        self.metadata: dict[str, str] = {k: str(v) for k, v in md.items()
                                          if not isinstance(v, list)}
        self._chat = get_chat_formatter(chat_format, md)
        self.chat_format = chat_format
        self._rng = np.random.default_rng(seed)
        self._tokens: list[int] = []  # ids whose K/V are in the cache, position = index
        self._logits: np.ndarray | None = None  # logits after the last evaluated token
        self._lock = threading.RLock()  # one generation at a time per object
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
        if not isinstance(text, (bytes, bytearray)):
            raise ValueError(f"tokenize() takes bytes, got {type(text).__name__}")
        return self.tokenizer_.encode(bytes(text), add_bos=add_bos and self.tokenizer_.add_bos,
                                      special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return self.tokenizer_.decode(tokens, special=special) if tokens else b""

    # ---- evaluation ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the evaluated context (the next prompt is evaluated from scratch)."""
        with self._lock:
            self._tokens, self._logits = [], None

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `tokens` and return the logits after the last one.

        The longest prefix shared with what was evaluated before is reused; only the rest is
        computed, in batches of n_batch (an interrupt stops between batches and leaves the
        object consistent).
        """
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("cannot evaluate an empty list of tokens")
        if len(tokens) > self.n_ctx():
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx()}")
        with self._lock:
            t0 = time.perf_counter()
            reuse = 0
            for a, b in zip(self._tokens, tokens):
                if a != b:
                    break
                reuse += 1
            if reuse == len(tokens):  # nothing new, but the logits must be recomputed
                reuse -= 1
            if reuse < len(self._tokens):
                self._tokens = self._tokens[:reuse]
                self._logits = None
            for start in range(reuse, len(tokens), self.n_batch):
                batch = tokens[start : start + self.n_batch]
                self._logits = self._model.forward(batch, start_pos=start)
                self._tokens.extend(batch)
            self.last_eval = EvalStats(reuse, len(tokens) - reuse, time.perf_counter() - t0)
            assert self._logits is not None
            return self._logits

    def _shift_context(self, n_keep: int) -> None:
        """Keep the first n_keep tokens, drop the oldest half of the rest, re-evaluate."""
        keep = min(max(n_keep, 0), len(self._tokens) - 2)
        rest = self._tokens[keep:]
        kept = self._tokens[:keep] + rest[len(rest) // 2 :]
        self._tokens = self._tokens[:keep]  # positions after `keep` move, so they are recomputed
        self.eval(kept)

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
        """
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=logit_bias)
        params.validate(self.n_vocab())
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        with self._lock:
            logits = self.eval(tokens)
            while True:
                tok = sample(logits, params, rng, self._tokens)
                self._last_sampled_logits = logits
                yield tok
                if len(self._tokens) >= self.n_ctx():
                    if not context_shift:
                        return
                    self._shift_context(n_keep)
                logits = self._model.forward([tok], start_pos=len(self._tokens))
                self._tokens.append(tok)
                self._logits = logits

    def _completion_events(self, prompt_tokens: list[int], max_tokens: int | None,
                           params: dict[str, Any], stop: Sequence[str], logprobs: int | None,
                           context_shift: bool, n_keep: int) -> Iterator[dict[str, Any]]:
        """Text deltas of a completion: {'text', 'tokens', 'logprobs'} and a final
        {'finish_reason', 'n_completion'}. Text never contains part of a stop string."""
        decoder = StreamingDecoder(self.tokenizer_, from_start=False)
        stops = StopStringFilter(stop)
        n = 0
        finish = "length"
        limit = max_tokens if max_tokens is not None else (1 << 62)
        if limit > 0:
            gen = self.generate(prompt_tokens, context_shift=context_shift, n_keep=n_keep,
                                **params)
            try:
                for tok in gen:
                    if self.tokenizer_.is_eog(tok):
                        finish = "stop"
                        break
                    n += 1
                    lp = None
                    if logprobs is not None:
                        lp = self._logprob_entry(tok, self._last_sampled_logits, logprobs)
                    text = stops.push(decoder.feed(tok))
                    if text or lp is not None:
                        yield {"text": text, "token": tok, "logprobs": lp}
                    if stops.stopped:
                        finish = "stop"
                        break
                    if n >= limit:
                        break
                    if not context_shift and len(prompt_tokens) + n >= self.n_ctx():
                        break  # like llama-cpp-python: prompt + completion never exceed n_ctx
            finally:
                gen.close()
        if not stops.stopped:
            tail = stops.push(decoder.flush()) + stops.flush()
            if tail:
                yield {"text": tail, "token": None, "logprobs": None}
        yield {"finish_reason": finish, "n_completion": n}

    def _logprob_entry(self, tok: int, logits: np.ndarray, top: int) -> dict[str, Any]:
        lps = token_logprobs(logits)
        best = np.argsort(-lps)[: max(top, 0)]
        piece = self.tokenizer_.token_to_piece
        return {
            "token": piece(tok).decode("utf-8", "replace"),
            "logprob": float(lps[tok]),
            "top": {piece(int(i)).decode("utf-8", "replace"): float(lps[i]) for i in best},
        }

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
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        return stops

    def _prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if "\x00" in prompt:
                raise ValueError("the prompt contains a NUL character")
            tokens = self.tokenizer_.encode(prompt, special=True)
        else:
            tokens = [int(t) for t in prompt]
            bad = [t for t in tokens if not 0 <= t < self.n_vocab()]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside [0, {self.n_vocab()})")
        if not tokens:
            raise ValueError("the prompt is empty (no tokens); pass some text")
        if len(tokens) > self.n_ctx():
            raise ValueError(f"the prompt has {len(tokens)} tokens, more than the context of "
                             f"{self.n_ctx()}; use a larger n_ctx or a shorter prompt")
        return tokens

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 256,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40,
                          min_p: float = 0.05, repeat_penalty: float = 1.0,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          stop: str | Sequence[str] | None = None, seed: int | None = None,
                          stream: bool = False, logprobs: int | None = None, echo: bool = False,
                          logit_bias: Mapping[int, float] | None = None, *,
                          repeat_last_n: int = 64, context_shift: bool = False,
                          n_keep: int = 0) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Complete `prompt` (text or token ids); OpenAI `text_completion` shape.

        max_tokens=None generates until an end-of-generation token, a stop string or a full
        context (which, with context_shift=True, is shifted instead).
        """
        stops = self._check_common(max_tokens, logprobs, stop)
        tokens = self._prompt_tokens(prompt)
        params = dict(temp=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                      logit_bias=logit_bias, seed=seed)
        SamplingParams(**{("temperature" if k == "temp" else k): v for k, v in params.items()
                          if k != "seed"}).validate(self.n_vocab())
        prompt_text = (prompt if isinstance(prompt, str)
                       else self.detokenize(tokens).decode("utf-8", "replace"))
        events = self._completion_events(tokens, max_tokens, params, stops, logprobs,
                                         context_shift, n_keep)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_path}
        if stream:
            return self._stream_completion(meta, events, prompt_text if echo else "", logprobs)
        return self._collect_completion(meta, events, tokens, prompt_text if echo else "",
                                        logprobs)

    __call__ = create_completion

    def _timing(self, n_prompt: int, n_completion: int, t_gen: float) -> None:
        if self.verbose:
            e = self.last_eval
            pp = e.n_evaluated / e.seconds if e.seconds > 0 else 0.0
            tg = n_completion / t_gen if t_gen > 0 else 0.0
            print(f"alpaca_cpu: prompt {n_prompt} tokens ({e.n_reused} reused, {e.n_evaluated} "
                  f"evaluated, {pp:.1f} t/s); generated {n_completion} tokens ({tg:.1f} t/s)",
                  file=sys.stderr)

    def _collect_completion(self, meta: dict[str, Any], events: Iterator[dict[str, Any]],
                            prompt_tokens: list[int], echo_text: str,
                            logprobs: int | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        parts, lps, finish, n = [echo_text], [], "length", 0
        for ev in events:
            if "finish_reason" in ev:
                finish, n = ev["finish_reason"], ev["n_completion"]
            else:
                parts.append(ev["text"])
                if ev["logprobs"] is not None:
                    lps.append((ev["logprobs"], len("".join(parts)) - len(ev["text"])))
        self._timing(len(prompt_tokens), n, time.perf_counter() - t0 - self.last_eval.seconds)
        choice = {"text": "".join(parts), "index": 0, "finish_reason": finish,
                  "logprobs": self._openai_logprobs(lps) if logprobs is not None else None}
        return {**meta, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt_tokens), "completion_tokens": n,
                          "total_tokens": len(prompt_tokens) + n}}

    @staticmethod
    def _openai_logprobs(entries: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        return {"tokens": [e["token"] for e, _ in entries],
                "text_offset": [off for _, off in entries],
                "token_logprobs": [e["logprob"] for e, _ in entries],
                "top_logprobs": [e["top"] for e, _ in entries]}

    def _stream_completion(self, meta: dict[str, Any], events: Iterator[dict[str, Any]],
                           echo_text: str, logprobs: int | None) -> Iterator[dict[str, Any]]:
        def chunk(text: str, finish: str | None, lp: Any = None) -> dict[str, Any]:
            return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp,
                                         "finish_reason": finish}]}
        offset = 0
        if echo_text:
            offset = len(echo_text)
            yield chunk(echo_text, None)
        for ev in events:
            if "finish_reason" in ev:
                yield chunk("", ev["finish_reason"])
                return
            lp = (self._openai_logprobs([(ev["logprobs"], offset)])
                  if logprobs is not None and ev["logprobs"] is not None else None)
            offset += len(ev["text"])
            yield chunk(ev["text"], None, lp)

    # ---- chat ----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered with this model's chat format."""
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
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
                               ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """Answer a conversation; OpenAI `chat.completion` shape (or chunks when streaming)."""
        tokens = self.render_chat(messages)
        stops = self._check_common(max_tokens, None, stop) + list(self._chat.stop)
        result = self.create_completion(
            tokens, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=min_p, repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, stop=stops, seed=seed, stream=stream,
            logit_bias=logit_bias, repeat_last_n=repeat_last_n, context_shift=context_shift)
        cid = f"chatcmpl-{uuid.uuid4()}"
        if not stream:
            assert isinstance(result, dict)
            c = result["choices"][0]
            return {"id": cid, "object": "chat.completion", "created": result["created"],
                    "model": self.model_path,
                    "choices": [{"index": 0, "finish_reason": c["finish_reason"], "logprobs": None,
                                 "message": {"role": "assistant", "content": c["text"]}}],
                    "usage": result["usage"]}
        return self._stream_chat(cid, result)

    def _stream_chat(self, cid: str, chunks: Any) -> Iterator[dict[str, Any]]:
        created = int(time.time())

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_path,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}
        yield chunk({"role": "assistant"}, None)
        for c in chunks:
            ch = c["choices"][0]
            if ch["finish_reason"] is not None:
                yield chunk({}, ch["finish_reason"])
            elif ch["text"]:
                yield chunk({"content": ch["text"]}, None)

    # ---- state ---------------------------------------------------------------------------

    def save_state(self) -> LlamaState:
        with self._lock:
            return LlamaState(tokens=list(self._tokens), kv=self._model.save_kv(len(self._tokens)),
                              logits=None if self._logits is None else self._logits.copy(),
                              rng_state=self._rng.bit_generator.state, n_ctx=self.n_ctx())

    def load_state(self, state: LlamaState) -> None:
        with self._lock:
            if state.n_ctx > self.n_ctx() or len(state.tokens) > self.n_ctx():
                raise ValueError(f"the state holds {len(state.tokens)} tokens of a context of "
                                 f"{state.n_ctx}, more than this model's {self.n_ctx()}")
            self._model.load_kv(state.kv, len(state.tokens))
            self._tokens = list(state.tokens)
            self._logits = None if state.logits is None else state.logits.copy()
            self._rng.bit_generator.state = state.rng_state
