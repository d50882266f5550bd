"""Open a GGUF v3 model file with mmap, validate it, and describe its weights.

Everything read from the file is checked before the native core sees it: the file's structure
(`gguf_reader`: counts, lengths, types, offsets, alignment), then the architecture,
hyper-parameters, and every tensor's presence, shape and type. Errors name the file, the
field, what was found and what was expected.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from .config import ModelConfig
from .errors import ModelFileError
from .ggml_types import WEIGHT_TYPES, traits
from .gguf_reader import GGUFFile, read_gguf

# Sanity bounds on hyper-parameters: far above any real LLaMA, low enough that a lying file
# cannot make us allocate absurd buffers.
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22
MAX_FFN = 1 << 20
MAX_CONTEXT = 1 << 24
MAX_ROPE_BASE = 1e12  # open interval (0, MAX_ROPE_BASE)
MAX_RMS_EPS = 1.0  # open interval (0, MAX_RMS_EPS)
MAX_ROPE_SCALING = 1e4  # linear RoPE scaling factor: open interval (0, MAX_ROPE_SCALING)
ROPE_FREQS = "rope_freqs.weight"


@dataclass
class Tensor:
    """One weight as stored in the file: (rows, cols) with cols contiguous."""

    name: str
    type: GGMLQuantizationType
    rows: int
    cols: int
    data: np.ndarray  # flat uint8 view of the mapped file (no copy)


@dataclass
class ModelFile:
    path: Path
    config: ModelConfig
    metadata: dict[str, Any]
    tensors: dict[str, Tensor] = field(repr=False)
    # the metadata's on-disk types (gguf_reader.GGUFFile's), for writers that copy it
    value_types: dict[str, GGUFValueType] = field(repr=False)
    array_types: dict[str, GGUFValueType] = field(repr=False)

    def rope_divisors(self) -> np.ndarray | None:
        """(n_rot / 2) float32: what the angle pos * base^(-2i/n_rot) of frequency i is divided
        by, or None for plain RoPE: rope_freqs.weight (Llama-3 scaling) times the linear
        scaling factor (llama.cpp applies both, as theta * freq_scale / freq_factor)."""
        cfg = self.config
        if not cfg.has_rope_freqs and cfg.rope_scaling_factor == 1.0:
            return None
        div = np.ones(cfg.n_rot // 2, np.float64)
        if cfg.has_rope_freqs:
            div *= self.tensors[ROPE_FREQS].data.view(np.float32)
        return (div * cfg.rope_scaling_factor).astype(np.float32)


def _err(path: Path, what: str) -> ModelFileError:
    return ModelFileError(f"{path}: {what}")


def read_metadata(source: str | os.PathLike[str] | GGUFFile | Any) -> dict[str, Any]:
    """GGUF metadata as plain Python values (strings, numbers, bools, lists), header excluded.

    `source` is a path (parsed with the strict reader; tensor data is not touched), a parsed
    `GGUFFile`, or, for older callers, a `gguf.GGUFReader`. Values equal what
    `gguf.ReaderField.contents()` gives, except that nested arrays stay nested.
    """
    if isinstance(source, GGUFFile):
        return dict(source.metadata)
    if isinstance(source, (str, os.PathLike)):
        return read_gguf(source).metadata
    return {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")}


def _int_key(path: Path, md: dict[str, Any], key: str, lo: int, hi: int,
             default: Any = None) -> int:
    value = md.get(key, default)
    if value is None:
        raise _err(path, f"missing metadata key '{key}' (an integer in [{lo}, {hi}])")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise _err(path, f"metadata key '{key}' = {value!r}, expected an integer in [{lo}, {hi}]")
    return int(value)


def _float_key(path: Path, md: dict[str, Any], key: str, lo: float, hi: float,
               default: Any) -> float:
    value = md.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise _err(path, f"metadata key '{key}' = {value!r}, expected a number in ({lo}, {hi})")
    value = float(value)
    if not (math.isfinite(value) and lo < value < hi):
        raise _err(path, f"metadata key '{key}' = {value!r}, expected a number in ({lo}, {hi})")
    return value


def _config_from_metadata(path: Path, md: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch is None:
        raise _err(path, "missing metadata key 'general.architecture' (expected 'llama')")
    if arch != "llama":
        raise _err(path, f"metadata key 'general.architecture' = {arch!r}, expected 'llama'")
    dim = _int_key(path, md, "llama.embedding_length", 1, MAX_DIM)
    n_layers = _int_key(path, md, "llama.block_count", 1, MAX_LAYERS)
    n_heads = _int_key(path, md, "llama.attention.head_count", 1, MAX_HEADS)
    n_kv_heads = _int_key(path, md, "llama.attention.head_count_kv", 1, n_heads, default=n_heads)
    if n_heads % n_kv_heads:
        raise _err(path, f"metadata key 'llama.attention.head_count_kv' = {n_kv_heads}, "
                         f"expected a divisor of head_count = {n_heads}")
    if "llama.attention.key_length" in md:
        head_dim = _int_key(path, md, "llama.attention.key_length", 2, MAX_HEAD_DIM)
        v_len = _int_key(path, md, "llama.attention.value_length", 2, MAX_HEAD_DIM,
                         default=head_dim)
        if v_len != head_dim:
            raise _err(path, f"metadata key 'llama.attention.value_length' = {v_len}, "
                             f"expected key_length = {head_dim}")
    else:
        if dim % n_heads:
            raise _err(path, f"embedding_length {dim} is not a multiple of head_count {n_heads} "
                             "and 'llama.attention.key_length' is absent")
        head_dim = dim // n_heads
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise _err(path, f"head size {head_dim} must be even and at most {MAX_HEAD_DIM}")
    n_rot = _int_key(path, md, "llama.rope.dimension_count", 2, head_dim, default=head_dim)
    if n_rot % 2:
        raise _err(path, f"metadata key 'llama.rope.dimension_count' = {n_rot}, expected even")
    ffn_dim = _int_key(path, md, "llama.feed_forward_length", 1, MAX_FFN)
    rope_base = _float_key(path, md, "llama.rope.freq_base", 0.0, MAX_ROPE_BASE, 10000.0)
    rms_eps = _float_key(path, md, "llama.attention.layer_norm_rms_epsilon", 0.0, MAX_RMS_EPS,
                         None)
    context_length = _int_key(path, md, "llama.context_length", 1, MAX_CONTEXT)
    rope_scaling_factor = _rope_scaling_factor(path, md)
    tokens = md.get("tokenizer.ggml.tokens")
    default_vocab = len(tokens) if isinstance(tokens, list) else None
    n_vocab = _int_key(path, md, "llama.vocab_size", 1, MAX_VOCAB, default=default_vocab)
    return ModelConfig(
        n_vocab=n_vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, ffn_dim=ffn_dim, n_rot=n_rot, rope_base=rope_base, rms_eps=rms_eps,
        context_length=context_length, tied_embeddings="output.weight" not in tensor_names,
        rope_scaling_factor=rope_scaling_factor, has_rope_freqs=ROPE_FREQS in tensor_names,
    )


def _rope_scaling_factor(path: Path, md: dict[str, Any]) -> float:
    """The linear RoPE scaling factor, read as llama.cpp reads it: the type is 'linear' unless
    'llama.rope.scaling.type' says otherwise; the factor is 'llama.rope.scaling.factor' (or the
    older 'llama.rope.scale_linear'), where absent or 0 means none."""
    kind = md.get("llama.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        raise _err(path, f"metadata key 'llama.rope.scaling.type' = {kind!r}, expected 'none' or "
                         "'linear' (YaRN and LongRoPE scaling are not supported)")
    attn_factor = md.get("llama.rope.scaling.attn_factor", 1.0)
    if attn_factor != 1.0:
        raise _err(path, f"metadata key 'llama.rope.scaling.attn_factor' = {attn_factor!r}, "
                         "expected 1.0 (scaled attention is not supported)")
    key = "llama.rope.scaling.factor"
    if key not in md and "llama.rope.scale_linear" in md:
        key = "llama.rope.scale_linear"
    if md.get(key, 0.0) == 0.0 or kind == "none":
        return 1.0
    return _float_key(path, md, key, 0.0, MAX_ROPE_SCALING, None)


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> GGUF shape (ne0 = contiguous length first), as the config implies."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (cfg.dim, cfg.n_vocab),
        "output_norm.weight": (cfg.dim,),
    }
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.dim, cfg.n_vocab)
    if cfg.has_rope_freqs:
        shapes[ROPE_FREQS] = (cfg.n_rot // 2,)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (cfg.dim,),
            p + "attn_q.weight": (cfg.dim, cfg.q_dim),
            p + "attn_k.weight": (cfg.dim, cfg.kv_dim),
            p + "attn_v.weight": (cfg.dim, cfg.kv_dim),
            p + "attn_output.weight": (cfg.q_dim, cfg.dim),
            p + "ffn_norm.weight": (cfg.dim,),
            p + "ffn_gate.weight": (cfg.dim, cfg.ffn_dim),
            p + "ffn_up.weight": (cfg.dim, cfg.ffn_dim),
            p + "ffn_down.weight": (cfg.ffn_dim, cfg.dim),
        }
    return shapes


def open_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Open, validate and describe a GGUF v3 LLaMA model file (weights stay memory-mapped).

    The tensors' `data` are views into the file mapping, which stays open as long as any of
    them is alive.
    """
    gf = read_gguf(path)  # structure: every count, length, type, offset checked
    path = gf.path
    md = gf.metadata
    cfg = _config_from_metadata(path, md, set(gf.tensors))
    expected = expected_tensor_shapes(cfg)
    unexpected = sorted(gf.tensors.keys() - expected.keys())
    if unexpected:
        raise _err(path, f"unexpected tensor(s) for a llama model: {', '.join(unexpected[:5])}")
    tensors: dict[str, Tensor] = {}
    for name, shape in expected.items():
        t = gf.tensors.get(name)
        if t is None:
            raise _err(path, f"missing tensor '{name}' (expected shape {list(shape)})")
        if t.shape != shape:
            raise _err(path, f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        qtype = t.type
        if qtype not in WEIGHT_TYPES:
            raise _err(path, f"tensor '{name}' has type {qtype.name}, expected one of "
                             f"{', '.join(sorted(q.name for q in WEIGHT_TYPES))}")
        if len(shape) == 1 and qtype != GGMLQuantizationType.F32:
            raise _err(path, f"tensor '{name}' has type {qtype.name}, expected F32 for a vector")
        block, block_bytes = traits(qtype).block_size, traits(qtype).type_size
        if shape[0] % block:  # the reader checks this too; the kernels depend on it
            raise _err(path, f"tensor '{name}' row length {shape[0]} is not a multiple of {block}")
        data = gf.tensor_data(t)
        assert data.size == math.prod(shape) // block * block_bytes  # the reader's invariant
        rows = shape[1] if len(shape) == 2 else 1
        tensors[name] = Tensor(name, qtype, rows, shape[0], data)
    if cfg.has_rope_freqs:
        freqs = tensors[ROPE_FREQS].data.view(np.float32)
        bad = ~(np.isfinite(freqs) & (freqs > 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(path, f"tensor '{ROPE_FREQS}' value {i} is {float(freqs[i])!r}, expected "
                             "finite positive RoPE frequency divisors")
    return ModelFile(path=path, config=cfg, metadata=md, tensors=tensors,
                     value_types=gf.value_types, array_types=gf.array_types)
