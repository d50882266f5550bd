"""Llama-3 (`llama-bpe`) and Mistral v3 (SentencePiece with control tokens) vocabularies give
llama.cpp's token ids and end-of-generation tokens (tests/data/llama3_mistral_tokenizer_ids.json,
made by tests/data/make_tokenizer_reference.py on the stored tiny tokenizers converted as
convert-weights converts them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import DATA_DIR
from llama3_mistral_vocab import TEXTS, vocab_metadata

from alpaca_cpu.tokenizer import Tokenizer, TokenType

REFERENCE = json.loads((DATA_DIR / "llama3_mistral_tokenizer_ids.json").read_text())
KINDS = sorted(REFERENCE["vocabularies"])


@pytest.fixture(scope="module", params=KINDS)
def vocab(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Tokenizer]:
    kind = request.param
    md = vocab_metadata(kind, tmp_path_factory.mktemp(kind))
    digest = hashlib.sha256(json.dumps(md, sort_keys=True).encode()).hexdigest()
    assert digest == REFERENCE["vocabularies"][kind]["vocab_sha256"], \
        f"{kind}: the converted vocabulary differs from the one llama.cpp tokenized with"
    return kind, md, Tokenizer.from_metadata(md)


def test_every_text_is_in_the_reference() -> None:
    for kind in KINDS:
        cases = REFERENCE["vocabularies"][kind]["cases"]
        assert {name: c["text"] for name, c in cases.items()} == TEXTS


def test_ids_equal_llama_cpp(vocab: tuple[str, dict, Tokenizer]) -> None:
    kind, _, tok = vocab
    for name, case in REFERENCE["vocabularies"][kind]["cases"].items():
        text = case["text"]
        assert tok.encode(text, special=True) == case["ids_add_special_parse_special"], name
        assert tok.encode(text, add_bos=False) == case["ids_no_special"], name
        assert tok.encode(text.encode(), add_bos=False) == case["ids_no_special"], name


def test_round_trip(vocab: tuple[str, dict, Tokenizer]) -> None:
    kind, _, tok = vocab
    for name, text in TEXTS.items():
        ids = tok.encode(text, add_bos=False, special=True)
        if kind == "llama3":  # byte-level BPE keeps every byte (SentencePiece drops its space)
            assert tok.decode(ids, special=True) == text.encode(), name
        else:
            assert tok.decode(ids, special=True).replace(b" ", b"") == \
                text.encode().replace(b" ", b""), name


def test_end_of_generation_tokens_equal_llama_cpp(vocab: tuple[str, dict, Tokenizer]) -> None:
    kind, md, tok = vocab
    assert sorted(tok.eog_ids) == REFERENCE["vocabularies"][kind]["eog"]
    names = {md["tokenizer.ggml.tokens"][i] for i in tok.eog_ids}
    assert names == ({"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"} if kind == "llama3"
                     else {"</s>"})


def test_mistral_control_tokens(tmp_path: Path) -> None:
    md = vocab_metadata("mistral", tmp_path)
    tok = Tokenizer.from_metadata(md)
    ids = {text: i for i, text in enumerate(md["tokenizer.ggml.tokens"])}
    for text in ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]"):
        assert tok.token_type(ids[text]) == TokenType.CONTROL
        assert tok.encode(text, add_bos=False, special=True) == [ids[text]]
        assert ids[text] not in tok.encode(text, add_bos=False)  # plain text without special
