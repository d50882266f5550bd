"""numpy twins of the K-quants (Q2_K ... Q6_K): super-blocks of 256 weights with packed
sub-block scales; the native twins are in csrc/ggml_quants.cpp and the layouts in
csrc/ggml_types.h.

The quantizers reproduce GGML's reference ones (quantize_row_q*_K_ref, what llama-quantize uses
without an importance matrix) bit for bit: every float32 operation happens in GGML's order, one
element at a time along a sub-block and vectorised across sub-blocks, so that no sum is
reordered (numpy's own reductions sum pairwise, which rounds differently).
"""

from __future__ import annotations

import numpy as np

from .quants import _blocks

QK_K = 256
f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)  # below this a group's largest magnitude counts as zero


def round_int(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to even, as GGML's nearest_int: add 1.5 * 2^23 in float32 and
    read the low mantissa bits (exact for |v| < 2^22; larger values and NaN give some int)."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = (np.asarray(v, f32) + f32(12582912.0)).astype(f32)
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def _fp16(v: np.ndarray) -> np.ndarray:
    """float32 (n,) -> fp16 bytes (n, 2)."""
    return np.asarray(v, f32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def _half(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as (blocks,) float32."""
    return b[:, at:at + 2].copy().view(np.float16)[:, 0].astype(f32)


def _argmax_abs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest |x| and the signed x where it first occurs."""
    ax = np.abs(x)
    idx = np.nan_to_num(ax, nan=-1.0).argmax(axis=1)
    rows = np.arange(len(x))
    return ax[rows, idx], x[rows, idx]


def _positive_max(v: np.ndarray) -> np.ndarray:
    """Per row: the largest value above 0, else 0 (the native running max from 0, NaN skipped)."""
    return np.where(v > 0, v, f32(0)).max(axis=1)


# --- sub-block scale searches (the native fit_scale_min / fit_scale_sym / fit_scale_q3) ---

def _fit_scale_min(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                   nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x ~ scale * L - m per row of x (groups, n), L in [0, nmax]: returns scale, m, L."""
    n = x.shape[1]
    mn, mx = x[:, 0].copy(), x[:, 0].copy()
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        mn = np.where(x[:, i] < mn, x[:, i], mn)
        mx = np.where(x[:, i] > mx, x[:, i], mx)
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    mn = np.where(mn > 0, f32(0), mn)
    flat = mx == mn

    def error(scale: np.ndarray, m: np.ndarray, L: np.ndarray) -> np.ndarray:
        err = np.zeros(len(x), f32)
        for i in range(n):
            diff = scale * L[:, i].astype(f32) + m - x[:, i]
            err = err + weights[:, i] * (np.abs(diff) if use_mad else diff * diff)
        return err

    def levels(iscale: np.ndarray, m: np.ndarray) -> np.ndarray:
        return np.clip(round_int(iscale[:, None] * (x - m[:, None])), 0, nmax)

    # m is the current min: a better fit moves it, and the later candidates start from it
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        m = mn
        iscale = f32(nmax) / (mx - m)
        scale = f32(1) / iscale
        L = levels(iscale, m)
        best = error(scale, m, L)
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (mx - m)
            La = levels(iscale, m)
            sum_l = np.zeros(len(x), f32)
            sum_l2 = np.zeros(len(x), f32)
            sum_xl = np.zeros(len(x), f32)
            for i in range(n):
                wl = weights[:, i] * La[:, i].astype(f32)
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * La[:, i].astype(f32)
                sum_xl = sum_xl + wl * x[:, i]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, f32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, La)
            better = (D > 0) & (cur < best)
            L = np.where(better[:, None], La, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            m = np.where(better, this_min, m)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat[:, None], 0, L)
    m = np.where(flat, mn, m)
    return scale.astype(f32), (-m).astype(f32), L.astype(np.int32)


def _sym_levels(x: np.ndarray, w: np.ndarray, iscale: np.ndarray,
                nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels clamp(round(iscale * x), -nmax, nmax - 1) per row and their weighted sums
    sum w x L, sum w L^2, in element order (the native sym_levels)."""
    lv = np.clip(round_int(iscale[:, None] * x), -nmax, nmax - 1)
    sumlx = np.zeros(len(x), f32)
    suml2 = np.zeros(len(x), f32)
    for i in range(x.shape[1]):
        li = lv[:, i].astype(f32)
        sumlx = sumlx + w[:, i] * x[:, i] * li
        suml2 = suml2 + w[:, i] * li * li
    return lv, sumlx, suml2


def _fit_scale_sym(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: x ~ scale * (L - nmax), weights x^2, 19 candidate scales; returns scale, L."""
    amax, mx = _argmax_abs(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lv, sumlx, suml2 = _sym_levels(x, w, f32(-nmax) / mx, nmax)
        L = lv + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            lv, sumlx, suml2 = _sym_levels(x, w, -(f32(nmax) + f32(0.1) * f32(step)) / mx, nmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], lv + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, f32(0), scale).astype(f32), np.where(zero[:, None], 0, L)


def _fit_scale_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K: levels from -nmax / max, then 5 passes moving single levels while the x^2-weighted
    fit improves (a group with no change in a pass would change nothing later either, so the
    native early exit needs no twin). Returns scale, L in [0, 2 nmax)."""
    n = x.shape[1]
    amax, mx = _argmax_abs(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L, sumlx, suml2 = _sym_levels(x, w, f32(-nmax) / mx, nmax)
        for _ in range(5):
            for i in range(n):
                li = L[:, i].astype(f32)
                slx = sumlx - w[:, i] * x[:, i] * li
                sl2 = suml2 - w[:, i] * li * li
                new = np.clip(round_int(x[:, i] * sl2 / slx), -nmax, nmax - 1)
                nf = new.astype(f32)
                slx2 = slx + w[:, i] * x[:, i] * nf
                sl22 = sl2 + w[:, i] * nf * nf
                ok = ((slx > 0) & (new != L[:, i]) & (sl22 > 0)
                      & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                L[:, i] = np.where(ok, new, L[:, i])
                sumlx = np.where(ok, slx2, sumlx)
                suml2 = np.where(ok, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    return np.where(zero, f32(0), scale).astype(f32), np.where(zero[:, None], 0, L + nmax)


def _requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int,
                L: np.ndarray) -> np.ndarray:
    """Levels round((x + dm) / d) (or x / d) clamped to [lo, hi], per group with d != 0; the
    fitted levels L stay where d == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = (x + dm[:, None]) / d[:, None] if dm is not None else x / d[:, None]
        new = np.clip(round_int(v), lo, hi)
    return np.where((d != 0)[:, None], new, L)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(blocks, 256) levels in [0, 3] -> (blocks, 64) bytes: byte 32h + l holds levels
    128h + 32s + l at bits 2s."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (q & 3).reshape(-1, QK_K)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes (blocks, 12) of Q4_K/Q5_K."""
    s = s.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    out = np.zeros((len(ls), 12), np.int32)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out.astype(np.uint8)


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """The 16 signed scales (sc - 32) of Q3_K's 12 scale bytes (blocks, 12)."""
    s = s.astype(np.int32)
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    j = np.arange(16)
    high = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


# --- quantizers: (rows, cols) float32 -> (rows, row bytes) uint8 ---

def _quantize_k4(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K levels: (blocks, 256) levels, 12 scale bytes, d and dmin (fp16 bytes)."""
    b = _blocks(x, QK_K)
    g = b.reshape(-1, 32)
    sum_x2 = np.zeros(len(g), f32)
    for i in range(32):
        sum_x2 = sum_x2 + g[:, i] * g[:, i]
    av_x = np.sqrt(sum_x2 / f32(32))
    scales, mins, L = _fit_scale_min(g, av_x[:, None] + np.abs(g), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = np.minimum(round_int(inv_scale[:, None] * scales) & 0xFF, 63)  # uint8 then MIN(63)
    lm = np.minimum(round_int(inv_min[:, None] * mins) & 0xFF, 63)
    d = _fp16(max_scale / f32(63))
    dmin = _fp16(max_min / f32(63))
    dq = (d.view(np.float16).astype(f32).reshape(-1, 1) * ls.astype(f32)).reshape(-1)
    dmq = (dmin.view(np.float16).astype(f32).reshape(-1, 1) * lm.astype(f32)).reshape(-1)
    L = _requantize(g, dq, dmq, 0, nmax, L).reshape(-1, QK_K)
    return L, _pack_k4_scales(ls, lm), d, dmin


def from_float_q4_k(x: np.ndarray) -> np.ndarray:
    L, scales, d, dmin = _quantize_k4(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1).reshape(x.shape[0], -1)


def from_float_q5_k(x: np.ndarray) -> np.ndarray:
    L, scales, d, dmin = _quantize_k4(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    bits = (q >> 4).reshape(-1, 8, 32)  # bit of sub-block j at bit j of qh[l]
    qh = (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1).reshape(x.shape[0], -1)


def from_float_q6_k(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, QK_K)
    scales, L = _fit_scale_sym(b.reshape(-1, 16), 32)
    scales, L = scales.reshape(-1, 16), L.reshape(-1, 16, 16)
    _, max_scale = _argmax_abs(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-128) / max_scale
        d = _fp16(f32(1) / iscale)
        sc = np.minimum(127, round_int(iscale[:, None] * scales)).astype(np.int8)
    dq = (d.view(np.float16).astype(f32).reshape(-1, 1) * sc.astype(f32)).reshape(-1)
    L = _requantize(b.reshape(-1, 16), dq, None, -32, 31, L.reshape(-1, 16) - 32) + 32
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d], axis=1)
    out[zero] = 0
    return out.reshape(x.shape[0], -1)


def from_float_q2_k(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, QK_K)
    g = b.reshape(-1, 16)
    scales, mins, L = _fit_scale_min(g, np.abs(g), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale, max_min = _positive_max(scales), _positive_max(mins)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where((max_scale > 0)[:, None],
                      round_int((f32(15) / max_scale)[:, None] * scales) & 0xFF, 0)
        lm = np.where((max_min > 0)[:, None],
                      round_int((f32(15) / max_min)[:, None] * mins), 0)
    sc = (ls | (lm << 4)) & 0xFF
    d = _fp16(np.where(max_scale > 0, max_scale / f32(15), f32(0)))
    dmin = _fp16(np.where(max_min > 0, max_min / f32(15), f32(0)))
    dq = (d.view(np.float16).astype(f32).reshape(-1, 1) * (sc & 0xF).astype(f32)).reshape(-1)
    dmq = (dmin.view(np.float16).astype(f32).reshape(-1, 1) * (sc >> 4).astype(f32)).reshape(-1)
    L = _requantize(g, dq, dmq, 0, 3, L).reshape(-1, QK_K)
    out = np.concatenate([sc.astype(np.uint8), _pack_2bit(L), d, dmin], axis=1)
    return out.reshape(x.shape[0], -1)


def from_float_q3_k(x: np.ndarray) -> np.ndarray:
    b = _blocks(x, QK_K)
    scales, L = _fit_scale_q3(b.reshape(-1, 16), 4)
    scales = scales.reshape(-1, 16)
    _, max_scale = _argmax_abs(scales)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-32) / max_scale
        l6 = np.clip(round_int(iscale[:, None] * scales).astype(np.int8), -32, 31) + 32
        d = _fp16(np.where(max_scale != 0, f32(1) / iscale, f32(0)))
    l6 = np.where((max_scale != 0)[:, None], l6, 0).astype(np.int32)
    s = np.zeros((len(b), 12), np.int32)
    s[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    for j in range(16):
        s[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
    s = s.astype(np.uint8)
    dq = (d.view(np.float16).astype(f32).reshape(-1, 1) * _q3_scales(s).astype(f32)).reshape(-1)
    L = _requantize(b.reshape(-1, 16), dq, None, -4, 3, L.reshape(-1, 16) - 4) + 4
    L = L.reshape(-1, QK_K)
    high = (L > 3).reshape(-1, 8, 32).astype(np.uint8)  # bit j // 32 of hmask[j % 32]
    hmask = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    out = np.concatenate([hmask, _pack_2bit(L & 3), s, d], axis=1)
    return out.reshape(x.shape[0], -1)


# --- dequantizers: (blocks, block bytes) uint8 -> (blocks, 256) float32 ---

def to_float_q2_k(b: np.ndarray) -> np.ndarray:
    sc = b[:, :16].astype(np.int32)
    q = _unpack_2bit(b[:, 16:80]).astype(f32).reshape(-1, 16, 16)
    dl = _half(b, 80)[:, None] * (sc & 0xF).astype(f32)
    ml = _half(b, 82)[:, None] * (sc >> 4).astype(f32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, QK_K)


def to_float_q3_k(b: np.ndarray) -> np.ndarray:
    low = _unpack_2bit(b[:, 32:96]).astype(np.int32)
    high = (b[:, :32][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low - 4 * (1 - high.reshape(-1, QK_K))).astype(f32).reshape(-1, 16, 16)
    dl = _half(b, 108)[:, None] * _q3_scales(b[:, 96:108]).astype(f32)
    return (dl[:, :, None] * q).reshape(-1, QK_K)


def _to_float_k4(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    sc, m = _k4_scales(b[:, 4:16])
    dl = _half(b, 0)[:, None] * sc.astype(f32)
    ml = _half(b, 2)[:, None] * m.astype(f32)
    return (dl[:, :, None] * q.astype(f32).reshape(-1, 8, 32) - ml[:, :, None]).reshape(-1, QK_K)


def _nibbles_k4(qs: np.ndarray) -> np.ndarray:
    """(blocks, 128) Q4_K/Q5_K bytes -> (blocks, 256) low 4 bits in weight order."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8)[None, None, :, None]
    return (q & 0xF).reshape(-1, QK_K)


def to_float_q4_k(b: np.ndarray) -> np.ndarray:
    return _to_float_k4(b, _nibbles_k4(b[:, 16:144]))


def to_float_q5_k(b: np.ndarray) -> np.ndarray:
    high = (b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _to_float_k4(b, _nibbles_k4(b[:, 48:176]) | (high.reshape(-1, QK_K) << 4))


def to_float_q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, :128].reshape(-1, 2, 1, 2, 32)  # (block, half, nibble, byte group, l)
    low = (ql >> np.array([0, 4], np.uint8)[None, None, :, None, None]) & 0xF
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    q = low.reshape(-1, 2, 4, 32).astype(np.int32) | ((qh & 3).astype(np.int32) << 4)
    dl = _half(b, 208)[:, None] * b[:, 192:208].view(np.int8).astype(f32)
    return (dl[:, :, None] * (q.reshape(-1, 16, 16) - 32).astype(f32)).reshape(-1, QK_K)
