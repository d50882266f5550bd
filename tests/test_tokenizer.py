"""Tokenizer and streaming detokenizer.

Oracles: llama.cpp's token ids for the real SmolLM2 vocabulary (golden file), and `sentencepiece`
itself for a SentencePiece BPE model trained here on text this file writes.
"""

from __future__ import annotations

import io
import random
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm

from alpaca_cpu.tokenizer import StreamingDecoder, Tokenizer, TokenType
from alpaca_cpu.tokenizer_bpe import BYTE_TO_UNICODE

# ---- a SentencePiece model trained here ---------------------------------------------------------

TRAIN_WORDS = [
    "the", "The", "llama", "alpaca", "grazes", "on", "grass", "in", "Peru", "and", "Bolivia",
    "naïve", "café", "über", "résumé", "Ünïcödé", "façade", "smörgåsbord",
    "日本語", "東京", "中文", "漢字", "한국어",
    "🦙", "🚀", "👍", "😀",
    "0", "7", "42", "2024", "3.14159", "1,000,000",
    "   ", "\t", "\n", "\n\n", "  \n ", "x = 1;", "def f(x):", "print(f(12))",
]  # fmt: skip

# Characters the model never saw: only byte fallback can encode them.
UNSEEN = ["Ω", "≈", "Ж", "ऄ", "🐍", "🎉", "👍🏽", "🇫🇷", "\u0301", "ﷺ", "\x00", "\x7f", "€"]

EDGE_STRINGS = [
    "", " ", "  ", "   leading", "trailing   ", "\n", "\n\n\n", "\t\t", " \n \t ", "▁", "a▁b",
    "<s>", "</s>", "<unk>", "<0x41>", "0123456789", "3.14159 2024", "llama🦙alpaca", "日本語abc",
    "Ωmega", "\u00e9 vs e\u0301", "tab\there\nnew line", "  two  spaces  between  ",
]  # fmt: skip


def training_lines(n: int = 2000) -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def train_sentencepiece(vocab_size: int = 500) -> spm.SentencePieceProcessor:
    """BPE with byte fallback, no normalization, spaces kept as they are (LLaMA's settings)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def gguf_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    """token_type as llama.cpp's converter writes it."""
    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_unused(i):
        return TokenType.UNUSED
    if sp.is_byte(i):
        return TokenType.BYTE
    return TokenType.NORMAL


def spm_metadata(sp: spm.SentencePieceProcessor) -> dict[str, Any]:
    """GGUF tokenizer metadata of a sentencepiece model, as `gguf` reads it back."""
    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [gguf_type(sp, i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }


def comparison_strings(count: int = 300) -> list[str]:
    """Edge cases plus random mixes of seen words, unseen characters and whitespace runs."""
    rng = random.Random(1234)
    atoms = TRAIN_WORDS + UNSEEN + [" ", "  ", "    ", "\n", "\r\n", "\t", "9", "12345"]
    out = list(EDGE_STRINGS)
    while len(out) < count:
        out.append("".join(rng.choice(atoms) for _ in range(rng.randint(1, 10))))
    return out


@pytest.fixture(scope="module")
def trained_sp() -> spm.SentencePieceProcessor:
    return train_sentencepiece()


@pytest.fixture(scope="module")
def spm_tok(trained_sp: spm.SentencePieceProcessor) -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata(trained_sp))


def byte_token(tok: Tokenizer, b: int) -> int:
    return tok.tokens.index(f"<0x{b:02X}>")


# ---- SentencePiece vocabulary: ids equal sentencepiece's own ----------------------------------


def test_trained_model_covers_the_cases(trained_sp: spm.SentencePieceProcessor) -> None:
    sp = trained_sp
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert {"<0x00>", "<0xFF>", "▁", "日", "🦙", "7"} <= pieces
    assert "Ω" not in pieces  # needs byte fallback


def test_spm_ids_equal_sentencepiece(trained_sp: spm.SentencePieceProcessor, spm_tok: Tokenizer):
    strings = comparison_strings()
    needed_fallback = 0
    for s in strings:
        expected = trained_sp.encode(s)
        assert spm_tok.encode(s, add_bos=False) == expected, repr(s)
        assert spm_tok.encode(s.encode(), add_bos=False) == expected, repr(s)
        needed_fallback += any(trained_sp.is_byte(i) for i in expected)
    assert len(strings) >= 300
    assert needed_fallback >= 50  # the byte-fallback path was really exercised


