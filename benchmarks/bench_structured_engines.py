"""llguidance vs outlines-core on our tokenizers (JSON): the numbers behind docs/design.md §16.

    python benchmarks/bench_structured_engines.py [--vocab-gguf LLAMA3_VOCAB.gguf]

For each engine and vocabulary (SmolLM2's 49152 tokens; a 128256-token one: a Llama-3 vocabulary
file when given, else SmolLM2's tokens padded with made-up two-token merges): the time to
prepare the tokenizer, to compile each schema, and to compute the mask at every token of a valid
document (median and p99); and which JSON Schema features each engine compiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import llguidance
import numpy as np
import outlines_core
from outlines_core.json_schema import build_regex_from_schema

from alpaca_cpu.default_model import default_model_path
from alpaca_cpu.gguf_file import read_metadata
from alpaca_cpu.structured import LIMITS, engine_token_bytes
from alpaca_cpu.tokenizer import Tokenizer

N_VOCAB_LARGE = 128256

# A schema per feature, with a document valid under it (walked token by token for mask times).
FEATURES: dict[str, tuple[dict[str, Any], Any]] = {
    "nested_objects": ({"type": "object", "properties": {
        "name": {"type": "string"}, "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"]}}, "required": ["name", "address"]},
        {"name": "Ada Lovelace", "address": {"city": "London", "zip": "W1"}}),
    "array_min_max_items": ({"type": "array", "items": {"type": "integer"}, "minItems": 2,
                             "maxItems": 4}, [1, 22, 333]),
    "enum": ({"type": "string", "enum": ["red", "green", "blue"]}, "green"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "forty-two"),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "ABC-1234"),
    "number_range": ({"type": "number", "minimum": 0, "maximum": 100}, 42.5),
    "integer_range": ({"type": "integer", "minimum": -5, "maximum": 5000}, 1234),
    "optional_and_required": ({"type": "object", "properties": {
        "id": {"type": "integer"}, "note": {"type": "string"}}, "required": ["id"]}, {"id": 7}),
    "additionalProperties_false": ({"type": "object", "properties": {"a": {"type": "boolean"}},
                                    "required": ["a"], "additionalProperties": False},
                                   {"a": True}),
    "ref_recursive": ({"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                     {"type": "null"}]}},
        "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
        {"v": 1, "next": {"v": 2, "next": None}}),
    "format_date": ({"type": "string", "format": "date"}, "2024-12-07"),
    "string_length": ({"type": "string", "minLength": 2, "maxLength": 5}, "abcd"),
    "const": ({"const": "fixed"}, "fixed"),
    "oneOf": ({"oneOf": [{"type": "boolean"}, {"type": "null"}]}, None),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                         {"required": ["a"]}]}, {"a": 3}),
    "any_json_object": ({"type": "object"}, {"k": [1, {"x": "y"}], "z": None}),
}


def small_tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(default_model_path()))


def large_vocab(base: Tokenizer, path: str | None) -> tuple[list[bytes], list[int], Any]:
    """(token bytes, EOS ids, tokenize function) of a 128k vocabulary."""
    if path:
        tok = Tokenizer.from_metadata(read_metadata(path))
        return (engine_token_bytes(tok), sorted(tok.eog_ids),
                lambda b: tok.encode(b, add_bos=False))
    tokens = engine_token_bytes(base)
    seen = set(tokens)
    rng = np.random.default_rng(0)
    plain = [t for t in tokens if t and not t.startswith(b"\xff")]
    while len(tokens) < N_VOCAB_LARGE:
        t = plain[rng.integers(len(plain))] + plain[rng.integers(len(plain))]
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    return tokens, sorted(base.eog_ids), lambda b: base.encode(b, add_bos=False)


class _Wrap:
    def __init__(self, tokens: list[bytes], eos: list[int], encode: Any) -> None:
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos[0], None
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self._encode = encode

    def __call__(self, data: bytes) -> list[int]:
        return self._encode(data)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 4)  # ms


def run_llguidance(tokens: list[bytes], eos: list[int], encode: Any,
                   docs: dict[str, list[int]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    llt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrap(tokens, eos, encode)),
                                 eos_token=eos)
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - t0, 3), "features": {}}
    masks: list[float] = []
    bits = np.zeros((len(tokens) + 31) // 32, dtype=np.int32)
    for name, (schema, _) in FEATURES.items():
        t0 = time.perf_counter()
        try:
            g = llguidance.LLMatcher.grammar_from_json_schema(schema)
            m = llguidance.LLMatcher(llt, g, log_level=0, limits=LIMITS)
            if m.is_error():
                raise ValueError(m.get_error())
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)  # the first mask
        except ValueError as e:
            out["features"][name] = f"refused: {str(e)[:80]}"
            continue
        compile_s = time.perf_counter() - t0
        ok = True
        for tok in docs[name]:
            ok = ok and m.consume_token(tok)
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            masks.append(time.perf_counter() - t0)
        out["features"][name] = {"compile_ms": round(compile_s * 1e3, 2),
                                 "document_accepted": bool(ok and m.is_accepting())}
    out["mask_ms_median"], out["mask_ms_p99"] = pct(masks, 50), pct(masks, 99)
    out["n_masks"] = len(masks)
    return out


def run_outlines(tokens: list[bytes], eos: list[int], docs: dict[str, list[int]],
                 budget_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    vocab_map: dict[bytes, list[int]] = {}
    for i, t in enumerate(tokens):
        if t and not t.startswith(b"\xff") and i not in eos:
            vocab_map.setdefault(t, []).append(i)
    vocab = outlines_core.Vocabulary(eos[0], vocab_map)
    out: dict[str, Any] = {"tokenizer_s": round(time.perf_counter() - t0, 3), "features": {}}
    masks: list[float] = []
    bits = np.zeros((len(tokens) + 31) // 32, dtype=np.int32)
    start = time.perf_counter()
    for name, (schema, _) in FEATURES.items():
        if time.perf_counter() - start > budget_s:
            out["features"][name] = "not run (time budget spent)"
            continue
        t0 = time.perf_counter()
        try:
            regex = build_regex_from_schema(json.dumps(schema))
            index = outlines_core.Index(regex, vocab)
            guide = outlines_core.Guide(index)
        except (ValueError, TypeError, RuntimeError) as e:
            out["features"][name] = f"refused: {str(e)[:80]}"
            continue
        compile_s = time.perf_counter() - t0
        ok = True
        for tok in docs[name]:
            try:
                guide.advance(tok, False)
            except (ValueError, RuntimeError):
                ok = False
                break
            t0 = time.perf_counter()
            guide.write_mask_into(bits.ctypes.data, bits.size, 4)
            masks.append(time.perf_counter() - t0)
        out["features"][name] = {"compile_ms": round(compile_s * 1e3, 2),
                                 "document_accepted": bool(ok and guide.is_finished())}
    out["mask_ms_median"] = pct(masks, 50) if masks else None
    out["mask_ms_p99"] = pct(masks, 99) if masks else None
    out["n_masks"] = len(masks)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-gguf", help="a GGUF with a 128k vocabulary (e.g. Llama 3's)")
    ap.add_argument("--outlines-budget-s", type=float, default=20.0,
                    help="stop compiling outlines-core indexes after this long per vocabulary")
    args = ap.parse_args(argv)
    base = small_tokenizer()
    docs = {n: base.encode(json.dumps(d, separators=(",", ":")), add_bos=False)
            for n, (_, d) in FEATURES.items()}
    vocabs = {"49152": (engine_token_bytes(base), sorted(base.eog_ids),
                        lambda b: base.encode(b, add_bos=False), docs)}
    tokens, eos, encode = large_vocab(base, args.vocab_gguf)
    if args.vocab_gguf:
        large_docs = {n: encode(json.dumps(d, separators=(",", ":")).encode())
                      for n, (_, d) in FEATURES.items()}
    else:
        large_docs = docs  # SmolLM2's ids are the first 49152 of the padded vocabulary
    vocabs[str(len(tokens))] = (tokens, eos, encode, large_docs)
    result: dict[str, Any] = {"large_vocab": args.vocab_gguf or "synthetic", "engines": {}}
    for size, (toks, eos_ids, enc, dd) in vocabs.items():
        result["engines"][f"llguidance@{size}"] = run_llguidance(toks, eos_ids, enc, dd)
        result["engines"][f"outlines_core@{size}"] = run_outlines(toks, eos_ids, dd,
                                                                  args.outlines_budget_s)
    for r in result["engines"].values():
        r["features_supported"] = sum(isinstance(v, dict) and v["document_accepted"]
                                      for v in r["features"].values())
        r["compile_ms_median"] = statistics.median(
            [v["compile_ms"] for v in r["features"].values() if isinstance(v, dict)] or [0])
    result["n_features"] = len(FEATURES)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
