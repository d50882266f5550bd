"""`alpaca-perplexity`: perplexity of a model on a text file, computed as llama.cpp's tool does.

    alpaca-perplexity -m MODEL.gguf -f wiki.test.raw -c 512 [-t N] [-b BATCH] [--chunks N]

The method of `llama-perplexity` (llama.cpp examples/perplexity/perplexity.cpp, `perplexity()`),
so that the figures are comparable:
1. Read the file and drop one trailing newline (llama.cpp's `-f`).
2. Tokenize the whole text once, BOS first when the vocabulary adds one, special tokens as text.
3. Split the ids into n_tokens // c non-overlapping chunks of c (at least 2 c ids are needed).
4. Evaluate each chunk from an empty cache, its first id replaced by BOS when the vocabulary
   adds BOS.
5. Score only the second half: the logits at positions c/2 .. c-2 predict the ids at c/2+1 ..
   c-1. Each scored id costs -log softmax(logits)[id] (its negative log-likelihood, NLL).
6. PPL = exp(mean NLL), printed after each chunk as "[i]PPL," (stderr); at the end
   "Final estimate: PPL = X +/- E" (stdout) where E = PPL * sqrt((mean(NLL^2) - mean(NLL)^2) /
   (count - 1)), the standard error of the mean NLL carried to PPL.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ModelFileError
from ..model import Model
from ..system import physical_cores
from ..tokenizer import Tokenizer

PROG = "alpaca-perplexity"


class Forward(Protocol):
    """What perplexity() needs of a model: `Model` and `reference.ReferenceModel` both fit."""

    def forward(self, tokens: Sequence[int] | np.ndarray, start_pos: int = 0,
                all_logits: bool = False) -> np.ndarray: ...


@dataclass
class PerplexityResult:
    ppl: float
    error: float  # NaN when the NLL variance is not positive (llama.cpp prints an error then)
    n_chunks: int
    n_scored: int  # ids scored: n_chunks * (c - c/2 - 1)
    running: list[float] = field(default_factory=list)  # the estimate after each chunk


def read_text(path: str | Path) -> bytes:
    """The file's bytes without one trailing newline, as llama.cpp's -f reads a prompt file."""
    data = Path(path).read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] per row, float64; logits: (n, n_vocab)."""
    x = logits.astype(np.float64)
    top = x.max(axis=1)
    # log-sum-exp shifted by the row maximum (llama.cpp sums expf(l - max) in double too)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(model: Forward, tokens: Sequence[int], n_ctx: int, n_batch: int,
               bos_id: int | None, n_chunks: int | None = None,
               on_chunk: Callable[[int, float, float], None] | None = None) -> PerplexityResult:
    """llama.cpp's perplexity over `tokens` (already tokenized, BOS included as it adds it).

    bos_id: the id that replaces each chunk's first token, or None to keep it (vocabularies
    that add no BOS). on_chunk(i, running PPL, seconds of chunk i) is called after each chunk.
    """
    if n_ctx < 3:
        raise ValueError(f"context {n_ctx} is too small: at least 3 tokens, so that one is scored")
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity with a context of "
                         f"{n_ctx} needs at least {2 * n_ctx}")
    ids = np.asarray(tokens, dtype=np.int64)
    available = len(ids) // n_ctx
    n_chunks = available if n_chunks is None else min(n_chunks, available)
    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running = []
    for i in range(n_chunks):
        t0 = time.perf_counter()
        chunk = ids[i * n_ctx : (i + 1) * n_ctx].copy()
        if bos_id is not None:
            chunk[0] = bos_id
        # The cache is overwritten from position 0: every chunk starts from an empty context.
        for start in range(0, n_ctx, n_batch):
            stop = min(start + n_batch, n_ctx)
            logits = model.forward(chunk[start:stop], start_pos=start, all_logits=True)
            # Positions first .. n_ctx-2 of this batch predict the next id of the chunk (the
            # targets are never position 0, so the BOS replacement does not change them).
            lo, hi = max(start, first), min(stop, n_ctx - 1)
            if lo < hi:
                nll = token_nll(logits[lo - start : hi - start], ids[i * n_ctx + lo + 1 :
                                                                    i * n_ctx + hi + 1])
                nll_sum += float(nll.sum())
                nll2_sum += float((nll * nll).sum())
                count += hi - lo
        running.append(math.exp(nll_sum / count))
        if on_chunk is not None:
            on_chunk(i, running[-1], time.perf_counter() - t0)
    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll2_sum / count - mean * mean
    error = ppl * math.sqrt(variance / (count - 1)) if variance > 0 else math.nan
    return PerplexityResult(ppl=ppl, error=error, n_chunks=n_chunks, n_scored=count,
                            running=running)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("-m", "--model", required=True, help="GGUF file")
    ap.add_argument("-f", "--file", required=True, help="text file to score")
    ap.add_argument("-c", "--ctx-size", type=_positive, default=512,
                    help="tokens per chunk (default 512, as llama-perplexity)")
    ap.add_argument("-t", "--threads", type=_positive, default=None,
                    help="threads (default: physical cores)")
    ap.add_argument("-b", "--batch-size", type=_positive, default=None,
                    help="tokens per forward() within a chunk (default: the whole chunk)")
    ap.add_argument("--chunks", type=_positive, default=None,
                    help="score at most this many chunks (default: all)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str, end: str = "\n") -> None:
        print(msg, end=end, file=sys.stderr, flush=True)

    n_ctx = args.ctx_size
    try:
        text = read_text(args.file)
        model = Model(args.model, n_ctx=n_ctx, n_threads=args.threads or physical_cores())
        tok = Tokenizer.from_metadata(model.metadata)
        if tok.add_eos:  # llama.cpp asserts this too: an EOS after the text would be scored
            raise ValueError(f"{args.model}: the vocabulary adds EOS; perplexity needs it not to")
        if n_ctx > model.config.context_length:
            log(f"{PROG}: warning: the model was trained on only {model.config.context_length} "
                f"context tokens ({n_ctx} specified)")
        t0 = time.perf_counter()
        tokens = tok.encode(text)  # add_bos=None: BOS when the vocabulary adds one
        log(f"{PROG}: tokenized {len(text)} bytes into {len(tokens)} tokens in "
            f"{time.perf_counter() - t0:.2f} s ({model.isa}, {model.n_threads} threads)")
        bos_id = tok.bos_id if tok.add_bos else None
        n_batch = min(args.batch_size or n_ctx, n_ctx)

        def on_chunk(i: int, ppl: float, seconds: float) -> None:
            if i == 0:
                n = min(len(tokens) // n_ctx, args.chunks or len(tokens))
                log(f"{PROG}: calculating perplexity over {n} chunks, n_ctx={n_ctx}, "
                    f"batch_size={n_batch}: {seconds:.2f} seconds per pass - ETA "
                    f"{seconds * n / 60:.2f} minutes")
            log(f"[{i + 1}]{ppl:.4f},", end="")

        result = perplexity(model, tokens, n_ctx, n_batch, bos_id, args.chunks, on_chunk)
    except (OSError, ValueError, ModelFileError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    log("")
    if math.isnan(result.error):
        print(f"{PROG}: error: unexpected negative standard deviation of log(prob)",
              file=sys.stderr)
        return 1
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.error:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
