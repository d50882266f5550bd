"""Tiny random LLaMA models written with gguf.GGUFWriter, for hermetic tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T

from alpaca_cpu import ggml_types
from alpaca_cpu.quants import quantize


@dataclass(frozen=True)
class TinySpec:
    n_vocab: int = 320
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None  # None: dim // n_heads (no key_length key written)
    ffn_dim: int = 96
    tied: bool = False
    wtype: T = T.F32
    embd_type: T | None = None  # None: same as wtype
    # Per-tensor types, overriding wtype: (name part, type), e.g. ("attn_v", T.Q6_K) for every
    # layer's attn_v.weight or ("output", T.Q6_K). A type the engine does not know gets random
    # bytes (for tests that check it is refused).
    tensor_types: tuple[tuple[str, T], ...] = ()
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    context_length: int = 512
    seed: int = 0


def tiny_weights(spec: TinySpec) -> dict[str, np.ndarray]:
    """Float32 weights in GGML orientation: matrices (rows=out, cols=in)."""
    rng = np.random.default_rng(spec.seed)
    hd = spec.head_dim or spec.dim // spec.n_heads
    q_dim, kv_dim = spec.n_heads * hd, spec.n_kv_heads * hd

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": rng.standard_normal((spec.n_vocab, spec.dim)).astype(np.float32),
         "output_norm.weight": norm(spec.dim)}
    if not spec.tied:
        w["output.weight"] = mat(spec.n_vocab, spec.dim)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(spec.dim)
        w[p + "attn_q.weight"] = mat(q_dim, spec.dim)
        w[p + "attn_k.weight"] = mat(kv_dim, spec.dim)
        w[p + "attn_v.weight"] = mat(kv_dim, spec.dim)
        w[p + "attn_output.weight"] = mat(spec.dim, q_dim)
        w[p + "ffn_norm.weight"] = norm(spec.dim)
        w[p + "ffn_gate.weight"] = mat(spec.ffn_dim, spec.dim)
        w[p + "ffn_up.weight"] = mat(spec.ffn_dim, spec.dim)
        w[p + "ffn_down.weight"] = mat(spec.dim, spec.ffn_dim)
    return w


def write_tiny_model(path: Path, spec: TinySpec = TinySpec(),
                     extra_metadata: dict[str, Any] | None = None,
                     weights: dict[str, np.ndarray] | None = None) -> Path:
    """Write a tiny LLaMA GGUF file; 2-D weights in spec.wtype, norms F32. `weights` replaces
    the random ones of tiny_weights (same names and shapes)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    if spec.head_dim is not None:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_base)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(spec.n_vocab)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, arr in (weights or tiny_weights(spec)).items():
        qtype = T.F32 if arr.ndim == 1 else spec.wtype
        if name == "token_embd.weight" and spec.embd_type is not None:
            qtype = spec.embd_type
        for part, t in spec.tensor_types:
            if name.split(".")[-2] == part:
                qtype = t
        if qtype == T.F32:
            writer.add_tensor(name, arr)
        elif int(qtype) in ggml_types.TYPES:
            data = quantize(arr, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            rng = np.random.default_rng(int(qtype))
            data = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // block * block_bytes),
                                dtype=np.uint8)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
