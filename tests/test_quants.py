"""Block layouts are bit-exact with GGML: our numpy twin, gguf.quants and the native kernels."""

from __future__ import annotations

from pathlib import Path

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from alpaca_cpu import _core, ggml_types
from alpaca_cpu import quants as q

NAME = {t: ggml_types.traits(t).name for t in ggml_types.TYPES}

# The weight types gguf.quants can make (it has no F32, IQ4_NL or K-quant quantizer).
GGUF_QUANTIZES = [T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Every type with a quantizer here: the weight types and the activation formats.
ALL_TYPES = sorted(t for t in ggml_types.TYPES if t != T.F32)
SHAPES = [(1, 32), (3, 64), (13, 96), (2, 11008)]
# Super-block types: one super-block, and the LLaMA row lengths 2816, 11008 and 14336.
SHAPES_K = [(1, 256), (3, 512), (2, 2816), (1, 11008), (1, 14336)]
# GGML's own reference quantizers' output (tests/data/README.md says how it was made).
GGML_REF = Path(__file__).parent / "data" / "ggml_ref_quants.npz"
# The fp16 fields of each block type (byte offsets), for blocks made of random bytes.
FP16_FIELDS = {T.F16: [], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
               T.IQ4_NL: [0], T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
               T.Q6_K: [208]}


def shapes_for(qtype: int) -> list[tuple[int, int]]:
    return SHAPES_K if ggml_types.traits(qtype).block_size == 256 else SHAPES


def awkward_rows(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Random rows plus the edge cases quantizers get wrong: zeros, ties, equal values, signs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 10, (shape[0], 1))
    x = x.astype(np.float32)
    x[0, :32] = 0.0                                   # all-zero block (or sub-block): scale 0
    if shape[0] > 1:
        x[1, :32] = 1.5                               # constant block: Q4_1 range 0
        x[1, 32:64] = np.linspace(-4, 4, 32)[: len(x[1, 32:64])]  # ties at x*id = k + 0.5
    if shape[0] > 2:
        x[2, :32] = -x[2, :32].max() * 2              # largest magnitude negative
    return x


@pytest.mark.parametrize("qtype", GGUF_QUANTIZES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_twin_quantize_matches_gguf(qtype: T, shape: tuple[int, int]) -> None:
    x = awkward_rows(shape)
    ours = q.quantize(x, qtype)
    theirs = np.asarray(gq.quantize(x, qtype)).view(np.uint8).reshape(ours.shape)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", sorted(FP16_FIELDS), ids=lambda t: t.name)
def test_quantized_blocks_decode_like_gguf(qtype: T, isa: str) -> None:
    """Blocks made by gguf.quants where it can, by our quantizer otherwise, dequantize to
    exactly what gguf.quants (the independent oracle) says, in numpy and natively."""
    cols = 512 if ggml_types.traits(qtype).block_size == 256 else 96
    x = awkward_rows((13, cols), seed=1)
    blocks = (np.asarray(gq.quantize(x, qtype)).view(np.uint8).reshape(13, -1)
              if qtype in GGUF_QUANTIZES else _core.quantize(x, int(qtype), 1, isa))
    expected = np.asarray(gq.dequantize(blocks, qtype), dtype=np.float32).reshape(13, cols)
    assert np.array_equal(q.dequantize(blocks, qtype, cols), expected)
    assert np.array_equal(_core.dequantize(blocks, int(qtype), cols, isa), expected)


@pytest.mark.parametrize("qtype", sorted(FP16_FIELDS), ids=lambda t: t.name)
def test_random_bytes_decode_like_gguf(qtype: T, isa: str) -> None:
    """Any bytes are a valid block once its fp16 scales are finite: every quant, scale and min
    bit pattern decodes as gguf.quants decodes it."""
    rng = np.random.default_rng(int(qtype))
    t = ggml_types.traits(qtype)
    cols = 4 * t.block_size if t.is_block else 64
    data = rng.integers(0, 256, (7, q.row_bytes(qtype, cols)), dtype=np.uint8)
    blocks = data.reshape(-1, t.type_size)
    for at in FP16_FIELDS[qtype]:  # finite halves of any magnitude (F16: the whole row)
        halves = rng.standard_normal(len(blocks)) * np.exp(rng.uniform(-9, 9, len(blocks)))
        blocks[:, at:at + 2] = halves.astype(np.float16).reshape(-1, 1).view(np.uint8)
    if qtype == T.F16:
        data = rng.standard_normal((7, cols)).astype(np.float16).view(np.uint8)
    expected = np.asarray(gq.dequantize(data, qtype), dtype=np.float32).reshape(7, cols)
    assert np.array_equal(q.dequantize(data, qtype, cols), expected)
    assert np.array_equal(_core.dequantize(data, int(qtype), cols, isa), expected)


@pytest.mark.parametrize("name", ["Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                  "Q6_K", "Q8_K"])
def test_quantizers_equal_ggml_reference_output(name: str, isa: str) -> None:
    """Bytes made by GGML's own quantize_row_*_ref (tests/data/ggml_ref_quants.npz): the
    native quantizer of every ISA and the numpy twin make the same ones."""
    ref = np.load(GGML_REF)
    qtype = next(t for t in ggml_types.TYPES if NAME[t] == name)
    x = ref["x"]
    assert np.array_equal(_core.quantize(x, qtype, 1, isa), ref[name])
    assert np.array_equal(q.quantize(x, qtype), ref[name])


def test_row_length_not_multiple_of_the_block_is_refused() -> None:
    x = np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.quantize(x, int(T.Q4_0))
    with pytest.raises(ValueError, match="multiple of 32"):
        q.quantize(x, T.Q4_0)
    x = np.zeros((2, 288), np.float32)  # whole 32-blocks, not whole super-blocks
    for qtype in (T.Q4_K, ggml_types.Q8_K):
        with pytest.raises(ValueError, match="multiple of 256"):
            _core.quantize(x, int(qtype))
        with pytest.raises(ValueError, match="multiple of 256"):
            q.quantize(x, qtype)


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


def test_q8_k_quantizer_rounds_ties_like_the_reference(isa: str) -> None:
    """Integer rows with the largest magnitude 126 or 127: iscale * x lands exactly on halves
    (63 * 127 / 126 = 63.5), where a fused multiply-add in place of the reference's rounded
    product followed by the rounding add picks the other integer."""
    rng = np.random.default_rng(3)
    x = rng.integers(-127, 128, (16, 2816)).astype(np.float32)
    assert np.array_equal(_core.quantize(x, ggml_types.Q8_K, 1, isa),
                          q.quantize(x, ggml_types.Q8_K))
