"""numpy twins of the GGML block layouts and of the native quantizers (csrc/ggml_types.h).

Bit-exact with GGML's reference quantizers; tests compare them with `gguf.quants` and with
the native kernels of every ISA. Rows are (n, cols) float32 in, (n, row_bytes) uint8 out.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

QK = 32
Q8_1 = 9  # GGML type id of the activation format paired with Q4_1 (not a file type)

BLOCK_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34, Q8_1: 36}


def row_bytes(qtype: int, cols: int) -> int:
    if qtype == T.F32:
        return cols * 4
    if qtype == T.F16:
        return cols * 2
    return cols // QK * BLOCK_BYTES[qtype]


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


def quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """Quantize (rows, cols) float32 to GGML rows of `qtype` (F32, F16, Q4_0, Q4_1, Q8_0, Q8_1)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.shape[0]
    if qtype == T.F32:
        return x.view(np.uint8).reshape(rows, -1).copy()
    if qtype == T.F16:
        return x.astype(np.float16).view(np.uint8).reshape(rows, -1)
    b = _blocks(x)
    if qtype == T.Q4_0:
        idx = np.abs(b).argmax(axis=1)  # first index of the largest magnitude, sign kept
        mx = b[np.arange(len(b)), idx][:, None]
        d = (mx / np.float32(-8)).astype(np.float32)
        # C casts (x*id + 8.5) to int8 (truncation), then clamps at 15
        q = np.minimum(np.trunc(b * _inverse(d) + np.float32(8.5)), 15)
        out = np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)
    elif qtype == T.Q4_1:
        mn = b.min(axis=1, keepdims=True)
        mx = b.max(axis=1, keepdims=True)
        d = ((mx - mn) / np.float32(15)).astype(np.float32)
        q = np.minimum(np.trunc((b - mn) * _inverse(d) + np.float32(0.5)), 15)
        out = np.concatenate([d.astype(np.float16).view(np.uint8),
                              mn.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)
    elif qtype in (T.Q8_0, Q8_1):
        d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
        q = _roundf(b * _inverse(d)).astype(np.int8)
        parts = [d.astype(np.float16).view(np.uint8)]
        if qtype == Q8_1:
            s = q.astype(np.int32).sum(axis=1, keepdims=True).astype(np.float32) * d
            parts.append(s.astype(np.float16).view(np.uint8))
        parts.append(q.view(np.uint8))
        out = np.concatenate(parts, axis=1)
    else:
        raise ValueError(f"quantize: unsupported type {qtype}")
    return out.reshape(rows, -1)


def dequantize(data: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """GGML rows of `qtype` -> (rows, cols) float32."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.size // row_bytes(qtype, cols)
    if data.size != rows * row_bytes(qtype, cols):
        raise ValueError(f"dequantize: {data.size} bytes is not a whole number of {cols}-wide rows")
    if qtype == T.F32:
        return data.view(np.float32).reshape(rows, cols).copy()
    if qtype == T.F16:
        return data.view(np.float16).astype(np.float32).reshape(rows, cols)
    b = data.reshape(-1, BLOCK_BYTES[qtype])
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == T.Q4_0:
        y = (_unpack_nibbles(b[:, 2:]).astype(np.float32) - 8) * d
    elif qtype == T.Q4_1:
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        y = _unpack_nibbles(b[:, 4:]).astype(np.float32) * d + m
    elif qtype == T.Q8_0:
        y = b[:, 2:].copy().view(np.int8).astype(np.float32) * d
    else:
        raise ValueError(f"dequantize: unsupported type {qtype}")
    return y.astype(np.float32).reshape(rows, cols)


def activation_type(weight_type: int) -> int:
    """The format activations are quantized to for a weight type (float for F16/F32)."""
    if weight_type == T.Q4_1:
        return Q8_1
    if weight_type in (T.Q4_0, T.Q8_0):
        return int(T.Q8_0)
    return int(T.F32)


def gemm(weight_type: int, w: np.ndarray, act: np.ndarray, cols: int) -> np.ndarray:
    """numpy twin of the native GEMM: out[t, r] = dot(w row r, act row t), both already in
    their pairing formats. Integer block sums are exact; the float combination is float64."""
    if weight_type in (T.F32, T.F16):
        return (dequantize(act, T.F32, cols).astype(np.float64)
                @ dequantize(w, weight_type, cols).astype(np.float64).T).astype(np.float32)
    nb = cols // QK
    wb = w.reshape(w.shape[0], nb, BLOCK_BYTES[weight_type])
    ab = act.reshape(act.shape[0], nb, BLOCK_BYTES[activation_type(weight_type)])
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
