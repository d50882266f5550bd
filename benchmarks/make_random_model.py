"""Random-weight LLaMA GGUF files at real shapes, for speed and memory work.

    python benchmarks/make_random_model.py --shape tinyllama --type q4_0 -o tinyllama.Q4_0.gguf
    python benchmarks/make_random_model.py --shape llama7b --vocab 49152 --type q4_0 \
        -o llama7b-v49152.Q4_0.gguf
    python benchmarks/make_random_model.py --shape custom --layers 2 --dim 64 --heads 4 \
        --kv-heads 2 --ffn 96 --vocab 320 --type q8_0 -o tiny.gguf
    python benchmarks/make_random_model.py --shape llama3.2-1b --mix q4_k_m \
        -o llama3.2-1b.Q4_K_M.gguf

Speed does not depend on the values, so the weights are uniform noise scaled to unit-variance
activations (no NaN or overflow on any path, F16 included). With `--type`, every matrix, the
token embedding and the output matrix included, is written in that one type. With `--mix` (the
converter's --outtype names: q4_k_m, q5_k_m, q6_k, q3_k_m, q2_k, q5_0, iq4_nl, ...) each matrix
gets the type llama-quantize would give it in that mix: the converter's own plan
(alpaca_convert.quant_plan), so these files are laid out like the ones people download. Norm
weights stay F32. The named shapes are the real models' (Llama 3.2 1B: tied embeddings, a
128256-token vocabulary and its Llama-3 RoPE scaling, written as rope_freqs.weight as llama.cpp's
converter writes it). The file carries a minimal SentencePiece-style vocabulary (<unk>, <s>, </s>,
the 256 byte tokens, then dummy pieces up to `--vocab`) so that both alpaca-cpu (`Llama`,
tokenizer included) and llama.cpp (`llama-bench`) load it.

Tensors are generated, quantized with the engine's own quantizers and written one at a time, in
row chunks, so memory stays at about one quantized tensor plus one chunk (the 3.9 GB LLaMA-7B
Q4_0 file needs a few hundred MB). The file is written beside its destination under a hidden
temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from alpaca_convert.quant_plan import MIXES, Mix, tensor_type
from alpaca_convert.rope_scaling import ROPE_FREQS, Llama3Scaling
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from alpaca_cpu import _core
from alpaca_cpu.config import ModelConfig
from alpaca_cpu.system import physical_cores

T = GGMLQuantizationType
F = LlamaFileType

# --type: one type for every matrix, the output matrix and the token embedding included; written
# as a Mix without rules whose output type is its main type, so one planner serves both options.
TYPES: dict[str, Mix] = {
    "f16": Mix(F.MOSTLY_F16, T.F16),
    "q4_0": Mix(F.MOSTLY_Q4_0, T.Q4_0, T.Q4_0),
    "q4_1": Mix(F.MOSTLY_Q4_1, T.Q4_1, T.Q4_1),
    "q8_0": Mix(F.MOSTLY_Q8_0, T.Q8_0, T.Q8_0),
}

# Random values generated per step: bounds the float32 scratch to 64 MiB whatever the tensor.
CHUNK_VALUES = 16 << 20

# <unk>, <s>, </s>, then <0x00>..<0xFF>: what llama.cpp's SPM vocabulary needs to load.
N_FIXED_TOKENS = 3 + 256
# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


@dataclass(frozen=True)
class Shape:
    """LLaMA hyper-parameters; head_dim = dim / n_heads."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    n_vocab: int = 32000
    tied: bool = False  # no output.weight: token_embd is also the output matrix
    context_length: int = 2048
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    rope_scaling: Llama3Scaling | None = None  # Llama 3.1+ RoPE: a rope_freqs.weight tensor

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def config(self) -> ModelConfig:
        """The engine's hyper-parameters of this shape (what the quantization plan reads)."""
        return ModelConfig(
            n_vocab=self.n_vocab, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, ffn_dim=self.ffn_dim,
            n_rot=self.head_dim, rope_base=self.rope_base, rms_eps=self.rms_eps,
            context_length=self.context_length, tied_embeddings=self.tied,
            has_rope_freqs=self.rope_scaling is not None)


