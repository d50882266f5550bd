"""Block layouts are bit-exact with GGML: our numpy twin, gguf.quants and the native kernels."""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from alpaca_cpu import _core, ggml_types
from alpaca_cpu import quants as q

# The weight types gguf.quants can make (it has no F32 quantizer to compare with).
FILE_TYPES = sorted(t for t in ggml_types.WEIGHT_TYPES if t != T.F32)
SHAPES = [(1, 32), (3, 64), (13, 96), (2, 11008)]


def awkward_rows(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random rows plus the edge cases quantizers get wrong: zeros, ties, equal values, signs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10, (shape[0], 1))
    x = x.astype(np.float32)
    x[0, :32] = 0.0                                   # all-zero block: scale 0
    if shape[0] > 1:
        x[1, :32] = 1.5                               # constant block: Q4_1 range 0
        x[1, 32:64] = np.linspace(-4, 4, 32)[: len(x[1, 32:64])]  # ties at x*id = k + 0.5
    if shape[0] > 2:
        x[2, :32] = -x[2, :32].max() * 2              # largest magnitude negative
    return x


@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_twin_quantize_matches_gguf(qtype: T, shape: tuple[int, int]) -> None:
    x = awkward_rows(shape)
    ours = q.quantize(x, qtype)
    theirs = np.asarray(gq.quantize(x, qtype)).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", FILE_TYPES, ids=lambda t: t.name)
def test_blocks_made_by_gguf_decode_identically(qtype: T, isa: str) -> None:
    x = awkward_rows((13, 96), seed=1)
    blocks = np.asarray(gq.quantize(x, qtype)).view(np.uint8).reshape(13, -1)
    expected = np.asarray(gq.dequantize(blocks, qtype), dtype=np.float32).reshape(13, 96)
    assert np.array_equal(q.dequantize(blocks, qtype, 96), expected)
    assert np.array_equal(_core.dequantize(blocks, int(qtype), 96, isa), expected)


@pytest.mark.parametrize("qtype", [*FILE_TYPES, ggml_types.Q8_1],
                         ids=lambda t: ggml_types.traits(t).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_quantize_equals_numpy_twin(qtype: int, shape: tuple[int, int], isa: str) -> None:
    x = awkward_rows(shape, seed=2)
    expected = q.quantize(x, qtype)
    assert np.array_equal(_core.quantize(x, int(qtype), 1, isa), expected)
    # Multi-threaded quantization splits rows; the bytes must not change.
    assert np.array_equal(_core.quantize(x, int(qtype), 3, isa), expected)


def test_row_length_not_multiple_of_32_is_refused() -> None:
    x = np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.quantize(x, int(T.Q4_0))
    with pytest.raises(ValueError, match="multiple of 32"):
        q.quantize(x, T.Q4_0)


def test_fp16_conversion_round_trips_every_half(isa: str) -> None:
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    x = finite.astype(np.float32)
    cols = x.size // 32 * 32
    x = x[:cols].reshape(1, -1)
    native = _core.quantize(x, int(T.F16), 1, isa).view(np.float16)
    assert np.array_equal(native.view(np.uint16), x.astype(np.float16).view(np.uint16))
    back = _core.dequantize(native.view(np.uint8), int(T.F16), cols, isa)
    assert np.array_equal(back, x)


def test_fp32_to_fp16_rounds_to_nearest_even(isa: str) -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.standard_normal(4096) * 1e-5,   # subnormal halves
        rng.standard_normal(4096) * 1e3,
        np.array([65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 2.9e-8] * 4),
    ]).astype(np.float32)
    x = x[: x.size // 32 * 32].reshape(1, -1)
    ours = _core.quantize(x, int(T.F16), 1, isa)
    with np.errstate(over="ignore"):  # 1e6 -> inf is the expected result, not an accident
        expected = x.astype(np.float16).view(np.uint8)
    assert np.array_equal(ours, expected)
