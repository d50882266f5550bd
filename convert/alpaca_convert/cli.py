"""`convert-weights`: PyTorch / GGUF checkpoints to GGUF files for alpaca-cpu and llama.cpp."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConvertError
from .quant_plan import OUTTYPES
from .quantizer_names import DEFAULT_QUANTIZER, QUANTIZERS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert-weights",
        description="Convert a Meta LLaMA folder (params.json + consolidated.NN.pth), a Hugging "
                    "Face LlamaForCausalLM folder (config.json + safetensors or .bin) or a GGUF "
                    "file to a GGUF file, optionally merging a PEFT LoRA adapter.")
    p.add_argument("input", help="checkpoint folder or .gguf file")
    p.add_argument("-o", "--output", help="output .gguf file (required unless --dry-run)")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="q4_0",
                   help="weight type of the output, or llama.cpp's mix of types for it (q4_k_m "
                        "...; see the README); default: q4_0. Norms stay f32")
    p.add_argument("--quantizer", choices=list(QUANTIZERS), default=DEFAULT_QUANTIZER,
                   help="search: per block, the scale (and min) that minimises the squared "
                        "error of the dequantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); "
                        "reference: GGML's reference quantizers, the bytes llama-quantize "
                        f"writes without an imatrix. Default: {DEFAULT_QUANTIZER}")
    p.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (alpaca-imatrix or llama-imatrix, GGUF or legacy "
                        ".dat): weight each column's error by its mean squared activation")
    p.add_argument("--self-imatrix", action="store_true",
                   help="no calibration text: make the importance matrix from text the model "
                        "samples itself (2 chunks of 512 tokens, seeded; slower: it runs the "
                        "model first), then quantize with it")
    p.add_argument("--lora", metavar="DIR",
                   help="PEFT LoRA adapter folder to merge into the weights")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs and print what would be written; write nothing")
    p.add_argument("--threads", type=int, default=None,
                   help="quantization threads (default: one per physical core)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .converter import convert  # after argument parsing, so --help stays fast

    if args.threads is not None and args.threads < 1:
        print("convert-weights: error: --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        convert(args.input, args.output, outtype=args.outtype, lora=args.lora, force=args.force,
                dry_run=args.dry_run, n_threads=args.threads, progress=not args.quiet,
                quantizer=args.quantizer, imatrix=args.imatrix,
                self_imatrix=args.self_imatrix)
    except ConvertError as e:
        print(f"convert-weights: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert-weights: interrupted; no output written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `--dry-run | head`: stop quietly, like other commands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
