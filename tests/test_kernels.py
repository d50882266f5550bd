"""Every native kernel equals its scalar twin (integer parts exactly) and the numpy twin
(within a named tolerance), on every ISA this machine has."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from alpaca_cpu import _core, ggml_types
from alpaca_cpu import quants as q

# Relative tolerance of a GEMM result against the float64 numpy twin: block sums are exact
# integers, so the only differences are float32 rounding of the per-block products and of the
# accumulation order (n/32 terms), far below 1e-5 of the result's scale.
GEMM_RTOL = 2e-5
# Elementwise kernels: float32 vs float64 rounding of a few operations.
ELEMENTWISE_RTOL = 1e-5
# Softmax probabilities are compared relatively (within ELEMENTWISE_RTOL; measured at most
# 1.5e-6): they span 1 down to ~3e-12 here, and an absolute 1e-5 would pass anything for the 74 %
# of a 2049-long row that lie below it. The absolute part only forgives what float32 cannot hold
# as a normal number (a score ~87 below the row's max: exp underflows to a denormal or 0).
SOFTMAX_UNDERFLOW_ATOL = float(np.finfo(np.float32).tiny)

# The types with a tile kernel or an exact numpy twin of their dot product, and the others
# (compared with float64 products of the dequantized rows).
EXACT_TWIN_TYPES = [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL]
K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
assert sorted(EXACT_TWIN_TYPES + K_TYPES) == sorted(ggml_types.WEIGHT_TYPES)
# (rows, n_tok, cols): rows not a multiple of 8, one row, K = 32 and K = 11008.
SHAPES = [(1, 1, 32), (7, 3, 32), (13, 5, 96), (9, 2, 11008), (24, 17, 576)]
# K-quants: one super-block, and the LLaMA row lengths 2816, 11008 and 14336 (a few rows each);
# token counts around the tiles (4 tokens per pass in the K-quant panels of AVX2 and AVX-512,
# 8 in the AVX2 row kernels): 11 and 9 leave a partial tile; rows 1, 2, 3, 5, 7, 17: partial
# panels of 8 and 16.
SHAPES_K = [(1, 1, 256), (7, 3, 256), (3, 2, 2816), (2, 2, 11008), (2, 1, 14336), (17, 5, 512),
            (5, 11, 2816), (1, 9, 14336)]
# K-quant results are compared relative to sum |w| |a| (the dequantized rows' magnitudes), not
# to the result, which cancels. The integer sub-block sums are exact on every side; what differs
# is float32 rounding: the numpy twin's dequantized weights (d * sc, then * q: 2 roundings,
# 1.2e-7 relative), the native combination of a super-block's sums (a few roundings) and the
# float32 accumulation over up to 56 super-blocks (56 * 6e-8). 1e-6 bounds all of it by 2x.
KQ_GEMM_RTOL = 1e-6


def _operands(wtype: T, rows: int, n_tok: int, cols: int, seed: int):
    rng = np.random.default_rng(seed)
    w = q.quantize(rng.standard_normal((rows, cols)).astype(np.float32), wtype)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    atype = q.activation_type(wtype)
    act = x if atype == T.F32 else q.quantize(x, atype)
    return w, act


@pytest.mark.parametrize("wtype", EXACT_TWIN_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gemm_matches_numpy_twin_and_scalar(wtype: T, shape: tuple[int, int, int], isa: str) -> None:
    rows, n_tok, cols = shape
    w, act = _operands(wtype, rows, n_tok, cols, seed=rows * 1000 + cols)
    expected = q.gemm(wtype, w, act if act.dtype == np.uint8 else q.quantize(act, T.F32), cols)
    scale = np.abs(expected).max() + 1e-30
    got = _core.gemm(int(wtype), w, act, cols, isa)
    scalar = _core.gemm(int(wtype), w, act, cols, "scalar")
    assert got.shape == (n_tok, rows)
    assert np.abs(got - expected).max() <= GEMM_RTOL * scale
    assert np.abs(got - scalar).max() <= GEMM_RTOL * scale


@pytest.mark.parametrize("wtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES_K, ids=str)
def test_kquant_gemm_matches_numpy_and_scalar(wtype: T, shape: tuple[int, int, int],
                                              isa: str) -> None:
    rows, n_tok, cols = shape
    w, act = _operands(wtype, rows, n_tok, cols, seed=rows * 1000 + cols + int(wtype))
    expected = q.gemm(wtype, w, act, cols)
    bound = (np.abs(q.dequantize(act, ggml_types.Q8_K, cols)).astype(np.float64)
             @ np.abs(q.dequantize(w, wtype, cols)).astype(np.float64).T)
    got = _core.gemm(int(wtype), w, act, cols, isa)
    scalar = _core.gemm(int(wtype), w, act, cols, "scalar")
    assert got.shape == (n_tok, rows)
    assert np.all(np.abs(got - expected) <= KQ_GEMM_RTOL * bound)
    assert np.all(np.abs(got - scalar) <= KQ_GEMM_RTOL * bound)


@pytest.mark.parametrize("wtype", K_TYPES, ids=lambda t: t.name)
def test_kquant_token_alone_equals_batched(wtype: T, isa: str) -> None:
    # A token's result does not depend on the tokens that share the call (prefill equals
    # token-by-token decode), bit for bit: 19 rows leave partial panels of 8 and of 16, 11 tokens
    # two full passes of 4 and a partial one.
    rows, n_tok, cols = 19, 11, 512
    w, act = _operands(wtype, rows, n_tok, cols, seed=int(wtype) + 7)
    got = _core.gemm(int(wtype), w, act, cols, isa)
    for t in range(n_tok):
        alone = _core.gemm(int(wtype), w, np.ascontiguousarray(act[t : t + 1]), cols, isa)
        assert np.array_equal(alone[0], got[t])


# Where each new type keeps its fp16 scales (byte offsets in a block): set to 1.0 for the exact
# integer test below.
FP16_SCALES = {T.Q5_0: [0], T.Q5_1: [0], T.IQ4_NL: [0], T.Q2_K: [80, 82], T.Q3_K: [108],
               T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


@pytest.mark.parametrize("wtype", sorted(FP16_SCALES), ids=lambda t: t.name)
def test_new_types_integer_parts_are_exact(wtype: T, isa: str) -> None:
    """Random weight bytes with every fp16 scale 1.0 (Q5_1: min 0) against small integer
    activations with scale 1.0: the dot products are integers below 2^24, so every ISA must give
    exactly the numpy twin's integers (float64 from exact integer parts)."""
    rng = np.random.default_rng(int(wtype))
    t = ggml_types.traits(wtype)
    rows, n_tok, cols = 5, 11, 2 * t.block_size if t.block_size == 256 else 256
    w = rng.integers(0, 256, (rows, q.row_bytes(wtype, cols)), dtype=np.uint8)
    wb = w.reshape(-1, t.type_size)
    one = np.array([1.0], np.float16).view(np.uint8)
    for at in FP16_SCALES[wtype]:
        wb[:, at:at + 2] = one
    if wtype == T.Q5_1:
        wb[:, 2:4] = 0
    x = rng.integers(-9, 10, (n_tok, cols)).astype(np.float32)
    x[:, ::32] = 127  # makes every activation block scale exactly 1.0 (Q8_K: -1.0)
    atype = q.activation_type(wtype)
    act = q.quantize(x, atype)
    assert np.array_equal(q.dequantize(act, atype, cols), x)
    expected = q.gemm(wtype, w, act, cols)
    assert np.array_equal(expected, np.round(expected))
    assert np.array_equal(_core.gemm(int(wtype), w, act, cols, isa), expected)