def test_spm_bos_eos_and_defaults(trained_sp: spm.SentencePieceProcessor, spm_tok: Tokenizer):
    ids = trained_sp.encode("llama")
    assert spm_tok.encode("llama") == [1] + ids  # add_bos_token = true in the metadata
    assert spm_tok.encode("llama", add_bos=True) == [1] + ids
    assert spm_tok.encode("llama", add_bos=False) == ids
    assert spm_tok.encode("") == [1]
    assert spm_tok.encode("", add_bos=False) == []
    assert (spm_tok.bos_id, spm_tok.eos_id, spm_tok.unk_id, spm_tok.eot_id) == (1, 2, 0, None)
    assert spm_tok.eog_ids == frozenset({2})
    assert spm_tok.add_bos and not spm_tok.add_eos and spm_tok.add_space_prefix

    with_eos = Tokenizer.from_metadata(
        spm_metadata(trained_sp) | {"tokenizer.ggml.add_eos_token": True}
    )
    assert with_eos.encode("llama") == [1] + ids + [2]
    assert with_eos.encode("llama", add_bos=False) == ids  # no specials at all


def test_spm_special_tokens_in_text(trained_sp: spm.SentencePieceProcessor, spm_tok: Tokenizer):
    # Without special parsing "<s>" is text; with it, it is BOS, and llama.cpp puts the
    # add_space_prefix space in front of the text that follows a special token.
    assert spm_tok.encode("<s>hi there", add_bos=False) == trained_sp.encode("<s>hi there")
    assert spm_tok.encode("<s>hi there</s>", add_bos=False, special=True) == (
        [1] + trained_sp.encode("hi there") + [2]
    )
    assert spm_tok.encode("llama<s>", add_bos=False, special=True) == (
        trained_sp.encode("llama") + [1]
    )


def test_spm_decode_round_trip(spm_tok: Tokenizer) -> None:
    for s in comparison_strings():
        ids = spm_tok.encode(s, add_bos=False)
        # U+2581 is how SentencePiece writes a space, so it comes back as one.
        expected = s.replace("▁", " ").encode()
        # The first token's add_space_prefix space is dropped when decoding from the start.
        assert spm_tok.decode(ids) == expected, repr(s)
        if ids:
            assert spm_tok.decode(ids, from_start=False) == b" " + expected, repr(s)


def test_spm_decode_control_tokens(spm_tok: Tokenizer) -> None:
    ids = spm_tok.encode("hi") + [2]
    assert spm_tok.decode(ids) == b" hi"  # llama.cpp: BOS takes the place of the stripped space
    assert spm_tok.decode(ids, special=True) == b"<s> hi</s>"
    assert spm_tok.decode(ids[1:]) == b"hi"
    assert spm_tok.token_to_piece(1) == b"" and spm_tok.token_to_piece(1, special=True) == b"<s>"
    assert spm_tok.token_to_piece(byte_token(spm_tok, 0xE2)) == b"\xe2"
    assert spm_tok.is_control(1) and spm_tok.is_control(2) and not spm_tok.is_control(5)


def test_spm_malformed_utf8_input(trained_sp: spm.SentencePieceProcessor, spm_tok: Tokenizer):
    # llama.cpp cuts symbols by the length their first byte announces: 0xFF announces 4 bytes and
    # swallows "hi", so all three become byte tokens; the prefix space is a piece of its own.
    space = trained_sp.piece_to_id("▁")
    expected = [space] + [byte_token(spm_tok, b) for b in b"\xffhi"]
    assert spm_tok.encode(b"\xffhi", add_bos=False) == expected
    assert spm_tok.decode(expected) == b"\xffhi"
    llama = trained_sp.encode("llama")
    assert spm_tok.encode(b"llama\xc3", add_bos=False) == llama + [byte_token(spm_tok, 0xC3)]


# ---- hand-made vocabularies: the rules llama.cpp applies --------------------------------------


def bpe_metadata(
    pre: str | None = "gpt2", extra: Sequence[str] = (), merges: Sequence[str] = ()
) -> dict[str, Any]:
    """A byte-level BPE vocabulary: the 256 byte characters, `extra` tokens, `merges`."""
    tokens = ["<|endoftext|>", *BYTE_TO_UNICODE.values(), *extra]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        md["tokenizer.ggml.pre"] = pre
    return md


