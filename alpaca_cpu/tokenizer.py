"""Tokenizer and streaming detokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.

Token ids follow llama.cpp (src/llama-vocab.cpp at c392e50): the same special-token defaults and
auto-detection, the same splitting of special tokens out of the text, the same SPM and BPE
algorithms (run by `sentencepiece` and `tokenizers`, see tokenizer_spm.py / tokenizer_bpe.py) and
the same pieces when decoding.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, AnyStr

from .tokenizer_bpe import PRE_TOKENIZERS, BpeEncoder, byte_level_to_bytes
from .tokenizer_spm import BYTE_PIECE, SpmEncoder, TokenType

__all__ = ["StreamingDecoder", "TokenType", "Tokenizer"]

log = logging.getLogger(__name__)

_KEY = "tokenizer.ggml."
MODEL_KEY = _KEY + "model"
PRE_KEY = _KEY + "pre"

# Token texts llama.cpp (src/llama-vocab.cpp at 0c1e570) treats as end of generation, and the
# ones it picks an EOT token from when the file names none. llama.cpp takes whichever its hash
# map yields first; we take the lowest id, which is llama.cpp's pick on SmolLM2 (<|endoftext|>
# before <|im_end|>).
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
# Fill-in-the-middle tokens: metadata keys (newest first) and texts llama.cpp recognises. The
# pad / repo / file-separator ones also end generation.
_FIM: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pre": (("fim_pre_token_id", "prefix_token_id"),
            ("<|fim_prefix|>", "<fim-prefix>", "<｜fim▁begin｜>", "<PRE>")),
    "suf": (("fim_suf_token_id", "suffix_token_id"),
            ("<|fim_suffix|>", "<fim-suffix>", "<｜fim▁hole｜>", "<SUF>")),
    "mid": (("fim_mid_token_id", "middle_token_id"),
            ("<|fim_middle|>", "<fim-middle>", "<｜fim▁end｜>", "<MID>")),
    "pad": (("fim_pad_token_id",), ("<|fim_pad|>", "<fim-pad>", "<PAD>")),
    "rep": (("fim_rep_token_id",), ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>")),
    "sep": (("fim_sep_token_id",), ("<|file_sep|>",)),
}  # fmt: skip

_ID_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "eot": "eot_token_id",
    "eom": "eom_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}

_TOKEN_TYPES = {int(t): t for t in TokenType}  # values outside the enum: UNDEFINED

_ESCAPED_SPACE = "\u2581"  # SentencePiece's "▁"


@dataclass(frozen=True)
class _Special:
    """A token that is cut out of the text before the text is tokenized."""

    text: str
    data: bytes  # text as UTF-8, for input that is not valid UTF-8
    id: int
    only_if_special: bool  # control and unknown tokens; user-defined ones are always matched


class Tokenizer:
    """The vocabulary of a GGUF file: text <-> token ids, as llama.cpp does it."""

    model: str  # tokenizer.ggml.model: "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    pre: str | None  # tokenizer.ggml.pre for "gpt2" ("default" when the file has none)
    tokens: tuple[str, ...]  # token texts as stored in the file (▁ / byte-level characters)
    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool  # encode() with add_bos=None puts BOS first
    add_eos: bool  # encode() with add_bos=None or True puts EOS last
    add_space_prefix: bool  # SPM: a space before the text and after each special token
    eog_ids: frozenset[int]  # tokens that end generation

    def __init__(self) -> None:
        raise TypeError("use Tokenizer.from_metadata(metadata)")

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (key -> value as `gguf.ReaderField.contents()` returns it)."""
        self = object.__new__(cls)
        model = _get(metadata, "model", str)
        if model is None:
            raise ValueError(f"{MODEL_KEY} is missing: the file has no tokenizer")
        if model not in ("llama", "gpt2"):
            raise ValueError(f"unknown {MODEL_KEY} {model!r}: supported are 'llama' and 'gpt2'")
        self.model = model

        tokens = _get(metadata, "tokens", list)
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{_KEY}tokens must be a non-empty list of strings")
        # llama.cpp renames empty tokens so that every text maps to one id.
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n_vocab = len(tokens)
        self._check_unique(tokens)
        self.tokens = tuple(tokens)
        self.n_vocab = n_vocab

        scores = _get_array(metadata, "scores", (int, float), n_vocab)
        raw_types = _get_array(metadata, "token_type", int, n_vocab) or [1] * n_vocab
        file_types = [_TOKEN_TYPES.get(t, TokenType.UNDEFINED) for t in raw_types]

        ids = self._read_settings(metadata, n_vocab)
        types = list(file_types)
        eog = _detect_by_text(ids, types, {text: i for i, text in enumerate(tokens)})
        self.bos_id, self.eos_id, self.eot_id = ids["bos"], ids["eos"], ids["eot"]
        self.eom_id, self.unk_id, self.pad_id = ids["eom"], ids["unk"], ids["pad"]
        self.eog_ids = frozenset(eog)
        self._types = types

        if model == "llama":
            self._encoder: SpmEncoder | BpeEncoder = SpmEncoder(
                tokens, scores or [0.0] * n_vocab, file_types, self.unk_id, self.add_space_prefix
            )
        else:
            merges = _get(metadata, "merges", list)
            if merges is None or not all(isinstance(m, str) for m in merges):
                raise ValueError(f"{_KEY}merges (a list of strings) is required for 'gpt2'")
            self._encoder = BpeEncoder(tokens, merges, PRE_TOKENIZERS[self.pre or "default"])

        # Tokens cut out of the text first, longest first (llama.cpp's cache_special_tokens).
        specials = [
            _Special(tokens[i], tokens[i].encode(), i, kind != TokenType.USER_DEFINED)
            for i, kind in enumerate(types)
            if kind in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
        ]
        specials.sort(key=lambda s: (-len(s.data), s.id))
        self._specials = specials
        self._special_firsts = frozenset(s.text[0] for s in specials)

        self._pieces, self._special_pieces = self._build_pieces()
        return self

    def _read_settings(self, metadata: Mapping[str, Any], n_vocab: int) -> dict[str, int | None]:
        """Set pre / add_bos / add_eos / add_space_prefix; return the special token ids.

        llama.cpp's defaults per tokenizer kind come first, then the file's own keys. Ids the file
        gets wrong (past the vocabulary) keep the default, as in llama.cpp.
        """
        if self.model == "llama":
            self.pre = None
            ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
            self.add_bos, self.add_space_prefix = True, True
        else:
            pre_name = _get(metadata, "pre", str) or "default"  # llama.cpp warns and goes on
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise ValueError(
                    f"unknown {PRE_KEY} {pre_name!r}: supported are {sorted(PRE_TOKENIZERS)}"
                )
            self.pre = pre_name
            ids = {"bos": 11 if pre.has_bos else None, "eos": 11, "unk": None}
            self.add_bos, self.add_space_prefix = pre.add_bos, False
        self.add_eos = False
        for attr, key in (
            ("add_bos", "add_bos_token"),
            ("add_eos", "add_eos_token"),
            ("add_space_prefix", "add_space_prefix"),
        ):
            value = _get(metadata, key, bool)
            if value is not None:
                setattr(self, attr, value)

        for name, key in _ID_KEYS.items():
            ids[name] = _get_token_id(metadata, key, n_vocab, ids.get(name))
        for name, (keys, _) in _FIM.items():
            ids["fim_" + name] = None
            for key in keys:
                ids["fim_" + name] = _get_token_id(metadata, key, n_vocab, ids["fim_" + name])
        # A default can lie past the end of a small vocabulary.
        return {name: i if i is not None and i < n_vocab else None for name, i in ids.items()}

    @staticmethod
    def _check_unique(tokens: list[str]) -> None:
        if len(set(tokens)) != len(tokens):
            seen: dict[str, int] = {}
            for i, text in enumerate(tokens):
                if text in seen:
                    raise ValueError(
                        f"{_KEY}tokens: {text!r} appears twice (ids {seen[text]} and {i})"
                    )
                seen[text] = i

    def _build_pieces(self) -> tuple[list[bytes], list[bytes]]:
        """Bytes of every token, without and with special tokens rendered (token_to_piece)."""
        plain: list[bytes] = []
        special: list[bytes] = []
        for text, kind in zip(self.tokens, self._types):
            if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
                plain.append(b"")
                special.append(text.encode())
                continue
            if kind == TokenType.USER_DEFINED:
                piece = text.encode()
            elif kind == TokenType.NORMAL:
                if self.model == "llama":
                    piece = text.replace(_ESCAPED_SPACE, " ").encode()
                else:
                    piece = byte_level_to_bytes(text)
            elif kind == TokenType.BYTE and self.model == "llama":
                match = BYTE_PIECE.fullmatch(text)
                piece = bytes([int(match.group(1), 16)]) if match else b""
            else:  # unused and untyped tokens, BPE byte tokens: llama.cpp prints nothing
                piece = b""
            plain.append(piece)
            special.append(piece)
        return plain, special

    # ---- queries --------------------------------------------------------------------------

    def _check_id(self, token: int) -> int:
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token id {token} is out of range [0, {self.n_vocab})")
        return token

    def is_control(self, token: int) -> bool:
        """Control token (BOS, EOS, <|im_start|> ...): invisible when decoding without special."""
        return self._types[self._check_id(token)] == TokenType.CONTROL

    def is_eog(self, token: int) -> bool:
        """End-of-generation token (EOS, EOT, EOM or one llama.cpp recognises by its text)."""
        return token in self.eog_ids

    def token_type(self, token: int) -> TokenType:
        return self._types[self._check_id(token)]

    # ---- encoding -------------------------------------------------------------------------

    def encode(
        self, text: str | bytes, add_bos: bool | None = None, special: bool = False, *,
        what: str = "text",
    ) -> list[int]:
        """Token ids of `text` (str, or UTF-8 bytes; malformed bytes are handled as llama.cpp does).

        add_bos: None -> BOS if the file asks for it (add_bos_token), True -> always BOS,
            False -> no BOS. EOS is appended when the file asks for it (add_eos_token) unless
            add_bos is False (llama.cpp's add_special).
        special: control tokens written in the text (such as "<|im_start|>") become their ids;
            otherwise they are tokenized as plain text. User-defined tokens always match.
        what: how the ValueError for a str that is not valid Unicode names the text.
        """
        if isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data  # type: ignore[assignment]  (kept as bytes: see the encoders)
        elif not isinstance(text, str):
            raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
        else:
            check_unicode(text, what)

        out: list[int] = []
        if add_bos or (add_bos is None and self.add_bos):
            if self.bos_id is None:
                raise ValueError("cannot add BOS: the vocabulary has no BOS token")
            out.append(self.bos_id)
        after_special = True  # SPM puts its space prefix at the start and after special tokens
        for fragment in self._split_specials(text, special):
            if isinstance(fragment, int):
                out.append(fragment)
                after_special = True
            else:
                out += self._encoder.encode(fragment, after_special)
                after_special = False
        if add_bos is not False and self.add_eos:
            if self.eos_id is None:
                raise ValueError("cannot add EOS: the vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def encode_plain(self, text: bytes) -> list[int]:
        """Token ids of `text` as a continuation of other text, exactly its bytes: no BOS/EOS,
        no SentencePiece space prefix, no special tokens (what a grammar engine needs)."""
        data = bytes(text)
        try:
            return self._encoder.encode(data.decode("utf-8"), False)
        except UnicodeDecodeError:
            return self._encoder.encode(data, False)

    def _split_specials(self, text: AnyStr, special: bool) -> list[AnyStr | int]:
        """Cut special tokens out of the text: longest token first, each everywhere it occurs in
        what is left (llama.cpp's tokenizer_st_partition)."""
        if not text:
            return []
        if isinstance(text, str):
            firsts = {c for c in self._special_firsts if c in text}
            candidates = [
                (s.text, s.id)
                for s in self._specials
                if s.text[0] in firsts and (special or not s.only_if_special) and s.text in text
            ]
        else:
            candidates = [
                (s.data, s.id)
                for s in self._specials
                if (special or not s.only_if_special) and s.data in text
            ]
        fragments: list[AnyStr | int] = [text]
        for needle, token in candidates:
            cut: list[AnyStr | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or needle not in fragment:
                    cut.append(fragment)
                    continue
                for i, part in enumerate(fragment.split(needle)):
                    if i:
                        cut.append(token)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    # ---- decoding -------------------------------------------------------------------------

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; control and unknown tokens are empty unless `special`."""
        pieces = self._special_pieces if special else self._pieces
        return pieces[self._check_id(token)]

    def decode(
        self, tokens: Iterable[int], *, special: bool = False, from_start: bool = True
    ) -> bytes:
        """Bytes of a token sequence (llama.cpp's llama_detokenize without its clean-up pass).

        special: render control tokens as their text.
        from_start: the tokens begin the text, so the space that add_space_prefix put before the
            first token is dropped, as llama.cpp does. Pass False for a continuation (a completion
            after its prompt) to keep that space.
        """
        ids = list(tokens)
        if not ids:
            return b""
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.n_vocab:
            self._check_id(low if low < 0 else high)
        pieces = self._special_pieces if special else self._pieces
        out = [pieces[t] for t in ids]
        if from_start and self.add_space_prefix and out[0][:1] == b" ":
            out[0] = out[0][1:]
        return b"".join(out)

    def __repr__(self) -> str:
        kind = "SPM" if self.model == "llama" else f"BPE pre={self.pre!r}"
        return f"<Tokenizer {kind} n_vocab={self.n_vocab} bos={self.bos_id} eos={self.eos_id}>"


class StreamingDecoder:
    """Turns tokens into text as they come, never splitting a UTF-8 character.

    Bytes of a character spread over several tokens are held back until the character is whole;
    malformed sequences become U+FFFD. feed() + ... + flush() equals
    `tokenizer.decode(all_tokens).decode("utf-8", "replace")`.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False, *, from_start: bool = True):
        """special: render control tokens as text. from_start: as in Tokenizer.decode."""
        self._tokenizer = tokenizer
        self._special = special
        self._strip_space = from_start and tokenizer.add_space_prefix
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """The characters that this token completes (possibly "")."""
        piece = self._tokenizer.token_to_piece(token, self._special)
        if self._strip_space:  # only ever the very first token, as in decode()
            self._strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """What is left at the end: an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


def check_unicode(text: str, what: str = "text") -> None:
    """ValueError, naming `what`, unless `text` is valid Unicode: lone surrogates (undecodable
    argv/stdin, JSON "\\udcff") are not text and have no UTF-8 encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: U+{ord(text[e.start]):04X} at index "
                         f"{e.start} is a lone surrogate") from None


def _detect_by_text(
    ids: dict[str, int | None], types: list[TokenType], id_of: Mapping[str, int]
) -> set[int]:
    """llama.cpp's recognition of special tokens by their text; returns the EOG ids.

    EOT, EOM and FIM ids the file does not name are looked up by text, and the tokens found, like
    every token whose text marks an end of generation, become control tokens (`types` changes).
    """
    for name, texts in [("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",))] + [
        ("fim_" + name, texts) for name, (_, texts) in _FIM.items()
    ]:
        if ids[name] is None:
            found = min((id_of[t] for t in texts if t in id_of), default=None)
            if found is not None:
                ids[name] = found
                types[found] = TokenType.CONTROL
    eog = {ids[k] for k in ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")}
    for text in _EOG_TEXTS:
        if text in id_of:
            eog.add(id_of[text])
            types[id_of[text]] = TokenType.CONTROL
    # gpt-oss / solar-open: there "<|end|>" ends a message, not the generation
    has = {text for text in ("<|return|>", "<|call|>", "<|calls|>", "<|flush|>", "<|end|>")
           if text in id_of and id_of[text] in eog}
    has_call = bool(has & {"<|call|>", "<|calls|>"})
    if "<|end|>" in has and has_call and bool(has & {"<|return|>", "<|flush|>"}):
        eog.discard(id_of["<|end|>"])
        types[id_of["<|end|>"]] = TokenType.USER_DEFINED
    return {i for i in eog if i is not None}


# ---- metadata access ------------------------------------------------------------------------


def _get(metadata: Mapping[str, Any], name: str, kind: type) -> Any:
    key = _KEY + name
    value = metadata.get(key)
    if value is None:
        return None
    if kind is bool and isinstance(value, int):  # a bool stored as an integer still means it
        return bool(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} should be {kind.__name__}, found {type(value).__name__}")
    return value


def _get_array(
    metadata: Mapping[str, Any], name: str, item: type | tuple[type, ...], length: int
) -> list[Any] | None:
    values = _get(metadata, name, list)
    if values is None:
        return None
    if len(values) != length:
        raise ValueError(f"{_KEY}{name} has {len(values)} entries, expected {length} (one a token)")
    if not all(isinstance(v, item) for v in values):
        raise ValueError(f"{_KEY}{name} has entries of the wrong type")
    return values


def _get_token_id(
    metadata: Mapping[str, Any], name: str, n_vocab: int, default: int | None
) -> int | None:
    value = _get(metadata, name, int)
    if value is None:
        return default
    if not 0 <= value < n_vocab:  # llama.cpp warns and keeps its default
        log.warning("%s%s = %d is not a token id (n_vocab %d); ignored", _KEY, name, value, n_vocab)
        return default
    return value