SHAPES: dict[str, Shape] = {
    "tinyllama": Shape(n_layers=22, dim=2048, n_heads=32, n_kv_heads=4, ffn_dim=5632),
    # meta-llama/Llama-3.2-1B config.json: rope_scaling {rope_type llama3, factor 32,
    # low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192}
    "llama3.2-1b": Shape(n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                         n_vocab=128256, tied=True, context_length=131072, rope_base=500000.0,
                         rope_scaling=Llama3Scaling(factor=32.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0,
                                                    original_context=8192)),
    "llama7b": Shape(n_layers=32, dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008),
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # (rows, cols) with cols contiguous, or (n,) for norms
    type: GGMLQuantizationType
    scale: float  # values are uniform in [-scale, scale)
    values: np.ndarray | None = field(default=None, compare=False)  # fixed values instead

    @property
    def nbytes(self) -> int:
        block, block_bytes = GGML_QUANT_SIZES[self.type]
        return math.prod(self.shape) // block * block_bytes


def check_shape(shape: Shape, uniform: GGMLQuantizationType | None) -> None:
    """Refuse shapes that neither engine can run, naming the value found and the rule. With one
    `uniform` type the rows must be whole blocks of it; a mix falls back per tensor instead, as
    llama-quantize does."""
    positive = {"layers": shape.n_layers, "dim": shape.dim, "heads": shape.n_heads,
                "kv-heads": shape.n_kv_heads, "ffn": shape.ffn_dim,
                "context-length": shape.context_length}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} = {value}, expected a positive integer")
    if shape.dim % shape.n_heads or shape.head_dim % 2:
        raise ValueError(f"--dim {shape.dim} must be a multiple of --heads {shape.n_heads} with "
                         "an even head size (RoPE rotates pairs), got head size "
                         f"{shape.dim / shape.n_heads:g}")
    if shape.n_heads % shape.n_kv_heads:
        raise ValueError(f"--heads {shape.n_heads} must be a multiple of --kv-heads "
                         f"{shape.n_kv_heads}")
    if uniform is not None:
        block = GGML_QUANT_SIZES[uniform][0]
        for name, cols in (("dim", shape.dim), ("ffn", shape.ffn_dim)):
            if cols % block:
                raise ValueError(f"--{name} = {cols} is not a multiple of {block}, the block "
                                 f"size of {uniform.name}")
    if shape.n_vocab < N_FIXED_TOKENS:
        raise ValueError(f"--vocab = {shape.n_vocab}, expected at least {N_FIXED_TOKENS} (<unk>, "
                         "<s>, </s> and the 256 byte tokens)")


def tensor_plan(shape: Shape, mix: Mix) -> list[PlannedTensor]:
    """Every tensor of the file in GGUF names, in the order llama.cpp's converter writes them,
    each with the type the converter's quantization plan gives it in `mix`."""
    s = shape
    config = s.config()
    kv_dim = s.n_kv_heads * s.head_dim

    def mat(name: str, rows: int, cols: int, scale: float | None = None) -> PlannedTensor:
        # sqrt(3 / cols): uniform weights whose dot product with unit activations has variance 1.
        return PlannedTensor(name, (rows, cols), tensor_type(name, (rows, cols), mix, config),
                             math.sqrt(3.0 / cols) if scale is None else scale)

    def norm(name: str) -> PlannedTensor:
        return PlannedTensor(name, (s.dim,), T.F32, 0.0)  # 0.0: all ones, as after init

    plan = []
    if s.rope_scaling is not None:
        freqs = s.rope_scaling.rope_freqs(s.rope_base, s.head_dim)
        plan.append(PlannedTensor(ROPE_FREQS, freqs.shape, T.F32, 0.0, freqs))
    plan.append(mat("token_embd.weight", s.n_vocab, s.dim, math.sqrt(3.0)))
    for i in range(s.n_layers):
        p = f"blk.{i}."
        plan += [norm(p + "attn_norm.weight"),
                 mat(p + "attn_q.weight", s.dim, s.dim),
                 mat(p + "attn_k.weight", kv_dim, s.dim),
                 mat(p + "attn_v.weight", kv_dim, s.dim),
                 mat(p + "attn_output.weight", s.dim, s.dim),
                 norm(p + "ffn_norm.weight"),
                 mat(p + "ffn_gate.weight", s.ffn_dim, s.dim),
                 mat(p + "ffn_up.weight", s.ffn_dim, s.dim),
                 mat(p + "ffn_down.weight", s.dim, s.ffn_dim)]
    plan.append(norm("output_norm.weight"))
    if not s.tied:
        plan.append(mat("output.weight", s.n_vocab, s.dim))
    return plan


