"""Hugging Face `tokenizer.json` (byte-level BPE) -> GGUF "gpt2" vocabulary, merges and the
name of the pre-tokenizer llama.cpp must use.

llama.cpp cannot run the pre-tokenizer a tokenizer.json describes; it has a fixed set of named
ones (`tokenizer.ggml.pre`). We recognise the description by its structure and refuse the rest:
a wrong name would silently give different token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import TokenType

from alpaca_cpu.tokenizer_bpe import LLAMA3_SPLIT, QWEN2_SPLIT

from .errors import ConvertError
from .vocab import Vocab

# Structure of the pre_tokenizer -> llama.cpp's name for it.
_KNOWN_PRE: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM / StarCoder: digits one by one
    (("Split", LLAMA3_SPLIT, "Isolated"), ("ByteLevel", False)): "llama-bpe",  # Llama 3
    (("Split", QWEN2_SPLIT, "Isolated"), ("ByteLevel", False)): "qwen2",
}


def _pre_signature(pre: Any) -> tuple[tuple[Any, ...], ...]:
    if not isinstance(pre, dict):
        return ()
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig: list[tuple[Any, ...]] = []
    for step in steps:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "ByteLevel":
            sig.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            sig.append((kind, bool(step.get("individual_digits", False))))
        elif kind == "Split":
            pattern = step.get("pattern") or {}
            sig.append((kind, pattern.get("Regex", pattern.get("String")), step.get("behavior")))
        else:
            sig.append((kind,))
    return tuple(sig)


def _looks_special(text: str) -> bool:
    """Added tokens like <|im_start|> are control tokens even when not flagged special."""
    return text.startswith("<|") and text.endswith("|>")


def _template_adds(post: Any) -> tuple[bool | None, bool | None]:
    """(adds BOS, adds EOS) according to a TemplateProcessing post-processor."""
    if not isinstance(post, dict):
        return None, None
    if post.get("type") == "Sequence":
        for step in post.get("processors", []):
            found = _template_adds(step)
            if found != (None, None):
                return found
        return False, False
    if post.get("type") != "TemplateProcessing":
        return False, False
    single = post.get("single") or []
    is_special = [isinstance(s, dict) and "SpecialToken" in s for s in single]
    return bool(single and is_special[0]), bool(len(single) > 1 and is_special[-1])


def bpe_vocab(path: Path) -> Vocab:
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        model = tok["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{path}: not a tokenizers JSON file ({type(e).__name__}: {e})") \
            from None
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: tokenizer model {model.get('type')!r}, expected 'BPE'")
    if model.get("byte_fallback"):
        raise ConvertError(f"{path}: a SentencePiece-style BPE (byte_fallback); put the original "
                           "tokenizer.model beside it")
    signature = _pre_signature(tok.get("pre_tokenizer"))
    pre = _KNOWN_PRE.get(signature)
    if pre is None:
        raise ConvertError(f"{path}: pre-tokenizer {list(signature)!r} has no llama.cpp name we "
                           f"know (known: {', '.join(sorted(set(_KNOWN_PRE.values())))})")

    by_id: dict[int, tuple[str, int]] = {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ConvertError(f"{path}: model.vocab is not an object")
    for text, i in vocab.items():
        by_id[int(i)] = (text, int(TokenType.NORMAL))
    for added in tok.get("added_tokens") or []:
        text, i = added["content"], int(added["id"])
        kind = TokenType.CONTROL if added.get("special") or _looks_special(text) \
            else TokenType.USER_DEFINED
        by_id[i] = (text, int(kind))
    if not by_id or min(by_id) < 0:
        raise ConvertError(f"{path}: token ids must be >= 0")
    n = max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))[0] for i in range(n)]
    types = [by_id.get(i, ("", int(TokenType.UNUSED)))[1] for i in range(n)]

    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m  # tokenizers >= 0.20 writes pairs
        if len(pair) != 2:
            raise ConvertError(f"{path}: merge {m!r} is not a pair of tokens")
        merges.append(f"{pair[0]} {pair[1]}")
    add_bos, add_eos = _template_adds(tok.get("post_processor"))
    return Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges,
                 add_bos=add_bos, add_eos=add_eos)
