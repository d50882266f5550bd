"""A tokenizer vocabulary as GGUF stores it, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from gguf import TokenType


@dataclass
class Vocab:
    """Tokens by id, with what GGUF's `tokenizer.ggml.*` keys need."""

    model: str  # "llama" (SentencePiece, scores) or "gpt2" (byte-level BPE, merges)
    pre: str  # llama.cpp's pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    scores: list[float] | None = None
    merges: list[str] | None = None
    # Special token ids the tokenizer file itself names (bos, eos, unk, pad).
    special_ids: dict[str, int] = field(default_factory=dict)
    add_space_prefix: bool | None = None  # written only when False (llama.cpp's default is True)
    add_bos: bool | None = None  # what the tokenizer's own post-processor does, if it says
    add_eos: bool | None = None

    def set_token(self, token_id: int, text: str, token_type: int) -> None:
        self.tokens[token_id] = text
        self.types[token_id] = token_type
        if self.scores is not None:
            self.scores[token_id] = -1000.0  # added tokens never win a SentencePiece merge

    def pad_to(self, n_vocab: int) -> None:
        """Fill ids the tokenizer lacks but the embedding has, as llama.cpp does."""
        for i in range(len(self.tokens), n_vocab):
            self.tokens.append(f"[PAD{i}]")
            self.types.append(int(TokenType.UNUSED))
            if self.scores is not None:
                self.scores.append(-1000.0)
