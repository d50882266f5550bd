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


def _blocks(x: np.ndarray, size: int = QK) -> np.ndarray:
    """(rows, cols) float32 as (blocks, size), cols a multiple of size."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % size:
        raise ValueError(f"expected (rows, cols) with cols a multiple of {size}, got {x.shape}")
    return x.reshape(-1, size)


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


def _qh_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) bytes: bit j of the little-endian uint32 is bit 4 of q[j]."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def from_float_q5_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    idx = np.abs(b).argmax(axis=1)
    mx = b[np.arange(len(b)), idx][:, None]
    d = (mx / np.float32(-16)).astype(np.float32)
    # C casts (x*id + 16.5) to int8 (truncation), then clamps at 31
    q = np.minimum(np.trunc(b * _inverse(d) + np.float32(16.5)), 31).astype(np.uint8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), _qh_bits(q),
                          _pack_nibbles(q & 0x0F)], axis=1)
    return out.reshape(x.shape[0], -1)


def from_float_q5_1(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    mn = b.min(axis=1, keepdims=True)
    d = ((b.max(axis=1, keepdims=True) - mn) / np.float32(31)).astype(np.float32)
    q = np.trunc((b - mn) * _inverse(d) + np.float32(0.5)).astype(np.uint8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), mn.astype(np.float16).view(np.uint8),
                          _qh_bits(q), _pack_nibbles(q & 0x0F)], axis=1)
    return out.reshape(x.shape[0], -1)


IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                         1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _nearest_iq4nl(v: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL level (the lower one on a tie), as the native binary search."""
    vals = IQ4NL_VALUES.astype(np.float32)
    hi = np.clip(np.searchsorted(vals, v, side="right"), 1, 15)  # first level above v
    lower = (v - vals[hi - 1]) < (vals[hi] - v)
    idx = np.where(lower, hi - 1, hi)
    return np.where(v <= vals[0], 0, np.where(v >= vals[15], 15, idx))


