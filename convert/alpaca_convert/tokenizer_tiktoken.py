"""Meta Llama 3 `tokenizer.model`: a tiktoken BPE file (one "base64-token rank" per line) ->
GGUF "gpt2" vocabulary with merges, pre-tokenizer `llama-bpe`, and Llama 3's special tokens.

tiktoken stores no merges: it merges, at every step, the adjacent pair whose concatenation has
the lowest rank. The same result comes from GGUF merges where a token's merge is the last step
of that process on the token's own bytes (with only lower ranks allowed): the two parts it ends
with.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from gguf import TokenType

from alpaca_cpu.tokenizer_bpe import BYTE_TO_UNICODE

from .errors import ConvertError
from .vocab import Vocab

_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")

# The special tokens after the base vocabulary (Meta's llama/tokenizer.py): Llama 3.1 and later
# name more of them than Llama 3.0; the rest are reserved.
_LLAMA30_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|reserved_special_token_4|>", "<|eot_id|>"]
_LLAMA31_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                    "<|python_tag|>"]


def is_tiktoken(path: Path) -> bool:
    """True for a tiktoken BPE file (its first line is "base64 rank"), False for anything else
    (a SentencePiece protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(4096).rstrip(b"\r\n")
    return bool(_LINE.fullmatch(first))


def llama3_special_tokens(n: int, llama31: bool) -> list[str]:
    named = _LLAMA31_SPECIAL if llama31 else _LLAMA30_SPECIAL
    reserved = sum(t.startswith("<|reserved_special_token_") for t in named)
    return (named + [f"<|reserved_special_token_{reserved + i}|>"
                     for i in range(n - len(named))])[:n]


def _read_ranks(path: Path) -> list[bytes]:
    """Token bytes by rank; ranks must be 0, 1, 2, ... and tokens distinct."""
    tokens: list[bytes] = []
    seen: set[bytes] = set()
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            if not _LINE.fullmatch(line):
                raise ConvertError(f"{path}: line {number} is not 'base64-token rank'")
            text, rank = line.split(b" ")
            try:
                token = base64.b64decode(text, validate=True)
            except binascii.Error as e:
                raise ConvertError(f"{path}: line {number}: bad base64 ({e})") from None
            if int(rank) != len(tokens):
                raise ConvertError(f"{path}: line {number} has rank {int(rank)}, expected "
                                   f"{len(tokens)} (ranks must count up from 0)")
            if not token or token in seen:
                raise ConvertError(f"{path}: line {number}: token {token!r} is empty or repeated")
            seen.add(token)
            tokens.append(token)
    if not tokens:
        raise ConvertError(f"{path}: no tokens")
    return tokens


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts tiktoken's merging ends with on `token`, using only ranks below its own."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def tiktoken_vocab(path: Path, n_vocab: int, llama31: bool = True) -> Vocab:
    """The base vocabulary, its merges, and n_vocab - base special tokens (Llama 3's names)."""
    by_rank = _read_ranks(path)
    if len(by_rank) > n_vocab:
        raise ConvertError(f"{path}: {len(by_rank)} tokens, but the model has only {n_vocab} "
                           "embedding rows")
    ranks = {t: r for r, t in enumerate(by_rank)}

    def text(b: bytes) -> str:
        return "".join(BYTE_TO_UNICODE[x] for x in b)

    merges = []
    for rank, token in enumerate(by_rank):
        if len(token) == 1:
            continue
        pair = _last_merge(token, rank, ranks)
        if pair is None:
            raise ConvertError(f"{path}: token {token!r} (rank {rank}) cannot be made by merging "
                               "lower-ranked tokens")
        merges.append(f"{text(pair[0])} {text(pair[1])}")
    special = llama3_special_tokens(n_vocab - len(by_rank), llama31)
    tokens = [text(t) for t in by_rank] + special
    types = [int(TokenType.NORMAL)] * len(by_rank) + [int(TokenType.CONTROL)] * len(special)
    ids = {name: len(by_rank) + i for i, name in enumerate(special)}
    special_ids = {k: ids[t] for k, t in (("bos", "<|begin_of_text|>"),
                                          ("eos", "<|end_of_text|>")) if t in ids}
    return Vocab(model="gpt2", pre="llama-bpe", tokens=tokens, types=types, merges=merges,
                 special_ids=special_ids, add_bos=True, add_eos=False)
