"""Soak test: many generations with random prompts and parameters; RSS must stay flat.

    python benchmarks/soak.py [MODEL.gguf] [--n 1000] [--seed 0] [--threads 2]

One Llama object (the real SmolLM2-135M-Instruct by default) answers N random requests: text
and token-id prompts, chat conversations, streaming or not, greedy or sampled with random
parameters, stop strings, logprobs, context shift, state save/load, and some invalid requests
that must raise ValueError. Every call must return (a call that hangs for --hang-s seconds
dumps every thread's stack and exits) and no unexpected exception may occur. RSS is sampled
after every call (after freeing garbage and trimming the heap); the report (JSON) gives it at the start, after the warm-up, at the end, its
maximum, the least-squares slope after the warm-up and over the last half (a leak grows
steadily; the allocator's high-water mark grows in steps, then stays), and the requests after
which RSS jumped by more than --jump-mib. Exits 1 if RSS grew by more than --max-growth-mib
after the warm-up, or on any failure. Not a CI test: it takes minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import faulthandler
import gc
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_cpu.llama import Llama

WORDS = ["the", "llama", "alpaca", "model", "token", "cache", "thread", "kernel", "matrix",
         "prompt", "story", "colour", "river", "mountain", "quickly", "because", "although",
         "seven", "42", "3.14", "naïve", "café", "東京", "🦙", "\n", "\t"]
QUESTIONS = ["What is 2+2?", "Name three primary colors.", "Write a haiku about llamas.",
             "Explain what a KV cache is.", "Translate 'good morning' to French."]


def rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Collect Python garbage and hand freed heap pages back to the system (glibc), so that
    RSS counts memory really held, not the allocator's high-water mark: a saved state of a
    few MiB freed in the middle of the heap would otherwise show as a step up that stays."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


_libc = ctypes.util.find_library("c")
_malloc_trim = getattr(ctypes.CDLL(_libc), "malloc_trim", None) if _libc else None


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def sampling(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    """Random, valid sampling parameters."""
    greedy = rng.random() < 0.3
    params: dict[str, Any] = {
        "max_tokens": rng.randint(1, max_tokens),
        "temperature": 0.0 if greedy else rng.uniform(0.1, 1.5),
        "top_k": rng.choice([0, 1, 10, 40, 100]),
        "top_p": rng.uniform(0.1, 1.0),
        "min_p": rng.choice([0.0, 0.05, 0.2]),
        "repeat_penalty": rng.uniform(1.0, 1.3),
        "presence_penalty": rng.uniform(0.0, 1.0),
        "frequency_penalty": rng.uniform(0.0, 1.0),
        "seed": rng.choice([None, rng.randrange(1 << 31)]),
    }
    if rng.random() < 0.2:
        params["stop"] = rng.sample(["\n", ".", " the", "!"], rng.randint(1, 2))
    if rng.random() < 0.1:
        params["logit_bias"] = {rng.randrange(1000): rng.uniform(-5, 5)}
    return params


def consume(result: Any) -> int:
    """Run a completion or stream to its end; the number of characters it produced."""
    if isinstance(result, dict):
        choice = result["choices"][0]
        return len(choice.get("text") or choice.get("message", {}).get("content", ""))
    n = 0
    for chunk in result:
        choice = chunk["choices"][0]
        n += len(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return n


def request(llm: Llama, rng: random.Random, max_tokens: int) -> tuple[str, Callable[[], int]]:
    """A random request: its kind, and a call that runs it to its end and returns how many
    characters it produced."""
    p = sampling(rng, max_tokens)
    stream = rng.random() < 0.3
    kind = rng.choices(["text", "ids", "chat", "logprobs", "shift", "state", "invalid"],
                       weights=[30, 10, 25, 8, 5, 7, 15])[0]
    if kind == "text":
        prompt = random_text(rng, rng.randint(1, 60))
        return kind, lambda: consume(llm(prompt, stream=stream, **p))
    if kind == "ids":
        ids = [rng.randrange(llm.n_vocab()) for _ in range(rng.randint(1, 80))]
        return kind, lambda: consume(llm(ids, stream=stream, **p))
    if kind == "chat":
        messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        if rng.random() < 0.4:
            messages += [{"role": "assistant", "content": random_text(rng, 10)},
                         {"role": "user", "content": rng.choice(QUESTIONS)}]
        return kind, lambda: consume(llm.create_chat_completion(messages, stream=stream, **p))
    if kind == "logprobs":
        return kind, lambda: consume(llm(random_text(rng, 10), logprobs=rng.randint(0, 5), **p))
    if kind == "shift":  # an answer a little longer than the room left: the context shifts once
        prompt = random_text(rng, 100)
        room = llm.n_ctx() - len(llm.tokenize(prompt.encode()))
        return kind, lambda: consume(llm(
            prompt, max_tokens=room + 16, context_shift=True, n_keep=rng.randint(0, 8),
            temperature=0.8, logit_bias={t: -np.inf for t in llm.tokenizer_.eog_ids}))
    if kind == "state":
        def save_and_restore() -> int:
            state = llm.save_state()
            n = consume(llm(random_text(rng, 5), **p))
            llm.load_state(state)
            return n
        return kind, save_and_restore
    bad = rng.choice([{"prompt": [0, 10**9]}, {"prompt": "a\x00b"}, {"max_tokens": -1},
                      {"temperature": float("nan")}, {"top_p": 2.0}, {"prompt": "x " * 4000},
                      {"logit_bias": {-1: 1.0}}, {"seed": -3}])

    def invalid() -> int:
        try:
            llm(**{"prompt": "hello", **bad})
        except ValueError:
            return 0
        raise AssertionError(f"{bad} was not refused")
    return kind, invalid


def slope(ys: list[int]) -> float:
    """Least-squares slope of ys against their index (bytes per call)."""
    if len(ys) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(ys)), np.asarray(ys, dtype=np.float64), 1)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: the cached SmolLM2 file)")
    ap.add_argument("--n", type=int, default=1000, help="number of requests")
    ap.add_argument("--warmup", type=int, default=None,
                    help="requests before the RSS baseline (default: n // 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens drawn")
    ap.add_argument("--hang-s", type=float, default=300.0,
                    help="a single request taking longer than this is a hang")
    ap.add_argument("--max-growth-mib", type=float, default=16.0,
                    help="most RSS may grow after the warm-up")
    ap.add_argument("--jump-mib", type=float, default=1.0,
                    help="report requests after which RSS grew by more than this")
    args = ap.parse_args(argv)
    if args.model is None:
        from alpaca_cpu.default_model import default_model_path

        args.model = default_model_path()
    warmup = args.warmup if args.warmup is not None else max(1, args.n // 10)

    release_free_memory()
    rss_before_load = rss_bytes()
    llm = Llama(Path(args.model), n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed)
    release_free_memory()
    rss_start = rss_bytes()
    rng = random.Random(args.seed)
    kinds: Counter[str] = Counter()
    rss: list[int] = []
    jumps: list[dict[str, Any]] = []
    chars = 0
    t0 = time.perf_counter()
    for i in range(args.n):
        kind, call = request(llm, rng, args.max_tokens)
        faulthandler.dump_traceback_later(args.hang_s, exit=True)
        try:
            chars += call()
        except Exception as e:  # noqa: BLE001  (any failure ends the soak, with its reason)
            print(f"soak: request {i} ({kind}) failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        kinds[kind] += 1
        release_free_memory()
        rss.append(rss_bytes())
        grew = rss[-1] - (rss[-2] if len(rss) > 1 else rss_start)
        if grew > args.jump_mib * 2**20:
            jumps.append({"request": i, "kind": kind, "mib": round(grew / 2**20, 2)})
        if (i + 1) % 50 == 0:
            print(f"soak: {i + 1}/{args.n} requests, RSS {rss[-1] / 2**20:.1f} MiB",
                  file=sys.stderr)
    elapsed = time.perf_counter() - t0
    after = rss[warmup - 1:] if warmup <= len(rss) else rss[-1:]
    growth = after[-1] - after[0]
    mib = 2**20
    report = {
        "model": str(args.model), "n": args.n, "seed": args.seed, "n_ctx": args.n_ctx,
        "n_threads": llm.model.n_threads, "warmup": warmup, "requests": dict(kinds),
        "seconds": round(elapsed, 1), "characters_out": chars,
        "rss_before_load_mib": round(rss_before_load / mib, 1),
        "rss_start_mib": round(rss_start / mib, 1),
        "rss_after_warmup_mib": round(after[0] / mib, 1),
        "rss_end_mib": round(rss[-1] / mib, 1),
        "rss_max_mib": round(max(rss) / mib, 1),
        "rss_growth_after_warmup_mib": round(growth / mib, 2),
        "rss_slope_after_warmup_kib_per_request": round(slope(after) / 1024, 3),
        "rss_slope_last_half_kib_per_request": round(slope(rss[len(rss) // 2:]) / 1024, 3),
        "rss_jumps": jumps,
        "max_growth_mib": args.max_growth_mib,
    }
    print(json.dumps(report, indent=1))
    return 0 if growth <= args.max_growth_mib * mib else 1


if __name__ == "__main__":
    sys.exit(main())
