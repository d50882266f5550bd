"""Byte-level BPE with merges (GGUF `tokenizer.ggml.model = "gpt2"`), encoded by HF `tokenizers`.

llama.cpp splits the text into words with the regexes that `tokenizer.ggml.pre` names (each regex
splits the pieces of the one before; text between matches stays a piece of its own), maps every
byte of a word to a printable character (GPT-2's byte-to-unicode table), then merges adjacent
symbols lowest merge rank first, leftmost first on ties. A `tokenizers` pipeline of `Split(...,
"isolated")` pre-tokenizers, a `ByteLevel` mapping without its own regex and a `BPE` model does
exactly that, in Rust.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` value."""

    regexes: tuple[str, ...]  # applied in order, each splitting the pieces of the one before
    ignore_merges: bool = False  # a word that is itself a token is taken whole (llama3)
    add_bos: bool = False  # llama.cpp's default for add_bos_token when the file has no such key
    has_bos: bool = True  # False: no BOS token at all unless the file names one (chatglm)


# The GPT-2 regex; llama.cpp runs it with a hand-written splitter that behaves like this regex.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama-3's split regex as its tokenizer.json writes it (the converter recognises the
# pre-tokenizer by this very text), and Qwen2's, the same with digits one at a time.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _as_llama_cpp(regex: str) -> str:
    """llama.cpp spells the case-insensitive contractions out letter by letter (which also
    keeps Unicode case folding, e.g. 'ſ' for 's', from matching)."""
    return regex.replace(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                         r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")


_LLAMA3 = _as_llama_cpp(LLAMA3_SPLIT)
_QWEN2 = _as_llama_cpp(QWEN2_SPLIT)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2_PRE = PreTokenizer((_GPT2,))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_SMOLLM_PRE = PreTokenizer((r"\p{N}", _GPT2))  # digits one by one, then GPT-2
_QWEN2_PRE = PreTokenizer((_QWEN2,))
_BLOOM_PRE = PreTokenizer((_BLOOM,))

# `tokenizer.ggml.pre` value -> pre-tokenizer, following llama.cpp's llama-vocab.cpp (c392e50).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
    "llama-bpe": _LLAMA3_PRE,
    "falcon3": _LLAMA3_PRE,
    "dbrx": PreTokenizer((_LLAMA3,)),
    "smaug-bpe": PreTokenizer((_LLAMA3,)),
    "chatglm-bpe": PreTokenizer((_LLAMA3,), has_bos=False),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "deepseek-coder": PreTokenizer(
        # llama.cpp matches this CJK class after turning non-ASCII spaces into \v: no spaces.
        (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"(?:(?!\s)[一-龥ࠀ-一가-퟿])+", r"\p{N}")
    ),
    "gpt2": _GPT2_PRE,  # not a name llama.cpp knows, but what a hand-written file would say
    "gpt-2": _GPT2_PRE,
    "phi-2": _GPT2_PRE,
    "jina-es": _GPT2_PRE,
    "jina-de": _GPT2_PRE,
    "gigachat": _GPT2_PRE,
    "jina-v1-en": _GPT2_PRE,
    "jina-v2-es": _GPT2_PRE,
    "jina-v2-de": _GPT2_PRE,
    "jina-v2-code": _GPT2_PRE,
    "roberta-bpe": _GPT2_PRE,
    "mpt": _GPT2_PRE,
    "olmo": _GPT2_PRE,
    "jais": _GPT2_PRE,
    "smollm": _SMOLLM_PRE,
    "starcoder": _SMOLLM_PRE,
    "refact": _SMOLLM_PRE,
    "command-r": _SMOLLM_PRE,
    "codeshell": _SMOLLM_PRE,
    "exaone": _SMOLLM_PRE,
    "minerva-7b": _SMOLLM_PRE,
    "qwen2": _QWEN2_PRE,
    "deepseek-r1-qwen": _QWEN2_PRE,
    "megrez": _QWEN2_PRE,
    "stablelm2": _QWEN2_PRE,
    "poro-chat": _BLOOM_PRE,
    "bloom": _BLOOM_PRE,
    "gpt3-finnish": _BLOOM_PRE,
    "viking": PreTokenizer((_BLOOM, r"\p{N}")),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    "chameleon": PreTokenizer(
        (
            r"<sentinel:[0-9]+>",
            r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            _GPT2,
        ),
        add_bos=True,
    ),
}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the rest map to U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
# str.translate table from the byte characters back to Latin-1, so `.encode("latin-1")` yields the
# bytes. Latin-1 characters that are not byte characters map outside Latin-1 to fail that encode.
_UNICODE_TO_LATIN1 = {ord(c): b for b, c in BYTE_TO_UNICODE.items()}
_UNICODE_TO_LATIN1.update({c: 0xFFFF for c in range(256) if c not in _UNICODE_TO_LATIN1})