HELLO_MERGES = ["H e", "He l", "Hel l", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ Ġ"]
HELLO_TOKENS = ["He", "Hel", "Hell", "Hello", "Ġw", "or", "Ġwor", "ld", "Ġworld", "ĠĠ"]


def test_bpe_merges_and_byte_level() -> None:
    tok = Tokenizer.from_metadata(bpe_metadata(extra=HELLO_TOKENS, merges=HELLO_MERGES))
    ids = tok.encode("Hello world")
    assert [tok.tokens[i] for i in ids] == ["Hello", "Ġworld"]
    assert tok.decode(ids) == b"Hello world"
    text = "naïve 🦙\n\tx"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # no merges apply: one token a byte
    assert tok.decode(ids) == text.encode()
    assert tok.add_bos is False and tok.encode("x") == tok.encode("x", add_bos=False)
    assert tok.encode("x", add_bos=True)[0] == 0


@pytest.mark.parametrize(
    ("pre", "words"),
    [
        # "   's": two spaces (the third goes with what follows), " '", "s"
        ("gpt2", ["Hello", "Ġworld", "12345", "ĠĠ", "Ġ'", "s"]),
        # punctuation first: "'" alone, so the spaces end their piece and stay together
        ("default", ["Hello", "Ġworld", "123", "45", "ĠĠ", "Ġ", "'", "s"]),
        ("smollm", ["Hello", "Ġworld", "1", "2", "3", "4", "5", "ĠĠ", "Ġ'", "s"]),
        ("llama-bpe", ["Hello", "Ġworld", "123", "45", "ĠĠ", "Ġ'", "s"]),
    ],
)
def test_bpe_pre_tokenizers(pre: str, words: list[str]) -> None:
    # With merges for every word, the tokens are exactly the pre-tokenizer's words.
    merges = HELLO_MERGES + ["1 2", "12 3", "123 4", "1234 5", "4 5", "Ġ '"]
    extra = HELLO_TOKENS + ["12", "123", "1234", "12345", "45", "Ġ'"]
    tok = Tokenizer.from_metadata(bpe_metadata(pre, extra, merges))
    ids = tok.encode("Hello world12345   's", add_bos=False)
    assert [tok.tokens[i] for i in ids] == words


def test_bpe_llama3_takes_whole_words_and_adds_bos() -> None:
    # llama3 ignores merges when a word is a token, and asks for BOS unless the file says no.
    tok = Tokenizer.from_metadata(bpe_metadata("llama3", extra=["Ġllama"]))
    assert tok.add_bos and tok.encode(" llama") == [0, tok.tokens.index("Ġllama")]
    gpt2 = Tokenizer.from_metadata(bpe_metadata("gpt2", extra=["Ġllama"]))
    assert len(gpt2.encode(" llama")) == len(" llama")


def test_bpe_missing_pre_is_default() -> None:
    plain = Tokenizer.from_metadata(bpe_metadata(None, HELLO_TOKENS, HELLO_MERGES))
    default = Tokenizer.from_metadata(bpe_metadata("default", HELLO_TOKENS, HELLO_MERGES))
    assert plain.pre == "default"
    assert plain.encode("Hello, world 1234!") == default.encode("Hello, world 1234!")


def test_special_token_partition_rules() -> None:
    extra = ["<|im_start|>", "<|im_end|>", "<tool>", "<tool_call>", "<|eot_id|>"]
    md = bpe_metadata("gpt2", extra)
    kinds = md["tokenizer.ggml.token_type"]
    kinds[-5:] = [3, 1, 4, 4, 4]  # <|im_end|> typed normal; <tool>... user-defined
    tok = Tokenizer.from_metadata(md)
    start, end, tool, tool_call, eot = (tok.tokens.index(t) for t in extra)

    # <|im_end|> and <|eot_id|> end generation, and llama.cpp makes them control tokens.
    assert tok.is_control(end) and tok.is_control(eot) and not tok.is_control(tool)
    assert tok.eog_ids == frozenset({0, end, eot})
    assert tok.eot_id == 0  # the lowest of the EOT-looking tokens: <|endoftext|>
    assert tok.is_eog(end) and not tok.is_eog(start)

    # User-defined tokens always match; control tokens only with special=True.
    ids = tok.encode("<tool>x<|im_start|>")
    assert ids[0] == tool and start not in ids
    assert tok.encode("<tool>x<|im_start|>", special=True) == [tool, tok.encode("x")[0], start]
    # Longest token first: "<tool_call>" is not "<tool>" followed by "_call>".
    assert tok.encode("<tool_call><tool>") == [tool_call, tool]
    assert tok.decode([start, tool]) == b"<tool>"
    assert tok.decode([start, tool], special=True) == b"<|im_start|><tool>"


def test_bpe_malformed_utf8_reads_like_llama() -> None:
    tok = Tokenizer.from_metadata(bpe_metadata("gpt2"))
    replacement = tok.encode("\ufffd")
    # Each byte that does not start a whole sequence is one U+FFFD (b"\xe2\x82" is two).
    assert tok.encode(b"\xe2\x82a") == replacement * 2 + tok.encode("a")
    assert tok.encode(b"\xff") == replacement
    assert tok.encode(b"\xc0\x80") == tok.encode("\x00")  # llama.cpp reads overlong forms


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model 'bert'"):
        Tokenizer.from_metadata(bpe_metadata() | {"tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'no-such-pre'"):
        Tokenizer.from_metadata(bpe_metadata("no-such-pre"))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model is missing"):
        Tokenizer.from_metadata({})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.merges"):
        Tokenizer.from_metadata({k: v for k, v in bpe_metadata().items() if "merges" not in k})
    md = bpe_metadata()
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.token_type has 10 entries"):
        Tokenizer.from_metadata(md | {"tokenizer.ggml.token_type": [1] * 10})
    with pytest.raises(ValueError, match=r"'a' appears twice"):
        Tokenizer.from_metadata(md | {"tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"] + ["a"]})

    tok = Tokenizer.from_metadata(md)
    for bad in (257, -1, 10**9):
        with pytest.raises(ValueError, match=rf"token id {bad} "):
            tok.decode([5, bad])
        with pytest.raises(ValueError, match=rf"token id {bad} "):
            tok.token_to_piece(bad)
    with pytest.raises(TypeError):
        tok.encode(42)  # type: ignore[arg-type]


def test_out_of_range_special_ids_keep_defaults() -> None:
    md = bpe_metadata() | {"tokenizer.ggml.bos_token_id": 999, "tokenizer.ggml.eos_token_id": 5}
    tok = Tokenizer.from_metadata(md)
    assert tok.bos_id == 11 and tok.eos_id == 5  # llama.cpp's default BOS for 'gpt2' is 11


# ---- the real model: llama.cpp's ids ------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Tokenizer:
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_path)
    return Tokenizer.from_metadata({k: f.contents() for k, f in reader.fields.items()})


