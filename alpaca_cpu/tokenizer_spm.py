"""SentencePiece-style vocabulary with scores (GGUF `tokenizer.ggml.model = "llama"`).

llama.cpp's SPM tokenizer replaces spaces by U+2581, splits the text into characters and merges
the adjacent pair whose concatenation is the vocabulary piece with the highest score (leftmost
first on ties) until no pair is a piece; symbols that are not pieces fall back to `<0xNN>` byte
tokens. That is SentencePiece's BPE encoder, so we hand `sentencepiece` a model built from the GGUF
vocabulary (identity normalizer; the dummy-prefix space is added by the caller, because llama.cpp
adds it after every special token, not only at the start of the text).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from enum import IntEnum

import sentencepiece


class TokenType(IntEnum):
    """GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SP_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # the only spelling sentencepiece accepts

# sentencepiece's ModelProto field numbers (sentencepiece_model.proto).
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_NORM_NAME, _NORM_ADD_DUMMY_PREFIX, _NORM_REMOVE_EXTRA_WS, _NORM_ESCAPE_WS = 1, 3, 4, 5
_SP_MODEL_BPE = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> bytes:
    """A serialized sentencepiece ModelProto: BPE, identity normalizer, no dummy prefix."""
    out = bytearray()
    for text, score, kind in zip(pieces, scores, types):
        piece = _pb_bytes(_PIECE_TEXT, text.encode("utf-8")) + _pb_float(_PIECE_SCORE, score)
        out += _pb_bytes(_MODEL_PIECES, piece + _pb_varint(_PIECE_TYPE, kind))
    trainer = _pb_varint(_TRAINER_MODEL_TYPE, _SP_MODEL_BPE) + _pb_varint(
        _TRAINER_VOCAB_SIZE, len(pieces)
    )
    if TokenType.BYTE in types:
        trainer += _pb_varint(_TRAINER_BYTE_FALLBACK, 1)
    normalizer = (
        _pb_bytes(_NORM_NAME, b"identity")
        + _pb_varint(_NORM_ADD_DUMMY_PREFIX, 0)
        + _pb_varint(_NORM_REMOVE_EXTRA_WS, 0)
        + _pb_varint(_NORM_ESCAPE_WS, 1)
    )
    out += _pb_bytes(_MODEL_TRAINER, trainer) + _pb_bytes(_MODEL_NORMALIZER, normalizer)
    return bytes(out)


# UTF-8 sequence length from the high nibble of the first byte, as llama.cpp's unicode_len_utf8.
_UTF8_LEN = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)
_ESCAPED_SPACE = "\u2581".encode()


class SpmEncoder:
    """Encodes text fragments (special tokens already split off) with the SPM algorithm."""

    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        types: Sequence[TokenType],
        unk_id: int | None,
        add_space_prefix: bool,
    ) -> None:
        self._add_space_prefix = add_space_prefix
        self._n_vocab = len(tokens)
        sp_types = [_sentencepiece_type(text, kind) for text, kind in zip(tokens, types)]
        pieces = list(tokens)
        sp_scores = list(scores)
        # sentencepiece needs exactly one unknown piece: keep the first, demote the others.
        unknown = [i for i, kind in enumerate(sp_types) if kind == TokenType.UNKNOWN]
        for i in unknown[1:]:
            sp_types[i] = TokenType.CONTROL
        if not unknown:
            if unk_id is not None:
                sp_types[unk_id] = TokenType.UNKNOWN
            else:  # a stand-in past the end of the vocabulary, never a real id
                stand_in, taken = "<unk>", set(tokens)
                while stand_in in taken:
                    stand_in += "_"
                pieces.append(stand_in)
                sp_scores.append(0.0)
                sp_types.append(TokenType.UNKNOWN)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(
                model_proto=_model_proto(pieces, sp_scores, sp_types)
            )
        except RuntimeError as e:  # e.g. byte pieces missing, a NUL inside a piece
            raise ValueError(f"tokenizer.ggml.tokens: not a usable SentencePiece vocabulary: {e}") \
                from None
        # llama.cpp's byte_to_token: the <0xNN> piece, else the one-byte piece, else nothing.
        ids = {text: i for i, text in enumerate(tokens)}
        self._byte_ids: list[int | None] = []
        for b in range(256):
            found = ids.get(f"<0x{b:02X}>")
            if found is None and b < 0x80:
                found = ids.get(chr(b))
            self._byte_ids.append(found)

    def encode(self, fragment: str | bytes, after_special: bool) -> list[int]:
        """Token ids of one text fragment.

        `after_special`: the fragment starts the text or follows a special token; llama.cpp then
        puts the add_space_prefix space in front of it.
        """
        if isinstance(fragment, str):
            text = " " + fragment if self._add_space_prefix and after_special else fragment
            return self._checked(self._sp.encode(text))
        return self._encode_malformed(fragment, self._add_space_prefix and after_special)

    def _checked(self, ids: list[int]) -> list[int]:
        if ids and max(ids) >= self._n_vocab:
            raise ValueError("text needs the unknown token, but the vocabulary has none")
        return ids

    def _bytes_to_ids(self, data: bytes) -> list[int]:
        out = []
        for b in data:
            token = self._byte_ids[b]
            if token is None:
                raise ValueError(f"no byte token <0x{b:02X}> in the vocabulary for byte 0x{b:02X}")
            out.append(token)
        return out

    def _encode_malformed(self, data: bytes, space_prefix: bool) -> list[int]:
        """Malformed UTF-8. llama.cpp cuts symbols by the length the first byte announces, so a
        bad symbol (possibly swallowing good bytes after it) is never part of a piece and becomes
        byte tokens; the well-formed runs between bad symbols encode as usual. Spaces become
        U+2581 before the cut, as in llama.cpp, so a bad symbol can swallow part of one."""
        if space_prefix:
            data = b" " + data
        data = data.replace(b" ", _ESCAPED_SPACE)
        out: list[int] = []
        run_start = pos = 0
        while pos < len(data):
            end = min(pos + _UTF8_LEN[data[pos] >> 4], len(data))
            symbol = data[pos:end]
            try:
                symbol.decode("utf-8")
            except UnicodeDecodeError:
                if run_start < pos:
                    out += self._checked(self._sp.encode(data[run_start:pos].decode("utf-8")))
                out += self._bytes_to_ids(symbol)
                run_start = end
            pos = end
        if run_start < len(data):
            out += self._checked(self._sp.encode(data[run_start:].decode("utf-8")))
        return out


def _sentencepiece_type(text: str, kind: TokenType) -> TokenType:
    """The sentencepiece piece type that makes sentencepiece merge like llama.cpp."""
    if kind in (TokenType.UNKNOWN, TokenType.CONTROL, TokenType.USER_DEFINED):
        return kind
    # llama.cpp falls back to "<0xNN>" pieces by their text, whatever their type.
    if _SP_BYTE_PIECE.fullmatch(text):
        return TokenType.BYTE
    # It merges into any other piece it finds, unused or of no known type alike.
    return TokenType.NORMAL
