"""Bad inputs at the API raise ValueError with a clear message, and the object stays usable.

Token ids, max_tokens, n_ctx (including one too large for the memory, refused before anything
is allocated), prompts longer than the context, invalid UTF-8 and NUL characters, sampling
parameters. After every refusal the same object is called again and must answer exactly as a
fresh object does. Runs on a tiny random model with a SentencePiece-style vocabulary (byte
fallback, so any text tokenizes); one check also runs on the real model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_model import TinySpec, write_tiny_model

import alpaca_cpu.model as model_module
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.llama import MAX_TOKENS_LIMIT, Llama

N_CTX = 128  # the messages below spell it out
PROBE_PROMPT = "the llama is"
PROBE_TOKENS = 12
PROBE_SEED = 5

_WORDS = ["▁the", "▁a", "▁and", "▁of", "▁to", "▁is", "▁in", "▁it", "▁llama", "▁tiny",
          "th", "he", "ll", "am", "in", "is"]
_CHARS = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?"]
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte.
_PIECES = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _WORDS + _CHARS
_TYPES = [2, 3, 3] + [6] * 256 + [1] * (len(_WORDS) + len(_CHARS))
N_VOCAB = len(_PIECES)
FIRST_TEXT_ID = 3 + 256  # ids below are <unk>, <s>, </s> and the byte tokens


def write_tiny_llama(path: Path, **spec: Any) -> Path:
    """A tiny random F32 model with a tokenizer, so that the whole Llama API runs on it;
    `spec` overrides TinySpec fields."""
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": _PIECES,
        "tokenizer.ggml.scores": [0.0] * FIRST_TEXT_ID
                                 + [-float(i) for i in range(N_VOCAB - FIRST_TEXT_ID)],
        "tokenizer.ggml.token_type": _TYPES,
    }
    return write_tiny_model(path, TinySpec(**{"n_vocab": N_VOCAB, "context_length": 4096,
                                              **spec}), metadata)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def probe(llm: Llama) -> tuple[str, str]:
    """A greedy and a seeded sampled completion: what a usable object must reproduce."""
    greedy = llm(PROBE_PROMPT, max_tokens=PROBE_TOKENS, temperature=0)
    sampled = llm(PROBE_PROMPT, max_tokens=PROBE_TOKENS, temperature=0.9, seed=PROBE_SEED)
    return greedy["choices"][0]["text"], sampled["choices"][0]["text"]


@pytest.fixture(scope="module")
def fresh_answers(tiny_path: Path) -> tuple[str, str]:
    answers = probe(Llama(tiny_path, n_ctx=N_CTX))
    assert all(len(a) > 0 for a in answers)  # the comparison has teeth
    return answers


@pytest.fixture(scope="module")
def llm(tiny_path: Path) -> Llama:
    llm = Llama(tiny_path, n_ctx=N_CTX, seed=1, chat_format="chatml")
    llm("warm up the cache with something else", max_tokens=4)
    return llm


def assert_usable(llm: Llama, fresh_answers: tuple[str, str]) -> None:
    assert probe(llm) == fresh_answers


# ---- completions ----------------------------------------------------------------------------

COMPLETION_ERRORS: list[tuple[dict[str, Any], str]] = [
    # token ids
    ({"prompt": [1, 10**6]}, rf"token id 1000000 at index 1 is outside \[0, {N_VOCAB}\)"),
    ({"prompt": [1, N_VOCAB]}, rf"token id {N_VOCAB} at index 1 is outside"),
    ({"prompt": [-1, 5]}, r"token id -1 at index 0 is outside"),
    ({"prompt": [1, 2.5]}, r"token ids must be integers; item 1 is 2.5"),
    ({"prompt": [1, "7"]}, r"token ids must be integers; item 1 is '7'"),
    ({"prompt": [True]}, r"item 0 is True"),
    ({"prompt": None}, r"token ids must be a sequence of integers, got NoneType"),
    ({"prompt": b"text as bytes"}, r"not bytes \(decode it first\)"),
    ({"prompt": []}, r"the prompt is empty"),
    # text
    ({"prompt": "a\x00b"}, r"the prompt contains a NUL character at index 1"),
    ({"prompt": "ok \ud800 no"}, r"the prompt is not valid Unicode: U\+D800 at index 3"),
    ({"prompt": "a" * (N_CTX + 1)}, r"the prompt has \d+ tokens, more than the context of 128"),
    ({"prompt": [FIRST_TEXT_ID] * (N_CTX + 1)},
     rf"the prompt has {N_CTX + 1} tokens, more than the context of {N_CTX}"),
    # max_tokens and logprobs
    ({"max_tokens": -1}, r"max_tokens = -1, expected None or an integer in \[0, 2147483648\)"),
    ({"max_tokens": MAX_TOKENS_LIMIT}, r"max_tokens = 2147483648"),
    ({"max_tokens": 10**30}, r"max_tokens = 10{30}"),
    ({"max_tokens": 2.5}, r"max_tokens = 2.5"),
    ({"max_tokens": True}, r"max_tokens = True"),
    ({"logprobs": -1}, rf"logprobs = -1, expected None or an integer in \[0, {N_VOCAB}\]"),
    ({"logprobs": N_VOCAB + 1}, rf"logprobs = {N_VOCAB + 1}"),
    # sampling
    ({"temperature": -0.5}, r"temperature must be >= 0"),
    ({"temperature": math.nan}, r"temperature must be a finite number, got nan"),
    ({"temperature": math.inf}, r"temperature must be a finite number, got inf"),
    ({"temperature": "hot"}, r"temperature must be a finite number, got 'hot'"),
    ({"top_p": 1.5}, r"top_p must be in \[0, 1\], got 1.5"),
    ({"top_p": -0.1}, r"top_p must be in \[0, 1\], got -0.1"),
    ({"min_p": 2}, r"min_p must be in \[0, 1\], got 2"),
    ({"top_k": -1}, r"top_k must be an integer >= 0"),
    ({"top_k": 2.5}, r"top_k must be an integer >= 0 \(0 disables it\), got 2.5"),
    ({"repeat_penalty": 0}, r"repeat_penalty must be > 0, got 0"),
    ({"repeat_penalty": -1.0}, r"repeat_penalty must be > 0"),
    ({"presence_penalty": math.nan}, r"presence_penalty must be a finite number"),
    ({"frequency_penalty": -math.inf}, r"frequency_penalty must be a finite number"),
    ({"repeat_last_n": -2}, r"repeat_last_n must be an integer >= -1"),
    ({"logit_bias": {10**9: 1.0}}, r"logit_bias token id 1000000000 is outside the vocabulary"),
    ({"logit_bias": {-1: 1.0}}, r"logit_bias token id -1 is outside"),
    ({"logit_bias": {"5": 1.0}}, r"logit_bias token id '5' is outside"),
    ({"logit_bias": {5: math.nan}}, r"logit_bias for token 5 must be a finite number or -inf"),
    ({"logit_bias": {5: math.inf}}, r"logit_bias for token 5 must be a finite number or -inf"),
    ({"logit_bias": [1, 2]}, r"logit_bias must be a mapping"),
    ({"seed": -1}, r"seed = -1, expected None or an integer >= 0"),
    ({"seed": 1.5}, r"seed = 1.5"),
    ({"seed": "42"}, r"seed = '42'"),
    # stop strings
    ({"stop": [3]}, r"stop must be a string or a list of strings, got \[3\]"),
    ({"stop": 3}, r"stop must be a string or a list of strings, got 3"),
]


@pytest.mark.parametrize(("kwargs", "message"), COMPLETION_ERRORS,
                         ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"[:40]
                              for k, _ in COMPLETION_ERRORS])
@pytest.mark.parametrize("stream", [False, True], ids=["call", "stream"])
def test_bad_completion_arguments(llm: Llama, fresh_answers: tuple[str, str],
                                  kwargs: dict[str, Any], message: str, stream: bool) -> None:
    args = {"prompt": PROBE_PROMPT, "max_tokens": 4, **kwargs}
    # Streams are refused when asked for, not at their first chunk.
    with pytest.raises(ValueError, match=message):
        llm.create_completion(**args, stream=stream)
    assert_usable(llm, fresh_answers)


@pytest.mark.parametrize(("messages", "message"), [
    ("hello", r"messages must be a list of dicts, got str"),
    (None, r"messages must be a list of dicts, got NoneType"),
    ([{"role": "user"}], r"messages\[0\] must be a dict with string 'role' and 'content'"),
    ([{"role": "user", "content": 5}], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "a\x00"}],
     r"messages\[1\]\['content'\] contains a NUL character at index 1"),
    ([{"role": "us\x00er", "content": "hi"}], r"messages\[0\]\['role'\] contains a NUL"),
    ([{"role": "user", "content": "\udcff"}], r"messages\[0\]\['content'\] is not valid Unicode"),
    ([{"role": "user", "content": "word " * N_CTX}],
     rf"the conversation has \d+ tokens, more than the context of {N_CTX}"),
])
def test_bad_chat_messages(llm: Llama, fresh_answers: tuple[str, str], messages: Any,
                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.create_chat_completion(messages, max_tokens=4)
    assert_usable(llm, fresh_answers)


def test_chat_refuses_bad_sampling_parameters(llm: Llama, fresh_answers: tuple[str, str]) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="top_p must be in"):
        llm.create_chat_completion(messages, top_p=7, stream=True)
    with pytest.raises(ValueError, match="max_tokens = -3"):
        llm.create_chat_completion(messages, max_tokens=-3)
    assert_usable(llm, fresh_answers)


# ---- output shapes --------------------------------------------------------------------------
# The library generates typed steps (llama.GenerationStep); the OpenAI-shaped dicts are built
# from them at the API. Streamed and whole answers must be the same answer, chunk by chunk.


def test_streamed_and_whole_completions_agree(llm: Llama) -> None:
    kwargs = {"prompt": PROBE_PROMPT, "max_tokens": PROBE_TOKENS, "temperature": 0,
              "logprobs": 2, "echo": True}
    whole = llm(**kwargs)
    chunks = list(llm(**kwargs, stream=True))
    choice = whole["choices"][0]
    assert whole["object"] == "text_completion" and whole["usage"] == {
        "prompt_tokens": len(llm.tokenize(PROBE_PROMPT.encode())),
        "completion_tokens": PROBE_TOKENS,
        "total_tokens": len(llm.tokenize(PROBE_PROMPT.encode())) + PROBE_TOKENS}
    assert choice["finish_reason"] == "length" and choice["text"].startswith(PROBE_PROMPT)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "length"]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == PROBE_TOKENS
    for key in ("tokens", "text_offset", "token_logprobs", "top_logprobs"):
        assert [x for s in streamed for x in s[key]] == lp[key], key
    before = 0  # each token's text_offset is where its chunk's text starts
    for c in chunks:
        if c["choices"][0]["logprobs"]:
            assert c["choices"][0]["logprobs"]["text_offset"] == [before]
        before += len(c["choices"][0]["text"])
    assert lp["text_offset"][0] == len(PROBE_PROMPT)


def test_streamed_and_whole_chat_completions_agree(llm: Llama) -> None:
    messages = [{"role": "user", "content": PROBE_PROMPT}]
    whole = llm.create_chat_completion(messages, max_tokens=PROBE_TOKENS, temperature=0)
    chunks = list(llm.create_chat_completion(messages, max_tokens=PROBE_TOKENS, temperature=0,
                                             stream=True))
    choice = whole["choices"][0]
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == PROBE_TOKENS
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert all(list(d) == ["content"] and d["content"] for d in deltas[1:-1])
    assert "".join(d["content"] for d in deltas[1:-1]) == choice["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "length"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1


# ---- tokens in, tokens out ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    (b"ab\xffcd", r"not valid UTF-8: byte 0xff at offset 2 \(invalid start byte\)"),
    ("日本".encode()[:-1], r"byte 0xe6 at offset 3 \(unexpected end of data\)"),
    (b"ok\xc3(", r"byte 0xc3 at offset 2 \(invalid continuation byte\)"),
    (b"\xed\xa0\x80", r"byte 0xed at offset 0"),  # an encoded surrogate is not UTF-8 either
    ("a str", r"tokenize\(\) takes bytes, got str"),
])
def test_tokenize_refuses_what_is_not_utf8(llm: Llama, fresh_answers: tuple[str, str],
                                           text: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.tokenize(text)
    assert_usable(llm, fresh_answers)


def test_tokenize_takes_nul_bytes_and_round_trips(llm: Llama) -> None:
    """NUL is valid UTF-8: tokenize() keeps it, so detokenize()'s output always goes back."""
    text = "a\x00b ü 日本".encode()
    ids = llm.tokenize(text, add_bos=False)
    assert 3 + 0x00 in ids  # the <0x00> byte token
    assert llm.detokenize(ids) == text