@pytest.fixture(scope="module")
def golden_cases(golden_tokenizer: dict[str, Any]) -> list[dict[str, Any]]:
    cases = golden_tokenizer["cases"]
    assert len(cases) >= 9
    return cases


@pytest.mark.real_model
def test_smollm2_ids_equal_llama_cpp(smol: Tokenizer, golden_cases: list[dict[str, Any]]):
    for case in golden_cases:
        text, name = case["text"], case["name"]
        with_special = smol.encode(text, special=True)
        assert with_special == case["ids_parse_special"], name
        assert smol.encode(text) == case["ids_no_parse_special"], name
        assert smol.encode(text.encode()) == case["ids_no_parse_special"], name
        assert [smol.tokens[i] for i in with_special] == case["tokens_parse_special"], name


@pytest.mark.real_model
def test_smollm2_round_trip(smol: Tokenizer, golden_cases: list[dict[str, Any]]) -> None:
    for case in golden_cases:
        text = case["text"].encode()
        assert smol.decode(case["ids_no_parse_special"]) == text, case["name"]
        assert smol.decode(case["ids_parse_special"], special=True) == text, case["name"]
    chat = next(c for c in golden_cases if c["name"] == "chatml_special")
    # Control tokens are invisible without special (llama_detokenize, special=False).
    assert smol.decode(chat["ids_parse_special"]) == b"user\nhi there\nassistant\n"