def byte_level_to_bytes(text: str) -> bytes:
    """The bytes a byte-level token stands for (llama.cpp's `llama_decode_text`)."""
    try:
        return text.translate(_UNICODE_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        pass
    # A character outside the byte table: llama.cpp writes a marker instead of failing.
    out = bytearray()
    for ch in text:
        code = _UNICODE_TO_LATIN1.get(ord(ch))
        if code is not None and code < 256:
            out.append(code)
        else:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


# Sequence length -> (shift, bit pattern) of its lead byte: 110xxxxx, 1110xxxx, 11110xxx.
_LEADS = {2: (5, 0b110), 3: (4, 0b1110), 4: (3, 0b11110)}


def _read_like_llama(err: UnicodeError) -> tuple[str, int]:
    """Error handler: read malformed UTF-8 as llama.cpp's unicode_cpts_from_utf8 does.

    llama.cpp only checks the bit patterns, so overlong forms decode to their code point; any
    other byte that does not start a complete sequence becomes one U+FFFD and reading goes on at
    the next byte (Python's "replace" would swallow a whole truncated sequence). Surrogates and
    code points past U+10FFFF, which llama.cpp passes on or fails on, also become U+FFFD here.
    """
    assert isinstance(err, UnicodeDecodeError)
    data, start = err.object, err.start
    lead = data[start]
    size = next((n for n, (shift, bits) in _LEADS.items() if lead >> shift == bits), 1)
    tail = data[start + 1 : start + size]
    if size > 1 and len(tail) == size - 1 and all(b >> 6 == 0b10 for b in tail):
        code = lead & (0x7F >> size)
        for b in tail:
            code = code << 6 | (b & 0x3F)
        if not 0xD800 <= code <= 0xDFFF and code <= 0x10FFFF:
            return chr(code), start + size
    return "\ufffd", start + 1


codecs.register_error("alpaca_cpu.read_like_llama", _read_like_llama)


def decode_utf8_like_llama(data: bytes) -> str:
    """Decode possibly malformed UTF-8 the way llama.cpp's BPE tokenizer reads its input."""
    return data.decode("utf-8", errors="alpaca_cpu.read_like_llama")


class BpeEncoder:
    """Encodes text fragments (special tokens already split off) with byte-level BPE."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], pre: PreTokenizer) -> None:
        vocab = {text: i for i, text in enumerate(tokens)}
        pairs: list[tuple[str, str]] = []
        for merge in merges:
            # llama.cpp splits at the first space after the first character ("Ġ Ġ" is a merge).
            cut = merge.find(" ", 1)
            if cut < 0:
                continue
            left, right = merge[:cut], merge[cut + 1 :]
            # `tokenizers` refuses merges of or into unknown tokens, so they are dropped
            # (llama.cpp would make the merge, then spell the symbol out byte by byte; real
            # vocabularies have no such merges).
            if left in vocab and right in vocab and left + right in vocab:
                pairs.append((left, right))
        # A character missing from the vocabulary stays a symbol of its own in llama.cpp, which
        # keeps its neighbours from merging, and is then dropped. `tokenizers` would drop it
        # before merging, so it maps to a stand-in id past the vocabulary, removed afterwards.
        self._missing = len(tokens)
        stand_in = "\x00missing"
        while stand_in in vocab:
            stand_in += "\x00"
        vocab[stand_in] = self._missing
        hf = HFTokenizer(
            models.BPE(vocab, pairs, unk_token=stand_in, ignore_merges=pre.ignore_merges)
        )
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), "isolated") for rx in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._hf = hf

    def encode(self, fragment: str | bytes, after_special: bool) -> list[int]:
        """Token ids of one text fragment; `after_special` does not matter for BPE."""
        if isinstance(fragment, bytes):  # only malformed UTF-8 arrives as bytes
            fragment = decode_utf8_like_llama(fragment)
        ids = self._hf.encode(fragment, add_special_tokens=False).ids
        if self._missing in ids:
            ids = [i for i in ids if i != self._missing]
        return ids
