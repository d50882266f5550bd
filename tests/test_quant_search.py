"""The error-minimising quantizers (csrc/quant_search.cpp, `_core.quantize(method="search")`).

Each block's weighted squared error sum_i w_i (x_i - deq_i)^2, measured here in float64 on the
bytes written (dequantized by the numpy twins), must never exceed the reference quantizer's,
on random blocks and on adversarial ones; the same inputs must give the same bytes on any
thread count; non-finite inputs are refused, by the binding with their position and by
convert-weights with the tensor's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from alpaca_convert.converter import check_finite, column_weights, encode
from alpaca_convert.errors import ConvertError
from gguf import GGMLQuantizationType as T

from alpaca_cpu import _core
from alpaca_cpu.quants import dequantize

SEARCH_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
QK = 32
# The binding sums each block's error in double in another order than numpy: equal errors may
# differ in the last bits of a double.
ERROR_RTOL = 1e-9
# Mean squared error of the search relative to the reference on Gaussian weights: measured
# 0.78 .. 0.89 (unweighted) for these types; the search must gain at least this much.
MIN_GAIN = 0.95


def block_errors(x: np.ndarray, data: np.ndarray, qtype: T, w: np.ndarray,
                 block: int = QK) -> np.ndarray:
    """(rows, cols) weights and their GGML rows -> weighted squared error per block."""
    deq = dequantize(data, int(qtype), x.shape[1]).astype(np.float64)
    err = w[None, :] * (x.astype(np.float64) - deq) ** 2
    return err.reshape(x.shape[0], -1, block).sum(axis=2)


def adversarial_rows(cols: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = [
        np.zeros(cols),  # all zeros
        np.full(cols, 0.37),  # constant
        np.full(cols, -2.5),
        np.where(np.arange(cols) % QK == 5, 40.0, 0.0),  # one outlier per block, rest zero
        np.where(np.arange(cols) % QK == 0, -9.0, rng.normal(0, 0.01, cols)),  # outlier + noise
        rng.normal(0, 1, cols) * 1e-40,  # float32 denormals
        rng.normal(0, 1, cols) * 1e-6,  # below fp16's normal range once scaled
        np.tile([1.0, -1.0], cols // 2),  # two values
        np.linspace(-1, 1, cols),
        rng.standard_cauchy(cols),  # heavy tails
        np.abs(rng.normal(0, 1, cols)) + 3.0,  # all positive, far from zero
        rng.normal(0, 1, cols) * 3e3,  # large, still within fp16 scales
    ]
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", SEARCH_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "importance"])
def test_never_worse_than_the_reference_per_block(qtype: T, weighted: bool) -> None:
    rng = np.random.default_rng(0)
    cols = 8 * QK
    random_rows = np.concatenate([rng.normal(0, 1, (48, cols)),
                                  rng.laplace(0, 0.02, (48, cols)),
                                  rng.uniform(-1, 3, (32, cols))]).astype(np.float32)
    x = np.concatenate([random_rows, adversarial_rows(cols)])
    imp = (rng.gamma(0.5, 2.0, cols) * (rng.random(cols) > 0.1)).astype(np.float32) \
        if weighted else None  # some columns with zero importance
    w = imp.astype(np.float64) if imp is not None else np.ones(cols)
    ref = _core.quantize(x, int(qtype), 1)
    ours = _core.quantize(x, int(qtype), 1, method="search", importance=imp)
    e_ref, e_ours = block_errors(x, ref, qtype, w), block_errors(x, ours, qtype, w)
    worse = e_ours > e_ref * (1 + ERROR_RTOL) + 1e-300
    assert not worse.any(), (f"{worse.sum()} blocks worse, first at {np.argwhere(worse)[0]}: "
                             f"{e_ours[worse][0]} > {e_ref[worse][0]}")
    gain = e_ours[: len(random_rows)].sum() / e_ref[: len(random_rows)].sum()
    assert gain < MIN_GAIN, f"search error / reference error = {gain:.3f}"
    # All-zero blocks stay exactly the reference's bytes (zero scale, zero error).
    zero_row = len(random_rows)
    assert np.array_equal(ours[zero_row], ref[zero_row])


@pytest.mark.parametrize("qtype", SEARCH_TYPES, ids=lambda t: t.name)
def test_importance_weighting_lowers_the_weighted_error(qtype: T) -> None:
    """With importances, the weighted error is lower than the unweighted search's."""
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (64, 4 * QK)).astype(np.float32)
    imp = rng.gamma(0.3, 3.0, 4 * QK).astype(np.float32)
    plain = _core.quantize(x, int(qtype), 1, method="search")
    weighted = _core.quantize(x, int(qtype), 1, method="search", importance=imp)
    w = imp.astype(np.float64)
    e_plain = block_errors(x, plain, qtype, w).sum()
    e_weighted = block_errors(x, weighted, qtype, w).sum()
    assert e_weighted < 0.95 * e_plain, (e_weighted, e_plain)


