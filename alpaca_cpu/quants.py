"""numpy twins of the GGML block layouts and of the native row conversions
(csrc/ggml_types.cpp), per type; the type table (ggml_types.py) lists them.

Bit-exact with GGML's reference quantizers; tests compare them with `gguf.quants` and with
the native kernels of every ISA. Rows are (n, cols) float32 in, (n, row_bytes) uint8 out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from gguf import GGMLQuantizationType as T

if TYPE_CHECKING:
    from .ggml_types import TypeTraits

QK = 32


def _traits(qtype: int) -> TypeTraits:
    # The type table lists this module's twins, so it is imported when first needed.
    from .ggml_types import traits
    return traits(qtype)


def row_bytes(qtype: int, cols: int) -> int:
    t = _traits(qtype)
    return cols // t.block_size * t.type_size


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (numpy's round is half-to-even)."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"expected (rows, cols) with cols a multiple of {QK}, got {x.shape}")
    return x.reshape(-1, QK)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values in [0, 15] -> (n, 16) bytes: weight j low nibble, weight j+16 high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


# --- One twin per type and direction: the columns of the type table (ggml_types.py). ---
# from_float: (rows, cols) float32 -> (rows, row_bytes) uint8; to_float: (blocks, block bytes)
# uint8 -> (blocks, block elements) float32.

def from_float_f32(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint8).reshape(x.shape[0], -1).copy()


def from_float_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1)


def from_float_q4_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    idx = np.abs(b).argmax(axis=1)  # first index of the largest magnitude, sign kept
    mx = b[np.arange(len(b)), idx][:, None]
    d = (mx / np.float32(-8)).astype(np.float32)
    # C casts (x*id + 8.5) to int8 (truncation), then clamps at 15
    q = np.minimum(np.trunc(b * _inverse(d) + np.float32(8.5)), 15)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


def from_float_q4_1(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    mn = b.min(axis=1, keepdims=True)
    mx = b.max(axis=1, keepdims=True)
    d = ((mx - mn) / np.float32(15)).astype(np.float32)
    q = np.minimum(np.trunc((b - mn) * _inverse(d) + np.float32(0.5)), 15)
    out = np.concatenate([d.astype(np.float16).view(np.uint8),
                          mn.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)
    return out.reshape(x.shape[0], -1)


def _from_float_q8(x: np.ndarray, with_sum: bool) -> np.ndarray:
    b = _blocks(x)
    d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    q = _roundf(b * _inverse(d)).astype(np.int8)
    parts = [d.astype(np.float16).view(np.uint8)]
    if with_sum:  # Q8_1: s = d * sum(q)
        s = q.astype(np.int32).sum(axis=1, keepdims=True).astype(np.float32) * d
        parts.append(s.astype(np.float16).view(np.uint8))
    parts.append(q.view(np.uint8))
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def from_float_q8_0(x: np.ndarray) -> np.ndarray:
    return _from_float_q8(x, with_sum=False)


def from_float_q8_1(x: np.ndarray) -> np.ndarray:
    return _from_float_q8(x, with_sum=True)


def _scale(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as (blocks, 1) float32."""
    return b[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def to_float_f32(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float32)


def to_float_f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)


def to_float_q4_0(b: np.ndarray) -> np.ndarray:
    return (_unpack_nibbles(b[:, 2:]).astype(np.float32) - 8) * _scale(b, 0)


def to_float_q4_1(b: np.ndarray) -> np.ndarray:
    return _unpack_nibbles(b[:, 4:]).astype(np.float32) * _scale(b, 0) + _scale(b, 2)


def to_float_q8(b: np.ndarray) -> np.ndarray:
    """Q8_0 and Q8_1 alike: the int8 quants after the block's fp16 fields, times d."""
    return b[:, b.shape[1] - QK:].copy().view(np.int8).astype(np.float32) * _scale(b, 0)


# --- Any type, through the table ---

def quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """Quantize (rows, cols) float32 to GGML rows of `qtype` (any type of ggml_types.TYPES)."""
    t = _traits(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % t.block_size:
        raise ValueError(f"expected (rows, cols) with cols a multiple of {t.block_size} for "
                         f"{t.name}, got {x.shape}")
    return t.from_float(x)


def dequantize(data: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """GGML rows of `qtype` -> (rows, cols) float32."""
    t = _traits(qtype)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rb = row_bytes(qtype, cols)
    rows = data.size // rb
    if data.size != rows * rb:
        raise ValueError(f"dequantize: {data.size} bytes is not a whole number of {cols}-wide rows")
    y = t.to_float(data.reshape(-1, t.type_size))
    return y.astype(np.float32).reshape(rows, cols)


def activation_type(weight_type: int) -> int:
    """The format activations are quantized to for a weight type (float for F16/F32)."""
    return _traits(weight_type).vec_dot_type


def gemm(weight_type: int, w: np.ndarray, act: np.ndarray, cols: int) -> np.ndarray:
    """numpy twin of the native GEMM: out[t, r] = dot(w row r, act row t), both already in
    their pairing formats. Integer block sums are exact; the float combination is float64."""
    if not _traits(weight_type).is_block:
        return (dequantize(act, T.F32, cols).astype(np.float64)
                @ dequantize(w, weight_type, cols).astype(np.float64).T).astype(np.float32)
    nb = cols // QK
    wb = w.reshape(w.shape[0], nb, _traits(weight_type).type_size)
    ab = act.reshape(act.shape[0], nb, _traits(activation_type(weight_type)).type_size)
    wd = wb[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (rows, nb)
    ad = ab[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (tok, nb)
    if weight_type == T.Q4_1:
        wq = np.concatenate([wb[..., 4:] & 0x0F, wb[..., 4:] >> 4], axis=-1).astype(np.int64)
        aq = ab[..., 4:].view(np.int8).astype(np.int64)
        wm = wb[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        a_s = ab[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    elif weight_type == T.Q4_0:
        wq = np.concatenate([wb[..., 2:] & 0x0F, wb[..., 2:] >> 4], axis=-1).astype(np.int64) - 8
        aq = ab[..., 2:].view(np.int8).astype(np.int64)
    else:
        wq = wb[..., 2:].view(np.int8).astype(np.int64)
        aq = ab[..., 2:].view(np.int8).astype(np.int64)
    sumi = np.einsum("rbj,tbj->trb", wq, aq)  # exact integer block sums (tok, rows, nb)
    out = (sumi * wd[None, :, :] * ad[:, None, :]).sum(axis=-1)
    if weight_type == T.Q4_1:
        out += (wm[None, :, :] * a_s[:, None, :]).sum(axis=-1)
    return out.astype(np.float32)