def _iq4nl_sums(b: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block: sums of w * q * x and w * q * q (w = x^2, float32, element order) for the
    IQ4_NL levels nearest to inv * x."""
    q = IQ4NL_VALUES[_nearest_iq4nl(inv[:, None] * b)].astype(np.float32)
    sumqx = np.zeros(len(b), np.float32)
    sumq2 = np.zeros(len(b), np.float32)
    for j in range(QK):
        w = b[:, j] * b[:, j]
        sumqx = sumqx + w * q[:, j] * b[:, j]
        sumq2 = sumq2 + w * q[:, j] * q[:, j]
    return sumqx, sumq2


def from_float_iq4_nl(x: np.ndarray) -> np.ndarray:
    """IQ4_NL as llama-quantize writes it (GGML's quantize_iq4_nl, ntry 7, no importance
    matrix): the x^2-weighted least-squares scale for the levels nearest to x * 127 / max, then
    for each inverse scale (itry - 127) / max, itry = -7 .. 7, the one for its levels, keeping
    the largest sumqx^2 / sumq2 (the first on a tie); levels redone for the kept scale."""
    b = _blocks(x)
    idx = np.abs(b).argmax(axis=1)
    amax, mx = np.abs(b)[np.arange(len(b)), idx], b[np.arange(len(b)), idx]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sumqx, sumq2 = _iq4nl_sums(b, np.float32(1) / (-mx / np.float32(-127)))
        d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0)).astype(np.float32)
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = _iq4nl_sums(b, np.float32(itry - 127) / mx)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(np.float32)
            best = np.where(better, d * sumqx, best).astype(np.float32)
        live = amax >= np.float32(1e-15)
        d = np.where(live, d, np.float32(0)).astype(np.float32)
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        L = _nearest_iq4nl(inv[:, None] * b)
    out = np.concatenate([d.astype(np.float16).reshape(-1, 1).view(np.uint8), _pack_nibbles(L)],
                         axis=1)
    return out.reshape(x.shape[0], -1)


QK_K = 256


def from_float_q8_k(x: np.ndarray) -> np.ndarray:
    """Q8_K: float32 d = max / -127 (signed max), q = nearest(x * -127 / max) capped at 127,
    bsums of each 16; an all-zero block is all zero bytes."""
    from .kquants import _argmax_abs, round_int
    b = _blocks(x, QK_K)
    amax, mx = _argmax_abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-127) / mx
        q = np.minimum(127, round_int(iscale[:, None] * b)).astype(np.int8)
        d = (np.float32(1) / iscale).astype(np.float32)
    zero = amax == 0
    q[zero] = 0
    d[zero] = 0
    bsums = q.reshape(-1, 16, 16).astype(np.int32).sum(axis=2).astype("<i2")
    out = np.concatenate([d.astype("<f4").reshape(-1, 1).view(np.uint8), q.view(np.uint8),
                          bsums.view(np.uint8)], axis=1)
    return out.reshape(x.shape[0], -1)


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


def _five_bits(b: np.ndarray, qh_at: int) -> np.ndarray:
    """The 32 5-bit values of Q5_0/Q5_1 blocks: nibbles after qh, bit 4 from qh."""
    qh = b[:, qh_at:qh_at + 4].copy().view("<u4")
    high = (qh >> np.arange(QK, dtype=np.uint32)) & 1
    return _unpack_nibbles(b[:, qh_at + 4:]).astype(np.int32) | (high.astype(np.int32) << 4)


def to_float_q5_0(b: np.ndarray) -> np.ndarray:
    return (_five_bits(b, 2) - 16).astype(np.float32) * _scale(b, 0)


def to_float_q5_1(b: np.ndarray) -> np.ndarray:
    return _five_bits(b, 4).astype(np.float32) * _scale(b, 0) + _scale(b, 2)


def to_float_iq4_nl(b: np.ndarray) -> np.ndarray:
    return _scale(b, 0) * IQ4NL_VALUES[_unpack_nibbles(b[:, 2:])].astype(np.float32)


def to_float_q8_k(b: np.ndarray) -> np.ndarray:
    d = b[:, :4].copy().view("<f4").astype(np.float32)
    return d * b[:, 4:4 + QK_K].view(np.int8).astype(np.float32)


def to_float_q8(b: np.ndarray) -> np.ndarray:
    """Q8_0 and Q8_1 alike: the int8 quants after the block's fp16 fields, times d."""
    # int8 times float32 straight into float32: the same values, without the temporaries
    return np.multiply(b[:, b.shape[1] - QK:].view(np.int8), _scale(b, 0), dtype=np.float32)


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
    with np.errstate(invalid="ignore", over="ignore"):  # a file's inf/NaN scales stay so
        y = t.to_float(data.reshape(-1, t.type_size))
    return y.astype(np.float32, copy=False).reshape(rows, cols)


def activation_type(weight_type: int) -> int:
    """The format activations are quantized to for a weight type (float for F16/F32)."""
    return _traits(weight_type).vec_dot_type


def _block_ints(weight_type: int, b: np.ndarray) -> np.ndarray:
    """The integer weights of 32-element blocks (n, type_size) as (n, 32) int64: what the
    native dot products multiply with the activation's int8 (offsets applied)."""
    if weight_type == T.Q8_0:
        q = b[:, 2:].view(np.int8).astype(np.int64)
    elif weight_type in (T.Q4_0, T.Q4_1):
        at = 2 if weight_type == T.Q4_0 else 4
        q = _unpack_nibbles(b[:, at:]).astype(np.int64) - (8 if weight_type == T.Q4_0 else 0)
    elif weight_type in (T.Q5_0, T.Q5_1):
        at = 2 if weight_type == T.Q5_0 else 4
        q = _five_bits(b, at).astype(np.int64) - (16 if weight_type == T.Q5_0 else 0)
    else:  # IQ4_NL
        q = IQ4NL_VALUES[_unpack_nibbles(b[:, 2:])].astype(np.int64)
    return q


def gemm(weight_type: int, w: np.ndarray, act: np.ndarray, cols: int) -> np.ndarray:
    """numpy twin of the native GEMM: out[t, r] = dot(w row r, act row t), both already in
    their pairing formats. 32-element types: exact integer block sums, float64 combination.
    Other types: float64 products of the dequantized rows (only the float32 dequantization
    rounds)."""
    t = _traits(weight_type)
    at = activation_type(weight_type)
    if t.block_size != QK:
        return (dequantize(act, at, cols).astype(np.float64)
                @ dequantize(w, weight_type, cols).astype(np.float64).T).astype(np.float32)
    nb = cols // QK
    wb = w.reshape(-1, t.type_size)
    ab = act.reshape(-1, _traits(at).type_size)
    wq = _block_ints(weight_type, wb).reshape(w.shape[0], nb, QK)
    aq = ab[:, ab.shape[1] - QK:].view(np.int8).astype(np.int64).reshape(act.shape[0], nb, QK)
    wd = _scale(wb, 0).astype(np.float64).reshape(w.shape[0], nb)
    ad = _scale(ab, 0).astype(np.float64).reshape(act.shape[0], nb)
    sumi = np.einsum("rbj,tbj->trb", wq, aq)  # exact integer block sums (tok, rows, nb)
    out = (sumi * wd[None, :, :] * ad[:, None, :]).sum(axis=-1)
    if at == T.Q8_1:  # + m_w * s_a per block
        wm = _scale(wb, 2).astype(np.float64).reshape(w.shape[0], nb)
        a_s = _scale(ab, 2).astype(np.float64).reshape(act.shape[0], nb)
        out += (wm[None, :, :] * a_s[:, None, :]).sum(axis=-1)
    return out.astype(np.float32)