@pytest.mark.parametrize("qtype", SEARCH_TYPES, ids=lambda t: t.name)
def test_deterministic_across_runs_and_threads(qtype: T) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (37, 6 * QK)).astype(np.float32)
    imp = rng.random(6 * QK).astype(np.float32)
    one = _core.quantize(x, int(qtype), 1, method="search", importance=imp)
    for n_threads in (1, 2, 5):
        again = _core.quantize(x, int(qtype), n_threads, method="search", importance=imp)
        assert np.array_equal(one, again), n_threads


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_refused(bad: float) -> None:
    x = np.ones((3, 2 * QK), dtype=np.float32)
    x[2, 40] = bad
    with pytest.raises(ValueError, match=r"non-finite value .* row 2, column 40"):
        _core.quantize(x, int(T.Q4_0), 1, method="search")
    with pytest.raises(ConvertError, match=r"tensor blk\.3\.ffn_up\.weight .*\[2, 40\]"):
        check_finite(x, "blk.3.ffn_up.weight", Path("model.gguf"))


def test_bad_importance_and_method_refused() -> None:
    x = np.ones((2, 2 * QK), dtype=np.float32)
    with pytest.raises(ValueError, match=r"one per column"):
        _core.quantize(x, int(T.Q4_0), 1, method="search",
                       importance=np.ones(QK, dtype=np.float32))
    bad = np.ones(2 * QK, dtype=np.float32)
    bad[7] = -1
    with pytest.raises(ValueError, match=r"importance\[7\]"):
        _core.quantize(x, int(T.Q4_0), 1, method="search", importance=bad)
    with pytest.raises(ValueError, match="method must be"):
        _core.quantize(x, int(T.Q4_0), 1, method="best")
    with pytest.raises(ValueError, match="no error-minimising quantizer for Q2_K"):
        _core.quantize(np.ones((1, 256), dtype=np.float32), int(T.Q2_K), 1, method="search")


def test_encode_falls_back_to_the_reference_for_types_without_a_search() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (4, 256)).astype(np.float32)
    assert np.array_equal(encode(x, T.Q2_K, 1, "search"), _core.quantize(x, int(T.Q2_K), 1))
    # K-quants with a search: without importance, the reference bytes (llama-quantize's)
    assert np.array_equal(encode(x, T.Q4_K, 1, "search"), _core.quantize(x, int(T.Q4_K), 1))
    assert not np.array_equal(encode(x, T.Q4_0, 1, "search"), encode(x, T.Q4_0, 1, "reference"))


def test_column_weights() -> None:
    imp = np.array([0.0, 1.0, 3.0, 0.0], dtype=np.float32)
    w = column_weights(imp)
    np.testing.assert_allclose(w, [0.01, 1.01, 3.01, 0.01], rtol=1e-6)
    assert np.array_equal(column_weights(np.zeros(4, dtype=np.float32)), np.ones(4))


K_TYPES = [T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QK_K = 256
# Weighted error of the K-quant search relative to the reference (Gaussian and Laplace
# weights, gamma-distributed importances): measured 0.89 (Q3_K), 0.77 (Q4_K), 0.82 (Q5_K),
# 0.86 (Q6_K); the importance-weighted fits must gain at least this much.
K_MIN_GAIN = 0.95


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quants_with_importance_never_worse_per_superblock(qtype: T) -> None:
    rng = np.random.default_rng(5)
    cols = 2 * QK_K
    random_rows = np.concatenate([rng.normal(0, 1, (24, cols)),
                                  rng.laplace(0, 0.02, (16, cols))]).astype(np.float32)
    x = np.concatenate([random_rows, adversarial_rows(cols)])
    imp = (rng.gamma(0.5, 2.0, cols) * (rng.random(cols) > 0.1)).astype(np.float32)
    w = imp.astype(np.float64)
    ref = _core.quantize(x, int(qtype), 1)
    ours = _core.quantize(x, int(qtype), 1, method="search", importance=imp)
    e_ref = block_errors(x, ref, qtype, w, QK_K)
    e_ours = block_errors(x, ours, qtype, w, QK_K)
    worse = e_ours > e_ref * (1 + ERROR_RTOL) + 1e-300
    assert not worse.any(), (f"{worse.sum()} super-blocks worse, first at "
                             f"{np.argwhere(worse)[0]}: {e_ours[worse][0]} > {e_ref[worse][0]}")
    gain = e_ours[: len(random_rows)].sum() / e_ref[: len(random_rows)].sum()
    assert gain < K_MIN_GAIN, f"weighted error / reference error = {gain:.3f}"
    # No importance: the reference bytes exactly.
    assert np.array_equal(_core.quantize(x, int(qtype), 1, method="search"), ref)
    for n_threads in (2, 5):  # deterministic on any thread count
        again = _core.quantize(x, int(qtype), n_threads, method="search", importance=imp)
        assert np.array_equal(again, ours), n_threads
