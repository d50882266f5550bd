"""Constrained vs unconstrained decode speed, and the mask's cost per token (JSON).

    python benchmarks/bench_structured.py [MODEL.gguf ...] [--threads 1 2] [--gen 64]
        [--vocab-gguf LLAMA3_VOCAB.gguf]

Decode: `--gen` tokens after a short prompt at temperature 1, end-of-generation tokens banned,
free (unconstrained) and under a JSON Schema that cannot end sooner (an array of at least 1000
objects), with the mask where the library puts it (beside the forward pass when a core is
spare, else before it: structured.spare_core), and both ways forced for contrast. Best of
`--reps` runs. Default model: SmolLM2; pass the 1.1B-shape file
(benchmarks/make_random_model.py --shape tinyllama) for the other figure.

Mask: the time of Constraint.advance (consume a token, compute the next mask) along a random
walk through the same schema, median and p99, for SmolLM2's 49152-token vocabulary and, with
--vocab-gguf, a 128256-token one (llama.cpp's models/ggml-vocab-llama-bpe.gguf is Llama 3's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from alpaca_cpu.default_model import default_model_path
from alpaca_cpu.gguf_file import read_metadata
from alpaca_cpu.llama import Llama
from alpaca_cpu.structured import Constraint, Grammar
from alpaca_cpu.tokenizer import Tokenizer

LONG_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "n", "tags"], "additionalProperties": False}}
PROMPT = "A list of records as JSON:\n"


def decode_tps(llm: Llama, gen: int, reps: int, grammar: Grammar | None) -> float:
    ban = {t: -float("inf") for t in llm.tokenizer_.eog_ids}
    best = 0.0
    for rep in range(reps):
        t0 = time.perf_counter()
        r = llm.create_completion(PROMPT, max_tokens=gen, temperature=1.0, seed=rep,
                                  logit_bias=ban, grammar=grammar)
        seconds = time.perf_counter() - t0 - llm.last_eval.seconds
        n = r["usage"]["completion_tokens"]
        best = max(best, n / seconds)
    return round(best, 2)


def decode(model: str, threads: int, gen: int, reps: int) -> dict[str, Any]:
    llm = Llama(model, n_ctx=gen + 64, n_threads=threads, seed=0)
    grammar = Grammar.from_json_schema(LONG_SCHEMA)
    free = decode_tps(llm, gen, reps, None)
    chosen = llm._mask_beside  # the library's choice: beside the pass only with a spare core
    constrained = decode_tps(llm, gen, reps, grammar)
    timings = {}
    for beside in (True, False):
        llm._mask_beside = beside
        timings[beside] = decode_tps(llm, gen, reps, grammar)
    llm._mask_beside = chosen
    return {"model": model, "n_vocab": llm.n_vocab(), "threads": threads,
            "mask_beside_chosen": chosen, "free_tps": free, "constrained_tps": constrained,
            "constrained_beside_tps": timings[True],
            "constrained_sequential_tps": timings[False],
            "constrained_ratio": round(constrained / free, 3),
            "beside_ratio": round(timings[True] / free, 3),
            "sequential_ratio": round(timings[False] / free, 3)}


def mask_times(tokenizer: Tokenizer, steps: int) -> dict[str, Any]:
    grammar = Grammar.from_json_schema(LONG_SCHEMA)
    t0 = time.perf_counter()
    c = Constraint(grammar, tokenizer)  # includes building llguidance's tokenizer, once
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = Constraint(grammar, tokenizer)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    eog = np.array(sorted(tokenizer.eog_ids))
    times = []
    for _ in range(steps):
        allowed = c.allowed_tokens()
        allowed = allowed[~np.isin(allowed, eog)]
        tok = int(rng.choice(allowed))
        t0 = time.perf_counter()
        c.advance(tok)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"n_vocab": tokenizer.n_vocab, "steps": steps,
            "engine_tokenizer_s": round(first_s - compile_s, 3),
            "schema_compile_ms": round(compile_s * 1e3, 2),
            "mask_ms_median": round(float(np.median(ms)), 4),
            "mask_ms_p99": round(float(np.percentile(ms, 99)), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mask-steps", type=int, default=300)
    ap.add_argument("--vocab-gguf", help="a GGUF with a 128k vocabulary for the mask timing")
    args = ap.parse_args(argv)
    models = args.models or [str(default_model_path())]
    out: dict[str, Any] = {"decode": [], "mask": []}
    out["mask"].append(mask_times(Tokenizer.from_metadata(read_metadata(default_model_path())),
                                  args.mask_steps))
    if args.vocab_gguf:
        out["mask"].append(mask_times(Tokenizer.from_metadata(read_metadata(args.vocab_gguf)),
                                      args.mask_steps))
    for model in models:
        for threads in args.threads:
            out["decode"].append(decode(model, threads, args.gen, args.reps))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