def tokenizer_metadata(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of a minimal SentencePiece-style vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    # Dummy pieces: unique, never produced by the encoder (their prefixes are not pieces), so
    # text becomes byte tokens; the ids are all valid model inputs, which is what speed needs.
    tokens += [f"\u2581dummy{i}" for i in range(n_vocab - N_FIXED_TOKENS)]
    types += [TOKEN_NORMAL] * (n_vocab - N_FIXED_TOKENS)
    scores = [0.0] * N_FIXED_TOKENS + [-float(i) for i in range(n_vocab - N_FIXED_TOKENS)]
    return tokens, scores, types


def random_tensor(t: PlannedTensor, rng: np.random.Generator, n_threads: int) -> np.ndarray:
    """The tensor's bytes as written to the file: F32/F16 values or GGML blocks (uint8)."""
    if t.values is not None:
        return t.values
    if len(t.shape) == 1:
        return np.ones(t.shape, np.float32)  # norms
    rows, cols = t.shape
    if t.type in (T.F32, T.F16):
        out = np.empty((rows, cols), np.float32 if t.type == T.F32 else np.float16)
    else:
        out = np.empty((rows, t.nbytes // rows), np.uint8)
    for r0, chunk in _random_rows(rows, cols, t.scale, rng):
        out[r0 : r0 + len(chunk)] = (chunk if t.type in (T.F32, T.F16)
                                     else _core.quantize(chunk, int(t.type), n_threads))
    return out


def _random_rows(rows: int, cols: int, scale: float,
                 rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 (n, cols) block) pieces of a uniform [-scale, scale) matrix."""
    step = max(1, CHUNK_VALUES // cols)
    for r0 in range(0, rows, step):
        x = rng.random((min(step, rows - r0), cols), dtype=np.float32)
        x -= 0.5
        x *= 2.0 * scale
        yield r0, x


def weights_by_name(type_name: str | None = None, mix_name: str | None = None) -> Mix:
    """The planner of `--type NAME` (one type everywhere) or `--mix NAME` (llama-quantize's)."""
    if (type_name is None) == (mix_name is None):
        raise ValueError("give one of --type and --mix")
    if type_name is not None:
        if type_name not in TYPES:
            raise ValueError(f"--type {type_name!r}, expected one of {', '.join(TYPES)}")
        return TYPES[type_name]
    if mix_name not in MIXES:
        raise ValueError(f"--mix {mix_name!r}, expected one of {', '.join(MIXES)}")
    return MIXES[mix_name]


def write_random_model(path: Path, shape: Shape, mix: Mix, label: str, *, seed: int = 0,
                       n_threads: int | None = None, log: bool = False) -> Path:
    """Write the file atomically (temporary name beside it, renamed when complete). `mix` (from
    weights_by_name) picks each matrix's type; `label` names it in general.name."""
    # Only --type's planners are held to whole blocks (a --mix falls back, even where it happens
    # to equal a --type row, as f16 does).
    uniform = next((m.main for m in TYPES.values() if m is mix), None)
    check_shape(shape, uniform)
    plan = tensor_plan(shape, mix)
    n_threads = n_threads or physical_cores()
    rng = np.random.default_rng(seed)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), "llama")
    try:
        _add_metadata(writer, shape, mix.file_type, label)
        for t in plan:
            if t.type in (T.F32, T.F16):
                dtype = np.float32 if t.type == T.F32 else np.float16
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
            else:
                byte_shape = (t.shape[0], t.nbytes // t.shape[0])
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes,
                                       raw_dtype=t.type)
        # Header, metadata and tensor infos first: then each tensor's data can be written and
        # freed in turn (GGUFWriter.add_tensor would keep every tensor in memory until the end).
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        t0 = time.perf_counter()
        for i, t in enumerate(plan):
            data = random_tensor(t, rng, n_threads)
            writer.write_tensor_data(data)
            del data
            if log and (i % 20 == 0 or i == len(plan) - 1):
                print(f"[{i + 1}/{len(plan)}] {t.name} {t.type.name} {t.shape} "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_metadata(writer: GGUFWriter, shape: Shape, ftype: LlamaFileType, label: str) -> None:
    s = shape
    n_vocab = s.n_vocab
    writer.add_name(f"random-llama {s.n_layers}L {s.dim}d {label}")
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(2)
    writer.add_context_length(s.context_length)
    writer.add_embedding_length(s.dim)
    writer.add_block_count(s.n_layers)
    writer.add_feed_forward_length(s.ffn_dim)
    writer.add_head_count(s.n_heads)
    writer.add_head_count_kv(s.n_kv_heads)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_rope_freq_base(s.rope_base)
    writer.add_layer_norm_rms_eps(s.rms_eps)
    writer.add_vocab_size(n_vocab)
    tokens, scores, types = tokenizer_metadata(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--shape", choices=[*SHAPES, "custom"], required=True,
                    help="a named real shape; with 'custom', give --layers --dim --heads --ffn")
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--type", choices=list(TYPES), default=None,
                         help="type of every matrix (norms stay F32); default q4_0")
    weights.add_argument("--mix", choices=list(MIXES), default=None,
                         help="llama-quantize's per-tensor types for this mix (convert-weights "
                              "--outtype names)")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the shape's; custom "
                                              "32000)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="GGUF file to write")
    ap.add_argument("--layers", type=int, help="override the shape's number of layers")
    ap.add_argument("--dim", type=int, help="override the embedding length")
    ap.add_argument("--heads", type=int, help="override the number of attention heads")
    ap.add_argument("--kv-heads", type=int, help="override the KV heads (custom: = --heads)")
    ap.add_argument("--ffn", type=int, help="override the feed-forward length")
    ap.add_argument("--context-length", type=int, help="trained context written in the file")
    ap.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                    help="no output.weight (token_embd reused); default: the shape's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="quantizer threads")
    ap.add_argument("--force", action="store_true", help="replace an existing file")
    return ap.parse_args(argv)


def shape_from_args(args: argparse.Namespace) -> Shape:
    overrides = {"n_layers": args.layers, "dim": args.dim, "n_heads": args.heads,
                 "n_kv_heads": args.kv_heads, "ffn_dim": args.ffn, "n_vocab": args.vocab,
                 "tied": args.tied, "context_length": args.context_length}
    if args.shape == "custom":
        missing = [opt for opt, key in (("--layers", "n_layers"), ("--dim", "dim"),
                                        ("--heads", "n_heads"), ("--ffn", "ffn_dim"))
                   if overrides[key] is None]
        if missing:
            raise ValueError(f"--shape custom needs {', '.join(missing)}")
        if overrides["n_kv_heads"] is None:
            overrides["n_kv_heads"] = overrides["n_heads"]
        return Shape(**{k: v for k, v in overrides.items() if v is not None})
    return replace(SHAPES[args.shape], **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        shape = shape_from_args(args)
        if args.output.exists() and not args.force:
            raise ValueError(f"{args.output} exists; pass --force to replace it")
        t0 = time.perf_counter()
        if args.mix is None:
            mix, label = weights_by_name(type_name=args.type or "q4_0"), args.type or "q4_0"
        else:
            mix, label = weights_by_name(mix_name=args.mix), args.mix
        write_random_model(args.output, shape, mix, label, seed=args.seed,
                           n_threads=args.threads, log=True)
    except ValueError as e:
        print(f"make_random_model: error: {e}", file=sys.stderr)
        return 2
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.1f} s, peak RSS {peak_mib:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
