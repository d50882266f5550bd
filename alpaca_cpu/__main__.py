"""`python -m alpaca_cpu [PROMPT]`: greedy completion of a prompt on the default model."""

from __future__ import annotations

import sys
import time

from .default_model import default_model_path
from .llama import Llama


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or "The capital of France is"
    llm = Llama(default_model_path(log=lambda s: print(s, file=sys.stderr)), n_ctx=512)
    t = time.perf_counter()
    out = llm(prompt, max_tokens=32, temperature=0)
    dt = time.perf_counter() - t
    print(prompt + out["choices"][0]["text"])
    n = out["usage"]["completion_tokens"]
    print(f"[{n} tokens in {dt:.2f} s on {llm.model.isa}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
