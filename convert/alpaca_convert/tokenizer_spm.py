"""SentencePiece `tokenizer.model` -> GGUF "llama" vocabulary (pieces, scores, token types)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gguf import TokenType

from .errors import ConvertError
from .vocab import Vocab


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message; enough to read two flags."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield key >> 3, value
        elif wire == 2:
            n, i = _varint(buf, i)
            yield key >> 3, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _adds_dummy_prefix(model_proto: bytes) -> bool:
    """ModelProto.normalizer_spec (field 3) .add_dummy_prefix (field 3, default true)."""
    for number, value in _proto_fields(model_proto):
        if number == 3 and isinstance(value, bytes):
            for inner, flag in _proto_fields(value):
                if inner == 3 and isinstance(flag, int):
                    return bool(flag)
    return True


def spm_vocab(path: Path) -> Vocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        types.append(int(kind))
    special = {name: i for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()),
                                       ("unk", sp.unk_id()), ("pad", sp.pad_id())) if i >= 0}
    try:
        dummy_prefix = _adds_dummy_prefix(sp.serialized_model_proto())
    except ValueError as e:
        raise ConvertError(f"{path}: cannot read the normalizer settings ({e})") from None
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                 special_ids=special, add_space_prefix=dummy_prefix)
