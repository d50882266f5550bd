"""Tiny Llama-3 (byte-level BPE, `llama-bpe`) and Mistral v3 (SentencePiece with control tokens)
vocabularies, their GGUF metadata as convert-weights writes it, and the text set whose token ids
tests/data/llama3_mistral_tokenizer_ids.json holds from llama.cpp (tests/data/README.md).

The tokenizer files themselves are in tests/data (trained once by `train_*` below, so that the
reference ids stay valid whatever a newer trainer would do).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from alpaca_convert.tokenizer import tokenizer_metadata
from conftest import DATA_DIR
from hf_tiny import made_up_text

LLAMA3_TOKENIZER = DATA_DIR / "llama3_tiny_tokenizer.json"
MISTRAL_TOKENIZER = DATA_DIR / "mistral_v3_tiny_tokenizer.model"

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
                  "<|finetune_right_pad_id|>"]
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                   "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]

# Code, numbers, CJK, emoji, contractions, runs of spaces and newlines, special tokens.
TEXTS = {
    "plain": "Hello world! This is a test of the tokenizer.",
    "contractions": "It's John's; they'll've gone, I'M HERE, YOU'RE there, we'd DON'T can't",
    "code": "def square(x: int) -> int:\n    return x ** 2  # ok\n\tprint(f\"{x=}\")\n",
    "numbers": "1234567890 3.14159 -42 1,000,000 2024-12-07 0x1F 12ab34",
    "cjk": "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji": "emoji 😀👍🏽 🇫🇷 ❤️‍🔥 done",
    "accents": "naïve café Ōsaka straße ﬁne مرحبا नमस्ते",
    "spaces": "a  b   c    d\n\n\nend\r\n\r\n  \t  x   ",
    "leading_spaces": "   leading and trailing   ",
    "newlines_only": "\n\n\n",
    "llama3_specials": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral_specials": "<s>[INST] What is 2+2? [/INST] 4</s>[INST]again[/INST][TOOL_CALLS] "
                        "[AVAILABLE_TOOLS][{\"name\": \"f\"}][/AVAILABLE_TOOLS]",
    "made_up": "kalo mitu ranepi, 42. sotu vade!",
    "empty": "",
}


def training_text() -> list[str]:
    return made_up_text(800) + [t for t in TEXTS.values() if t] * 3


def train_llama3_bpe(path: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer.json shaped like Llama 3's: its Split regex + ByteLevel
    pre-tokenizer, ignore_merges, <|begin_of_text|> added by the post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from alpaca_cpu.tokenizer_bpe import LLAMA3_SPLIT

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL)  # after the merges' tokens, as in Llama 3
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(path))
    return path


def train_mistral_spm(path: Path, vocab_size: int = 700) -> Path:
    """A SentencePiece BPE model set up like Mistral v3's: <unk> <s> </s>, then [INST] ...
    [/TOOL_RESULTS] as control pieces, byte fallback, digits split, no normalization."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, control_symbols=MISTRAL_CONTROL,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def vocab_metadata(kind: str, folder: Path) -> dict[str, Any]:
    """The tokenizer.* GGUF metadata convert-weights writes for the stored tokenizer of `kind`
    ("llama3" or "mistral"), from a Hugging Face folder made in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "llama3":
        src = folder / "tokenizer.json"
        src.write_bytes(LLAMA3_TOKENIZER.read_bytes())
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        n_vocab = len(json.loads(src.read_text())["model"]["vocab"]) + len(LLAMA3_SPECIAL)
    else:
        src = folder / "tokenizer.model"
        src.write_bytes(MISTRAL_TOKENIZER.read_bytes())
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "add_bos_token": True, "add_eos_token": False}
        import sentencepiece as spm

        n_vocab = spm.SentencePieceProcessor(model_file=str(src)).GetPieceSize()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    entries, _ = tokenizer_metadata(src, folder, n_vocab)
    return {e.key: e.value for e in entries}


if __name__ == "__main__":  # retrain the stored files (changes every reference id)
    train_llama3_bpe(LLAMA3_TOKENIZER)
    train_mistral_spm(MISTRAL_TOKENIZER)
