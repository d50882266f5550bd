"""Prefill and decode speed of the native engine on a GGUF file, as JSON.

    python benchmarks/bench.py MODEL.gguf --threads 2 [--prompt 512] [--gen 128] [--reps 5]

Prefill: one forward() of `--prompt` tokens from an empty cache. Decode: `--gen` single-token
forward() calls after a 1-token prompt. Figures are medians over `--reps` runs (one warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import alpaca_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    m = alpaca_cpu.Model(args.model, n_ctx=args.prompt + args.gen + 1, n_threads=args.threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, m.config.n_vocab, args.prompt)

    prefill, decode = [], []
    for rep in range(args.reps + 1):
        t = time.perf_counter()
        m.forward(prompt)
        pp = args.prompt / (time.perf_counter() - t)
        tok = int(prompt[0])
        t = time.perf_counter()
        for i in range(args.gen):
            tok = int(m.forward([tok], start_pos=i).argmax())
        tg = args.gen / (time.perf_counter() - t)
        if rep:  # the first run warms caches and the thread pool
            prefill.append(pp)
            decode.append(tg)
    print(json.dumps({
        "model": args.model, "isa": m.isa, "n_threads": m.n_threads, "load_s": round(load_s, 3),
        f"pp{args.prompt}_tps": round(statistics.median(prefill), 2),
        f"tg{args.gen}_tps": round(statistics.median(decode), 2),
        "prefill_samples": [round(x, 2) for x in prefill],
        "decode_samples": [round(x, 2) for x in decode],
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