@pytest.mark.parametrize(("tokens", "message"), [
    ([1, 10**6], r"token id 1000000 at index 1"),
    ([1.0], r"item 0 is 1.0"),
    ("abc", r"got str"),
])
def test_detokenize_refuses_bad_ids(llm: Llama, tokens: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.detokenize(tokens)


@pytest.mark.parametrize(("call", "message"), [
    (lambda llm: llm.eval([]), r"cannot evaluate an empty list of tokens"),
    (lambda llm: llm.eval([1, -3]), r"token id -3 at index 1"),
    (lambda llm: llm.eval(np.array([1, N_VOCAB])), rf"token id {N_VOCAB} at index 1"),
    (lambda llm: llm.eval(np.array([1.0, 2.0])), r"integers; item 0 is .*1\.0"),
    (lambda llm: llm.eval([1] * (N_CTX + 1)), r"129 tokens do not fit the context of 128"),
    (lambda llm: llm.generate([1, 2], temp=-1), r"temperature must be >= 0"),
    (lambda llm: llm.generate([1, 10**6]), r"token id 1000000"),
    (lambda llm: llm.generate([]), r"cannot generate after an empty list"),
    (lambda llm: llm.generate([1], seed=-5), r"seed = -5"),
    (lambda llm: llm.model.forward([1, 2], start_pos=127), r"positions 127..128 do not fit"),
    (lambda llm: llm.model.forward([N_VOCAB]), rf"token id {N_VOCAB} at index 0 is outside"),
    (lambda llm: llm.model.save_kv(N_CTX + 1), r"n_pos = 129, expected an integer in \[0, 128\]"),
    (lambda llm: llm.model.save_kv(2.5), r"n_pos = 2.5"),
    (lambda llm: llm.model.load_kv(b"", -1), r"n_pos = -1"),
    (lambda llm: llm.model.load_kv("text", 1), r"takes the bytes save_kv gave, got str"),
    (lambda llm: llm.model.load_kv(b"x", 1), r"load_kv: state of 1 bytes, expected"),
])
def test_low_level_calls_refuse_before_touching_the_cache(
        llm: Llama, fresh_answers: tuple[str, str], call: Any, message: str) -> None:
    before = list(llm._tokens)
    # generate() checks its arguments when called, not at the first token.
    with pytest.raises(ValueError, match=message):
        call(llm)
    assert llm._tokens == before
    assert_usable(llm, fresh_answers)


def test_foreign_state_is_refused(llm: Llama, fresh_answers: tuple[str, str]) -> None:
    good = llm.save_state()
    for change, message in [({"tokens": [*good.tokens[:-1], 10**6]}, r"token id 1000000"),
                            ({"logits": np.zeros(3, np.float32)}, r"logits have shape \(3,\)"),
                            ({"kv": good.kv[:-2]}, r"load_kv: state of \d+ bytes, expected")]:
        with pytest.raises(ValueError, match=message):
            llm.load_state(type(good)(**{**good.__dict__, **change}))
    assert_usable(llm, fresh_answers)


# ---- construction ---------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_ctx": 0}, r"n_ctx = 0, expected a positive integer"),
    ({"n_ctx": -5}, r"n_ctx = -5"),
    ({"n_ctx": 2.5}, r"n_ctx = 2.5"),
    ({"n_ctx": True}, r"n_ctx = True"),
    ({"n_ctx": 4096 * 64 + 1}, r"n_ctx = 262145 is far beyond the 4096 tokens .* trained for"),
    ({"n_threads": 0}, r"n_threads = 0, expected an integer in \[1, 1024\]"),
    ({"n_threads": 5000}, r"n_threads = 5000"),
    ({"n_batch": 0}, r"n_batch = 0, expected a positive integer"),
    ({"kv_type": "q8_0"}, r"kv_type = 'q8_0', expected 'f16' or 'f32'"),
    ({"seed": -1}, r"seed = -1"),
    ({"chat_format": "nope"}, r"unknown chat_format 'nope'"),
])
def test_bad_constructor_arguments(tiny_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Llama(tiny_path, **kwargs)


def test_n_ctx_beyond_memory_is_refused_before_allocating(
        tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With memory for exactly `fits` positions, n_ctx = fits loads and fits + 1 is refused
    with the sizes in the message."""
    mf = open_model_file(tiny_path)
    weights = sum(t.data.nbytes for t in mf.tensors.values())
    per_token = mf.config.kv_cache_bytes(1)
    fits = 1000
    available = weights + model_module.MEMORY_MARGIN_BYTES + fits * per_token
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: available)
    assert Llama(tiny_path, n_ctx=fits).n_ctx() == fits
    need = weights + (fits + 1) * per_token + model_module.MEMORY_MARGIN_BYTES
    with pytest.raises(ValueError) as info:
        Llama(tiny_path, n_ctx=fits + 1)
    assert str(info.value) == (
        f"n_ctx = {fits + 1} needs {need / 2**30:.2f} GiB ({weights / 2**30:.2f} GiB weights + "
        f"{(fits + 1) * per_token / 2**30:.2f} GiB KV cache), but only "
        f"{available / 2**30:.2f} GiB is available; n_ctx <= {fits} would fit")


def test_n_ctx_no_machine_can_hold_is_refused(tmp_path: Path) -> None:
    """32 KiB of KV cache per position (head_dim 1024), a file that claims the largest training
    context the loader takes (2^24) and n_ctx = 2^30, the most it may ask for that: 32 TiB.
    Refused from the real memory figure, before the native model allocates anything."""
    path = write_tiny_llama(tmp_path / "long.gguf", head_dim=1024, context_length=1 << 24)
    with pytest.raises(ValueError, match=r"n_ctx = 1073741824 needs 32768\.\d\d GiB \(0\.\d\d GiB "
                                         r"weights \+ 32768\.00 GiB KV cache\), but only "
                                         r"[\d.]+ GiB is available; n_ctx <= \d+ would fit"):
        Llama(path, n_ctx=1 << 30)


# ---- the real model -------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_stays_usable_after_refusals(smollm2_path: Path) -> None:
    llm = Llama(smollm2_path, n_ctx=256)
    expected = Llama(smollm2_path, n_ctx=256)("The capital of France is", max_tokens=6,
                                              temperature=0)["choices"][0]["text"]
    assert expected.startswith(" Paris")
    for bad, message in (
        ({"prompt": [1, 49152]}, r"token id 49152 at index 1 is outside \[0, 49152\)"),
        ({"prompt": "x\x00"}, "the prompt contains a NUL character at index 1"),
        ({"max_tokens": -1}, r"max_tokens = -1, expected None or an integer in \[0, "),
        ({"top_k": -1}, r"top_k must be an integer >= 0 \(0 disables it\), got -1"),
        ({"prompt": "word " * 300}, r"the prompt has \d+ tokens, more than the context of 256"),
    ):
        with pytest.raises(ValueError, match=message):
            llm(**{"prompt": "Hi", **bad})
        out = llm("The capital of France is", max_tokens=6, temperature=0)
        assert out["choices"][0]["text"] == expected
    with pytest.raises(ValueError, match="byte 0xc0 at offset 5"):
        llm.tokenize(b"Paris\xc0\xaf")
