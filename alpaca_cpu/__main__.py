"""`python -m alpaca_cpu`: greedy generation on the default model, by token ids."""

from __future__ import annotations

import sys
import time

from gguf import GGUFReader

from .default_model import default_model_path
from .model import Model

PROMPT_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary


def main() -> int:
    path = default_model_path(log=lambda s: print(s, file=sys.stderr))
    m = Model(path, n_ctx=256)
    field = GGUFReader(path).fields["tokenizer.ggml.tokens"]
    vocab = field.contents()
    tokens = list(PROMPT_IDS)
    t = time.perf_counter()
    logits = m.forward(tokens)
    for _ in range(16):
        tokens.append(int(logits.argmax()))
        logits = m.forward(tokens[-1:], start_pos=len(tokens) - 1)
    dt = time.perf_counter() - t
    text = "".join(vocab[i] for i in tokens).replace("\u0120", " ").replace("\u010a", "\n")
    print(text)
    print(f"[{len(tokens) - len(PROMPT_IDS)} tokens in {dt:.2f} s on {m.isa}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
