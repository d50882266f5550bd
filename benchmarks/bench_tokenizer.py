"""Tokenizer speed on a ~10,000-token text, as a ratio to the library it drives (JSON).

    python benchmarks/bench_tokenizer.py [MODEL.gguf]   # default: the cached SmolLM2 file

Ours = alpaca_cpu.tokenizer.Tokenizer.encode (special-token splitting + the `tokenizers`
pipeline); library = the bare `tokenizers` call. Best of several interleaved runs each.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable

from alpaca_cpu.default_model import default_model_path
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.tokenizer import StreamingDecoder, Tokenizer


def best_time(fn: Callable[[], object], repeat: int = 7) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
    tok = Tokenizer.from_metadata(open_model_file(path).metadata)
    rng = random.Random(3)
    words = ["the", "llama", "naïve", "日本語", "🦙", "1234", ",", ".", "\n", "<|im_start|>"]
    text = " ".join(rng.choice(words) for _ in range(6000))
    ids = tok.encode(text, special=True)
    hf = tok._encoder._hf  # the library call our encode makes (BPE vocabularies)
    ours = best_time(lambda: tok.encode(text, special=True))
    lib = best_time(lambda: hf.encode(text, add_special_tokens=False))
    dec = best_time(lambda: tok.decode(ids))

    def stream() -> None:
        d = StreamingDecoder(tok)
        for t in ids:
            d.feed(t)
        d.flush()

    print(json.dumps({"model": str(path), "n_tokens": len(ids), "encode_s": round(ours, 4),
                      "library_encode_s": round(lib, 4), "encode_ratio": round(ours / lib, 3),
                      "decode_s": round(dec, 4), "stream_decode_s": round(best_time(stream), 4)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
