"""The tokenizer a checkpoint folder ships, as GGUF `tokenizer.*` metadata.

SentencePiece `tokenizer.model` is preferred (it is the original for LLaMA); otherwise a
byte-level BPE `tokenizer.json`. `tokenizer_config.json` (and config.json) name the special
tokens, whether BOS/EOS are added, and the chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFValueType as V
from gguf import TokenType

from . import metadata as kv
from .errors import ConvertError
from .json_file import read_json_object
from .metadata import KeyValue
from .tokenizer_bpe import bpe_vocab
from .tokenizer_spm import spm_vocab
from .tokenizer_tiktoken import is_tiktoken, tiktoken_vocab
from .vocab import Vocab

_SPECIAL_NAMES = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                  "pad": "padding_token_id"}


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON file: {} when absent."""
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_tokenizer(folder: Path, search_parent: bool = False) -> Path:
    """tokenizer.model, else tokenizer.json (Meta releases keep tokenizer.model one level up)."""
    places = [folder, folder.parent] if search_parent else [folder]
    for place in places:
        for name in ("tokenizer.model", "tokenizer.json"):
            if (place / name).is_file():
                return place / name
    where = " or its parent" if search_parent else ""
    raise ConvertError(f"{folder}: missing tokenizer: expected tokenizer.model (SentencePiece) or "
                       f"tokenizer.json in this folder{where}")


def _add_hf_tokens(vocab: Vocab, tok_cfg: dict[str, Any], folder: Path, n_vocab: int) -> None:
    """Tokens added on top of a SentencePiece model (added_tokens_decoder / added_tokens.json)."""
    added: dict[int, tuple[str, bool]] = {}
    for text, i in _read_json(folder / "added_tokens.json").items():
        added[int(i)] = (text, False)
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    for i, info in decoder.items():
        if isinstance(info, dict) and isinstance(info.get("content"), str):
            added[int(i)] = (info["content"], bool(info.get("special")))
    for i, (text, special) in sorted(added.items()):
        if i >= n_vocab:
            raise ConvertError(f"{folder}: added token {text!r} has id {i}, but the model has "
                               f"only {n_vocab} embedding rows")
        if i >= len(vocab.tokens):
            vocab.pad_to(i + 1)
        elif vocab.tokens[i] == text:
            continue  # the SentencePiece piece itself (e.g. <s>): keep its own type and score
        kind = TokenType.CONTROL if special else TokenType.USER_DEFINED
        vocab.set_token(i, text, int(kind))


def _chat_templates(folder: Path, tok_cfg: dict[str, Any]) -> list[KeyValue]:
    template = tok_cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"  # newer transformers save it beside the config
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str):
        return [kv.string("tokenizer.chat_template", template)]
    if isinstance(template, list):  # [{"name": ..., "template": ...}], "default" is the main one
        entries, names = [], []
        for item in template:
            name, text = item.get("name"), item.get("template")
            if not (isinstance(name, str) and isinstance(text, str)):
                continue
            if name == "default":
                entries.append(kv.string("tokenizer.chat_template", text))
            else:
                names.append(name)
                entries.append(kv.string(f"tokenizer.chat_template.{name}", text))
        if names:
            entries.append(kv.array("tokenizer.chat_templates", names, V.STRING))
        return entries
    return []


def tokenizer_metadata(path: Path, folder: Path, n_vocab: int,
                       hf_config: dict[str, Any] | None = None,
                       add_bos_eos: tuple[bool, bool] | None = None,
                       llama31: bool = True) -> tuple[list[KeyValue], str]:
    """GGUF tokenizer keys for the tokenizer file `path` (configs read from `folder`), and a
    one-line description. `add_bos_eos` is written when no file says otherwise; `llama31`
    picks Llama 3.1's special-token names over 3.0's for a tiktoken `tokenizer.model`."""
    if path.suffix != ".model":
        vocab = bpe_vocab(path)
    elif is_tiktoken(path):
        vocab = tiktoken_vocab(path, n_vocab, llama31)
    else:
        vocab = spm_vocab(path)
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    if vocab.model == "llama":
        _add_hf_tokens(vocab, tok_cfg, folder, n_vocab)
    if len(vocab.tokens) > n_vocab:
        raise ConvertError(f"{path}: {len(vocab.tokens)} tokens, but the model has only "
                           f"{n_vocab} embedding rows")
    vocab.pad_to(n_vocab)

    # Special ids: tokenizer_config by text, then config.json by id, then the tokenizer itself.
    token_id = {text: i for i, text in enumerate(vocab.tokens)}
    ids: dict[str, int] = {}
    for name in _SPECIAL_NAMES:
        text = _token_text(tok_cfg.get(f"{name}_token"))
        if text is not None and text in token_id:
            ids[name] = token_id[text]
            continue
        value = (hf_config or {}).get(f"{name}_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_vocab:
            ids[name] = value
        elif name in vocab.special_ids:
            ids[name] = vocab.special_ids[name]

    entries = [kv.string("tokenizer.ggml.model", vocab.model),
               kv.string("tokenizer.ggml.pre", vocab.pre),
               kv.array("tokenizer.ggml.tokens", vocab.tokens, V.STRING),
               kv.array("tokenizer.ggml.token_type", vocab.types, V.INT32)]
    if vocab.scores is not None:
        entries.append(kv.array("tokenizer.ggml.scores", vocab.scores, V.FLOAT32))
    if vocab.merges:
        entries.append(kv.array("tokenizer.ggml.merges", vocab.merges, V.STRING))
    for name, key in _SPECIAL_NAMES.items():
        if name in ids:
            entries.append(kv.u32(f"tokenizer.ggml.{key}", ids[name]))
    for j, (what, own) in enumerate((("bos", vocab.add_bos), ("eos", vocab.add_eos))):
        value = tok_cfg.get(f"add_{what}_token", own)
        if value is None and add_bos_eos is not None:
            value = add_bos_eos[j]
        if isinstance(value, bool):
            entries.append(kv.boolean(f"tokenizer.ggml.add_{what}_token", value))
    if vocab.add_space_prefix is False:
        entries.append(kv.boolean("tokenizer.ggml.add_space_prefix", False))
    entries += _chat_templates(folder, tok_cfg)

    kind = "SentencePiece" if vocab.model == "llama" else f"BPE (pre-tokenizer {vocab.pre})"
    if vocab.model == "gpt2" and path.suffix == ".model":
        kind = f"tiktoken BPE (pre-tokenizer {vocab.pre})"
    return entries, f"{kind} from {path.name}, {len(vocab.tokens)} tokens"
