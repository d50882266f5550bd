"""`alpaca-imatrix`: collect an importance matrix from a calibration text, as llama-imatrix does.

    alpaca-imatrix -m MODEL.gguf -f calibration.txt -o imatrix.gguf [-c 512] [--chunks N]
    alpaca-imatrix -m MODEL.gguf --self-generated -o imatrix.gguf [--chunks N] [--seed S]

With --self-generated there is no text to give: the model samples its own calibration text
(alpaca_cpu/self_calibration.py), --chunks chunks of -c tokens (default 2), seeded.

The method of `llama-imatrix` (llama.cpp tools/imatrix/imatrix.cpp), so that its files and ours
mean the same:
1. Read the file (one trailing newline dropped), tokenize it once, BOS first when the
   vocabulary adds one.
2. Split the ids into n_tokens // c chunks of c; each chunk runs from an empty cache, its first
   id replaced by BOS when the vocabulary adds one.
3. For every matrix of every layer (attn_q/k/v/output, ffn_gate/up/down), add the squares of
   each input column over all the chunk's tokens; count the tokens. (The output matrix is not
   collected, like llama-imatrix without --process-output.)
4. Write llama.cpp's GGUF imatrix file (alpaca_cpu/imatrix.py): `llama-quantize --imatrix`
   reads it, and `convert-weights --imatrix` reads llama-imatrix's.

The forward pass is the engine's float32 numpy one (alpaca_cpu.reference), which exposes each
matrix product's input; a 135M-parameter model takes a few seconds per 512-token chunk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import ModelFileError
from ..gguf_file import open_model_file
from ..imatrix import Imatrix, ImatrixError, write_imatrix
from ..reference import ReferenceModel
from ..self_calibration import DATASET_NAME, DEFAULT_CHUNKS, DEFAULT_SEED, sample_tokens
from ..tokenizer import Tokenizer
from .perplexity import _positive, read_text

PROG = "alpaca-imatrix"


def check_length(n_tokens: int, n_ctx: int) -> None:
    """ValueError when the calibration text is shorter than one chunk."""
    if n_tokens < n_ctx:
        raise ValueError(f"the calibration text has {n_tokens} tokens, fewer than one chunk "
                         f"of {n_ctx} (-c); give a longer text or a smaller -c")


def collect(model: ReferenceModel, tokens: list[int], n_ctx: int, bos_id: int | None,
            n_chunks: int | None = None, dataset: str = "", progress: bool = True) -> Imatrix:
    """The importance matrix of `model` over `tokens` in chunks of n_ctx (see the module doc).
    ValueError when the text is shorter than one chunk."""
    check_length(len(tokens), n_ctx)
    available = len(tokens) // n_ctx
    n = available if n_chunks is None else min(n_chunks, available)
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=n_ctx)
    model.observer = im.add
    try:
        t0 = time.perf_counter()
        for i in range(n):
            chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
            if bos_id is not None:
                chunk[0] = bos_id
            model.forward(chunk, start_pos=0)
            im.chunk_count = i + 1
            if progress:
                done = (i + 1) / n
                elapsed = time.perf_counter() - t0
                bar = "#" * int(30 * done)
                print(f"\r{PROG}: [{bar:<30}] chunk {i + 1}/{n}, {elapsed:.0f} s, ETA "
                      f"{elapsed / (i + 1) * (n - i - 1):.0f} s", end="", file=sys.stderr,
                      flush=True)
        if progress:
            print(file=sys.stderr)
    finally:
        model.observer = None
    return im


def self_generated_imatrix(model_path: str | Path, n_chunks: int = DEFAULT_CHUNKS,
                           n_ctx: int = 512, seed: int = DEFAULT_SEED, n_threads: int | None = None,
                           progress: bool = True) -> Imatrix:
    """The importance matrix of the model over n_chunks chunks of text it samples itself."""
    tokens = sample_tokens(model_path, n_chunks, n_ctx, seed, n_threads, progress)
    model = ReferenceModel(model_path, n_ctx=n_ctx, keep_weights=False)
    return collect(model, tokens, n_ctx, None, n_chunks,
                   dataset=f"{DATASET_NAME} (seed {seed})", progress=progress)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("-m", "--model", required=True, help="GGUF model file")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("-f", "--file", help="calibration text")
    source.add_argument("--self-generated", action="store_true",
                        help="no text: the model writes its own calibration text (sampled "
                             f"from BOS at temperature 1; {DEFAULT_CHUNKS} chunks unless "
                             "--chunks)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help=f"sampling seed of --self-generated (default {DEFAULT_SEED})")
    ap.add_argument("-o", "--output", required=True, help="imatrix file to write (GGUF)")
    ap.add_argument("-c", "--ctx-size", type=_positive, default=512,
                    help="tokens per chunk (default 512, as llama-imatrix)")
    ap.add_argument("--chunks", type=_positive, default=None,
                    help="use at most this many chunks (default: all of the text)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"{PROG}: error: {out} exists (--force to overwrite)", file=sys.stderr)
        return 2
    try:
        if args.self_generated:
            im = self_generated_imatrix(args.model, args.chunks or DEFAULT_CHUNKS,
                                        args.ctx_size, args.seed, progress=not args.quiet)
        else:
            text = read_text(args.file)
            mf = open_model_file(args.model)
            tok = Tokenizer.from_metadata(mf.metadata)
            tokens = tok.encode(text)
            check_length(len(tokens), args.ctx_size)  # before the weights are dequantized
            model = ReferenceModel(mf, n_ctx=args.ctx_size, keep_weights=False)
            bos_id = tok.bos_id if tok.add_bos else None
            im = collect(model, tokens, args.ctx_size, bos_id, args.chunks,
                         dataset=Path(args.file).name, progress=not args.quiet)
        write_imatrix(out, im)
    except (OSError, ValueError, ModelFileError, ImatrixError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {out}: {len(im)} matrices, {im.chunk_count} chunks of "
          f"{im.chunk_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