def test_gemm_integer_parts_are_exact(isa: str) -> None:
    """With all scales 1.0 the float result is an exact integer: no rounding may creep in."""
    rng = np.random.default_rng(5)
    rows, n_tok, cols = 11, 3, 256
    w = q.quantize(rng.integers(-8, 8, (rows, cols)).astype(np.float32), T.Q8_0)
    a = q.quantize(rng.integers(-127, 128, (n_tok, cols)).astype(np.float32), T.Q8_0)
    for arr in (w, a):  # force every block scale to exactly 1.0
        arr.reshape(-1, 34)[:, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    expected = q.gemm(T.Q8_0, w, a, cols)
    got = _core.gemm(int(T.Q8_0), w, a, cols, isa)
    assert np.array_equal(got, expected)
    assert np.array_equal(got, np.round(got))


def test_rmsnorm(isa: str) -> None:
    rng = np.random.default_rng(6)
    for n in (1, 7, 64, 576, 4099):
        x = rng.standard_normal(n).astype(np.float32)
        w = rng.standard_normal(n).astype(np.float32)
        x64 = x.astype(np.float64)
        expected = x64 / np.sqrt((x64 * x64).mean() + 1e-5) * w
        got = _core.rmsnorm(x, w, 1e-5, isa)
        assert np.allclose(got, expected, rtol=ELEMENTWISE_RTOL, atol=ELEMENTWISE_RTOL)


def test_swiglu(isa: str) -> None:
    rng = np.random.default_rng(7)
    for n in (1, 9, 1536, 11008):
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        g64 = g.astype(np.float64)
        expected = g64 / (1 + np.exp(-g64)) * u
        got = _core.swiglu(g, u, isa)
        assert np.allclose(got, expected, rtol=ELEMENTWISE_RTOL, atol=ELEMENTWISE_RTOL)


def test_softmax(isa: str) -> None:
    rng = np.random.default_rng(9)
    for n in (1, 7, 8, 70, 2049):
        # attention scores: raw dot products, scaled by 1/sqrt(head size) inside; wide range
        x = (rng.standard_normal(n) * 30).astype(np.float32)
        z = x.astype(np.float64) * 0.125
        e = np.exp(z - z.max())
        got, log_sum = _core.softmax(x, 0.125, isa)
        assert np.allclose(got, e / e.sum(), rtol=ELEMENTWISE_RTOL, atol=SOFTMAX_UNDERFLOW_ATOL)
        # log(sum(exp(0.125 x))): what merges the softmaxes of parts of a row
        expected_log_sum = z.max() + np.log(e.sum())
        assert abs(log_sum - expected_log_sum) <= ELEMENTWISE_RTOL * max(1.0, abs(expected_log_sum))


def test_axpy_f16(isa: str) -> None:
    rng = np.random.default_rng(8)
    for n in (1, 13, 64, 128):
        x = rng.standard_normal(n).astype(np.float16)
        y = rng.standard_normal(n).astype(np.float32)
        expected = y.astype(np.float64) + 0.37 * x.astype(np.float64)
        got = _core.axpy_f16(0.37, x.view(np.uint16), y, isa)
        assert np.allclose(got, expected, rtol=ELEMENTWISE_RTOL, atol=ELEMENTWISE_RTOL)


@pytest.mark.parametrize("wtype", [T.F32, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [1, 7, 24, 40, 100, 256, 300])
@pytest.mark.parametrize("rows_tok", [(6, 5), (37, 11)], ids=str)
def test_float_gemm_rows_of_any_length(wtype: T, cols: int, rows_tok: tuple[int, int],
                                       isa: str) -> None:
    # attention scores (F16 keys x F32 queries) have head-size rows: lengths that are not a
    # multiple of any vector width take each ISA's tail path; row counts past one 16-row
    # group and token counts past one 8-token pass take the AVX-512 short-row path's tails
    # (rows up to 256; 300 takes the row tiles)
    rows, n_tok = rows_tok
    w, act = _operands(wtype, rows, n_tok, cols, seed=cols + rows)
    expected = q.gemm(wtype, w, q.quantize(act, T.F32), cols)
    scale = np.abs(expected).max() + 1e-30
    got = _core.gemm(int(wtype), w, act, cols, isa)
    assert np.abs(got - expected).max() <= GEMM_RTOL * scale
    # a token's result does not depend on the others in the call (prefill equals decode, and
    # a server's sequences do not change each other's output): bit for bit
    for t in (0, n_tok - 1):
        alone = _core.gemm(int(wtype), w, np.ascontiguousarray(act[t : t + 1]), cols, isa)
        assert np.array_equal(alone[0], got[t])


@pytest.mark.parametrize("n", [8, 13, 64, 80, 128])
@pytest.mark.parametrize("n_q", [1, 3, 4, 7])
def test_mix_rows_matches_numpy(n: int, n_q: int, isa: str) -> None:
    # attention's second product: out = w @ v over positions, v rows in F16 or F32
    rng = np.random.default_rng(n * 10 + n_q)
    for n_pos in (1, 5, 70):
        w = rng.random((n_q, n_pos)).astype(np.float32)
        w /= w.sum(1, keepdims=True)  # softmax-like weights
        v = rng.standard_normal((n_pos, n)).astype(np.float16)
        expected = w.astype(np.float64) @ v.astype(np.float64)
        got16 = _core.mix_rows(v.view(np.uint16), w, isa)
        got32 = _core.mix_rows(v.astype(np.float32), w, isa)
        assert np.allclose(got16, expected, rtol=ELEMENTWISE_RTOL, atol=ELEMENTWISE_RTOL)
        assert np.allclose(got32, expected, rtol=ELEMENTWISE_RTOL, atol=ELEMENTWISE_RTOL)


def test_unknown_isa_is_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        _core.gemm(int(T.F32), np.zeros((1, 128), np.uint8), np.zeros((1, 32), np.float32), 32,
                   "no-such-isa")


def test_read_bandwidth_probe_reads_and_refuses_bad_arguments(isa: str) -> None:
    gbps = _core.read_bandwidth(1 << 22, 2, 2, isa)
    assert np.isfinite(gbps) and gbps > 0
    with pytest.raises(ValueError, match="nbytes"):
        _core.read_bandwidth(1024, 1, 1, isa)


def test_quantize_refuses_absurd_thread_counts() -> None:
    with pytest.raises(ValueError, match="n_threads"):
        _core.quantize(np.zeros((2, 32), np.float32), int(T.Q8_0), 100000)