@pytest.mark.real_model
def test_smollm2_vocabulary_facts(smol: Tokenizer) -> None:
    assert smol.n_vocab == 49152 and smol.model == "gpt2" and smol.pre == "smollm"
    assert (smol.bos_id, smol.eos_id, smol.unk_id, smol.pad_id) == (1, 2, 0, 2)
    assert smol.eot_id == 0  # what llama.cpp picks: <|endoftext|>
    assert smol.eog_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>
    assert not smol.add_bos and not smol.add_eos and not smol.add_space_prefix
    assert all(smol.is_control(i) for i in range(17)) and not smol.is_control(17)
    assert smol.encode("hi", add_bos=True) == [1, 6004]


# ---- streaming detokenizer --------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    decoder = StreamingDecoder(tok, **kwargs)
    return [decoder.feed(t) for t in ids] + [decoder.flush()]


def assert_whole_characters(chunks: list[str], text: str) -> None:
    """The chunks of a valid text: together the text, each a run of whole characters."""
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)  # half a character would show as U+FFFD


def test_stream_holds_back_partial_characters(spm_tok: Tokenizer) -> None:
    text = "🐍 Ωmega 日本語 👍🏽🇫🇷 naïve"
    ids = spm_tok.encode(text, add_bos=False)
    chunks = stream(spm_tok, ids)
    assert_whole_characters(chunks, text)
    # 🐍 is four byte tokens after the space piece: nothing shows until the last byte arrives.
    snake = [byte_token(spm_tok, b) for b in "🐍".encode()]
    assert ids[1:5] == snake
    assert chunks[1:5] == ["", "", "", "🐍"]


def test_stream_equals_decode_on_random_tokens(spm_tok: Tokenizer) -> None:
    # Random ids, byte tokens included, make malformed UTF-8: still the same text, U+FFFD and all.
    rng = random.Random(5)
    bytes_ids = [byte_token(spm_tok, b) for b in range(256)]
    for _ in range(300):
        ids = [
            rng.choice(bytes_ids) if rng.random() < 0.6 else rng.randrange(spm_tok.n_vocab)
            for _ in range(rng.randint(0, 20))
        ]
        for special in (False, True):
            expected = spm_tok.decode(ids, special=special).decode("utf-8", "replace")
            assert "".join(stream(spm_tok, ids, special=special)) == expected, ids


def test_stream_invalid_bytes_become_replacement(spm_tok: Tokenizer) -> None:
    ids = [byte_token(spm_tok, b) for b in b"a\xffb\xe2\x82c\xf0\x9f"]
    chunks = stream(spm_tok, ids)
    assert "".join(chunks) == "a\ufffdb\ufffdc\ufffd"
    assert chunks[-1] == "\ufffd"  # the unfinished emoji at the end, on flush


def test_stream_leading_space_rule(spm_tok: Tokenizer) -> None:
    ids = spm_tok.encode("hi there", add_bos=False)
    assert "".join(stream(spm_tok, ids)) == "hi there"
    assert "".join(stream(spm_tok, ids, from_start=False)) == " hi there"
    assert "".join(stream(spm_tok, [1] + ids)) == " hi there"  # after BOS, as decode()
    assert "".join(stream(spm_tok, [1] + ids + [2], special=True)) == "<s> hi there</s>"


def test_stream_unicode_normalization_untouched(spm_tok: Tokenizer) -> None:
    text = "e\u0301 " + unicodedata.normalize("NFC", "e\u0301")
    assert "".join(stream(spm_tok, spm_tok.encode(text, add_bos=False))) == text


@pytest.mark.real_model
def test_stream_smollm2_golden(smol: Tokenizer, golden_cases: list[dict[str, Any]]) -> None:
    for case in golden_cases:
        chunks = stream(smol, case["ids_parse_special"], special=True)
        assert_whole_characters(chunks, case["text"])
    emoji = next(c for c in golden_cases if c["name"] == "emoji")
    chunks = stream(smol, emoji["ids_no_parse_special"])
    # " \xf0\x9f", "\xa6", "\x99": the space at once, the llama when its last byte comes
    assert chunks[3:6] == [" ", "", "🦙"]


def test_lone_surrogates_are_refused(spm_tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="index 3 is a lone surrogate"):
        spm_tok.encode("caf\udce9")
